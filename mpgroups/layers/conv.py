"""Group-parallel convolutions: ``nn.Conv1d/2d/3d`` whose conv groups live on different ranks.

Shapes on rank ``r`` of ``P`` (``C_in_r``/``C_out_r`` from
:func:`mpgroups.sharding.placement.place`)::

    weight            [C_out_r, C_in / G, *kernel_size]    rows out_slice of nn.ConvNd's weight
    bias              [C_out_r]
    input  replicated [N, C_in, *spatial]                  sharded: [N, C_in_shard_r, *spatial]
    output replicated [N, C_out, *spatial_out]             sharded: [N, C_out_r, *spatial_out]

With no process group, or a group of one rank, the layer computes exactly what ``nn.ConvNd``
computes, bit for bit, with the same parameters and ``state_dict`` keys. Outputs keep the
input's memory format (channels_last in, channels_last out) in every layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.comm.checks import layer_input_problem
from mpgroups.layers.base import ConvConversion, LayerOptions, conv_arguments
from mpgroups.layers.layer_comm import add_bias_once, layer_output, local_input
from mpgroups.layers.overlap import ConvOp, column_parallel, overlaps_input_grad
from mpgroups.sharding.layout import (
    LAYOUTS,
)
from mpgroups.sharding.placement import GroupPlacement

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["GroupParallelConv1d", "GroupParallelConv2d", "GroupParallelConv3d", "LAYOUTS"]

# What nn.ConvNd derives from its arguments; the layers take these from a meta-device ConvNd.
_CONV_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class _GroupParallelConvNd(ConvConversion, nn.Module):
    _dims: int
    _nn_type: type[nn.modules.conv._ConvNd]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        _init_weights: bool = True,
        **options: Unpack[LayerOptions],
    ) -> None:
        super().__init__()
        # nn.ConvNd itself checks and normalises the arguments (on the meta device: no memory).
        try:
            spec = self._nn_type(
                in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                bias, padding_mode, device="meta",
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}: {err} (got in_channels={in_channels}, "
                f"out_channels={out_channels}, groups={groups}, stride={stride}, "
                f"padding={padding!r}, padding_mode={padding_mode!r})"
            ) from err
        for name in _CONV_ATTRIBUTES:
            setattr(self, name, getattr(spec, name))
        self._place(in_channels, out_channels, groups, (1, -self._dims - 1), options)
        # Each rank's expected input channels and what they are, for the checks' messages.
        expected = [self._expected_channels(r) for r in range(self.world_size)]
        self._input_channels = [channels for channels, _ in expected]
        self._input_notes = [note for _, note in expected]
        config = (
            type(self).__name__, conv_arguments(spec), self.input_layout, self.output_layout,
            self.split, self.shards.inputs.slices, self.shards.outputs.slices,
        )  # fmt: skip
        self._make_guards(config, -self._dims - 1)
        weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._make_parameters(weight_shape, bias, device, dtype, _init_weights)

    @property
    def placement(self) -> GroupPlacement:
        return self.shards.placement

    @property
    def local_groups(self) -> int:
        """Conv groups of the local op (1 when this rank holds a piece of one group)."""
        return self.placement.local_groups

    @property
    def in_slice(self) -> tuple[int, int]:
        """Input channels this rank's conv reads."""
        return self.placement.in_slice

    @property
    def out_slice(self) -> tuple[int, int]:
        """Output channels this rank writes (its rows of the full weight)."""
        return self.placement.out_slice

    @property
    def input_shard(self) -> tuple[int, int]:
        """Channels of the input this rank holds when ``input_layout="sharded"``."""
        return self.shards.inputs.own

    @property
    def output_shard(self) -> tuple[int, int]:
        """Channels of the output this rank holds when ``output_layout="sharded"``."""
        return self.shards.outputs.own

    def _expected_channels(self, rank: int) -> tuple[int, str]:
        """The channel count of ``rank``'s input, and what it is, for messages."""
        if self.input_layout == "replicated":
            return self.in_channels, "replicated input"
        start, stop = self.shards.inputs.slices[rank]
        note = f"sharded input: its shard {start}..{stop} of {self.in_channels} channels"
        return stop - start, f"{note}, groups={self.groups}"

    def _check_input(self, x) -> None:
        rank = self.rank
        self.input_guard(
            x,
            problem=layer_input_problem(
                x,
                f"a {self._dims + 2}-D input [N, C, *spatial] (or {self._dims + 1}-D unbatched)",
                (self._dims + 1, self._dims + 2),
                -self._dims - 1,
                self._input_channels[rank],
                self._input_notes[rank],
                self.weight,
            ),
            expected_channels=self._input_channels,
            channels_note=self._input_notes,
            weight=self.weight,
            communicates=self._communicates,
        )

    def _arguments(self) -> tuple:
        """The positional arguments of the equivalent ``nn.ConvNd`` (device and dtype aside)."""
        return conv_arguments(self)

    def _name(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
            f"groups={self.groups}, {self.input_layout}->{self.output_layout})"
        )

    def forward(self, input: Tensor) -> Tensor:  # named as nn.ConvNd.forward names it
        """Convolve ``input`` (layout ``input_layout``) into an output of layout
        ``output_layout``. Accepts ``[N, C, *spatial]`` or unbatched ``[C, *spatial]``, as
        ``nn.ConvNd`` does."""
        self._check_input(input)
        if input.dim() == self._dims + 1:
            return self._forward_batched(input.unsqueeze(0)).squeeze(0)
        return self._forward_batched(input)

    def _forward_batched(self, x: Tensor) -> Tensor:
        if (
            self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and overlaps_input_grad(x, self.shards, self.input_layout)
        ):
            op = ConvOp(self._dims, self.stride, self.padding, self.dilation, self.local_groups)
            pg = self.shards.inputs.process_group
            y = column_parallel(x, self.weight, self.bias, op, pg)
            return layer_output(y, self.shards, self.output_layout, 1)
        x = local_input(x, self.shards, self._team_shards, self.input_layout, 1)
        if self.shards.split == "rowwise":
            y = add_bias_once(self._conv_forward(x, None), self.bias, self.shards.outputs, 1)
        else:
            y = self._conv_forward(x, self.bias)
        return layer_output(y, self.shards, self.output_layout, 1)

    def _conv_forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self._dims - 1]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv(x, self.weight, bias, self.stride, padding, self.dilation, self.local_groups)

    def extra_repr(self) -> str:
        s = nn.modules.conv._ConvNd.extra_repr(self)
        s += (
            f", rank={self.rank}/{self.world_size}, local_groups={self.local_groups}"
            f", in_slice={self.in_slice}, out_slice={self.out_slice}"
        )
        if self.placement.filter_split:
            s += f", team={self.placement.team}"
        if (self.input_layout, self.output_layout) != ("replicated", "replicated"):
            s += f", layout={self.input_layout}->{self.output_layout}"
        if self.shards.split == "rowwise":
            s += ", split=in"
        return s


class GroupParallelConv1d(_GroupParallelConvNd):
    """``nn.Conv1d`` with its conv groups placed over ``process_group`` (see module docstring)."""

    _dims = 1
    _nn_type = nn.Conv1d


class GroupParallelConv2d(_GroupParallelConvNd):
    """``nn.Conv2d`` with its conv groups placed over ``process_group``.

    Args:
        in_channels ... dtype: as ``nn.Conv2d``.
        process_group, input_layout, output_layout, split, shard_groups, checks: keyword-only,
            see :class:`~mpgroups.layers.base.LayerOptions` (``process_group=None``: the
            default group when ``torch.distributed`` is initialised, else one device;
            layouts ``Replicate()`` or ``Shard(1)``; ``split="colwise"`` or ``"rowwise"``).

    Raises:
        ValueError: bad conv arguments, as ``nn.Conv2d``; ``PlacementError`` (a ``ValueError``)
            when ``groups`` cannot be placed on the group's size.
    """

    _dims = 2
    _nn_type = nn.Conv2d


class GroupParallelConv3d(_GroupParallelConvNd):
    """``nn.Conv3d`` with its conv groups placed over ``process_group`` (see module docstring)."""

    _dims = 3
    _nn_type = nn.Conv3d
