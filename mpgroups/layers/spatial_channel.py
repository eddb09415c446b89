"""A group-parallel conv whose rows are split too: the layer of a model split both ways, its
channel groups over one group of ranks and its rows (dim 2) over another.

:func:`split_rows_of` turns a ``GroupParallelConvNd`` into one, in place (same parameters,
``state_dict`` keys and hooks): its forward first takes the window of its input block along
dim 2 (the halo exchange of :mod:`mpgroups.layers.spatial_base`, over the rows' group), then
runs the channel layer on the window with no padding along dim 2 (the window holds it), which
gives exactly this rank's output rows. The channel layer's own collectives run within the
rank's channel group, every rank of which holds the same rows. Each rank's weight gradient
is its rows' share, so the weight and bias are summed over the rows' group in the graph, as
a spatial conv's are. The channel layer saves the window for its backward (a copy of the
block and its halo), where a spatial conv saves the block and the halo apart.

Shapes on the rank at ``(s, g)`` of an ``("sp", "gp")`` mesh::

    input   [N, C_in_g, l_s, *rest]       the channel layer's input layout, rows block s
    output  [N, C_out_g, l'_s, *rest_out] its output layout, output rows block s
"""

from __future__ import annotations

from torch import Tensor

from mpgroups.comm.collectives import copy_to_ranks_together
from mpgroups.layers.spatial_base import SPATIAL_STATE, SpatialLayer
from mpgroups.sharding.spatial import ConvRows

__all__ = ["SplitRowsConv", "split_rows_of", "whole_rows_of"]

_MISSING = object()


class SplitRowsConv(SpatialLayer):
    """Mixed in, in place, before a ``GroupParallelConvNd``'s class (:func:`split_rows_of`)."""

    def _keep_group(self, group) -> None:
        pass  # process_group stays the channel layer's; the rows' is self.row_split.group

    def forward(self, input: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(input)
        window, _, _ = self._window(input, self.weight)
        summed = copy_to_ranks_together([self.weight, self.bias], self.row_split.group)
        # What forward reads as self.weight (the DTensor's local view, if held as one): its
        # copy whose gradient is summed over the rows' group, for this call
        shadows = {name: self.__dict__.get(name, _MISSING) for name in ("weight", "bias")}
        try:
            for name, value in zip(("weight", "bias"), summed, strict=True):
                if value is not None:
                    self.__dict__[name] = value
            return super().forward(window)
        finally:
            for name, value in shadows.items():
                if value is _MISSING:
                    self.__dict__.pop(name, None)
                else:
                    self.__dict__[name] = value


def _rows_of(layer) -> ConvRows:
    """What ``layer`` (a channel conv, its dim-2 padding still its own) does along dim 2."""
    pads = layer._reversed_padding_repeated_twice  # last dim first
    return ConvRows(
        kernel=layer.kernel_size[0],
        stride=layer.stride[0],
        dilation=layer.dilation[0],
        pad_lo=pads[-2],
        pad_hi=pads[-1],
        padding_mode=layer.padding_mode,
    )


def split_rows_of(layer, rows_group) -> None:
    """Make the group-parallel conv ``layer`` take a block of rows of ``rows_group`` (a
    ``ProcessGroup`` or 1-D ``DeviceMesh``), in place; every rank of it calls this alike.

    Raises:
        ValueError: padding that differs before and after along a dim other than 2 (a
            ``"same"`` padding of an even kernel), which the layer could not take without
            its own padding.
    """
    rows = _rows_of(layer)
    pads = list(layer._reversed_padding_repeated_twice)
    rest = pads[:-2]
    if any(rest[i] != rest[i + 1] for i in range(0, len(rest), 2)):
        raise ValueError(
            f"{layer._name()}: padding {layer.padding!r} differs before and after along a dim "
            f"other than the rows; give explicit symmetric padding"
        )
    layer._mpgroups_own_padding = (layer.padding, tuple(pads))
    layer.padding = (0, *rest[::-2])
    layer._reversed_padding_repeated_twice = [*rest, 0, 0]
    plain_type = type(layer)
    layer.__class__ = _split_type(plain_type)
    layer._mpgroups_plain_type = plain_type
    layer._set_group(rows_group, layer._checks, lambda axis: rows, None)


def whole_rows_of(layer) -> None:
    """Undo :func:`split_rows_of`, in place."""
    layer.__class__ = layer.__dict__.pop("_mpgroups_plain_type")
    layer.padding, pads = layer.__dict__.pop("_mpgroups_own_padding")
    layer._reversed_padding_repeated_twice = list(pads)
    for attr in SPATIAL_STATE:
        layer.__dict__.pop(attr, None)


_TYPES: dict[type, type] = {}


def _split_type(plain_type: type) -> type:
    """The class ``SplitRowsConv`` + ``plain_type``, made once per channel layer class."""
    if plain_type not in _TYPES:
        name = f"SplitRows{plain_type.__name__}"
        _TYPES[plain_type] = type(name, (SplitRowsConv, plain_type), {"__module__": __name__})
    return _TYPES[plain_type]
