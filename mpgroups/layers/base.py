"""What the parallel layers (the group-parallel convs, ``ParallelLinear``) share.

:class:`ShardedLayer` places a layer on its process group (``shards``, the team subgroup,
the input checks), holds this rank's part of the whole ``torch.nn`` layer's parameters
(initialised as ``torch.nn`` initialises the whole, taken from a whole layer, gathered back
with ``full_weight``/``full_bias``), and makes copies that share the process group.
:class:`ConvConversion` adds the conv layers' ``from_conv`` and ``to_conv``. Gathering is a
collective over the layer's process group, checked like any other (see
:mod:`mpgroups.comm.checks`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mpgroups.comm.checks import InputGuard
from mpgroups.comm.collectives import gather_rows
from mpgroups.comm.process_groups import rank_and_world_size, resolve_process_group, team_subgroup
from mpgroups.layers.dtensor_state import own_rows
from mpgroups.sharding.layout import (
    NOT_PICKLABLE,
    ChannelShards,
    canonical_split,
    communicates,
    layer_shards,
    layout_name,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ConvConversion", "LayerOptions", "ShardedLayer", "SharesProcessGroup", "conv_arguments"]


class LayerOptions(TypedDict, total=False):
    """The keyword-only arguments every parallel layer takes after its ``torch.nn`` signature.

    Attributes:
        process_group: ``ProcessGroup``, 1-D ``DeviceMesh``, or ``None`` for the default group
            when ``torch.distributed`` is initialised (else a single-device layer).
        input_layout, output_layout: ``Replicate()`` (every rank holds the whole activation;
            the default) or ``Shard(1)`` (``Shard(-1)`` for a Linear: each rank holds its
            channels, see ``input_shard``/``output_shard``); the names ``"replicated"`` and
            ``"sharded"`` mean the same.
        split: which dimension of the weight the ranks divide: ``"colwise"`` (the default:
            each rank its output channels' filters) or ``"rowwise"`` (each rank the weight's
            columns for its input shard, the partial sums added; needs a sharded input), as
            torch's ``ColwiseParallel``/``RowwiseParallel`` split a Linear's weight.
        shard_groups: lay a ``groups=1`` layer's sharded sides out as those of a conv with
            this many groups, to pair with a grouped neighbour.
        checks: exchange a small record of the input before the data moves, so a mismatch
            raises on every rank instead of hanging: every call, or, inside a parallelized
            model whose root checked the forward, each new input signature's first call
            (default: ``MPGROUPS_CHECKS``, on unless ``0``; ``detail``: every call).
    """

    process_group: object
    input_layout: object
    output_layout: object
    split: str
    shard_groups: int | None
    checks: bool | None


class SharesProcessGroup:
    """Copies of a layer (``copy.copy``, ``copy.deepcopy``: an EMA's copy) are made as
    ``nn.Module`` makes its own, except that they share the layer's process group, which
    cannot be copied; pickling a layer that has one raises, since no group can travel to
    another process."""

    process_group: object

    def __copy__(self):
        twin = type(self).__new__(type(self))
        twin.__setstate__(self.__getstate__())
        return twin

    def __deepcopy__(self, memo):
        group = self.process_group
        if group is not None:
            memo[id(group)] = group
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return twin

    def __reduce_ex__(self, protocol):
        if self.process_group is not None:
            raise TypeError(NOT_PICKLABLE)
        return super().__reduce_ex__(protocol)


class ShardedLayer(SharesProcessGroup):
    """What the parallel layers share (they provide ``_nn_type``, ``_arguments``, ``shards``,
    ``state_guard``, ``weight`` and ``bias``): their part of a whole ``torch.nn`` layer's
    parameters (initialised, taken, gathered back), and copies that share the process group.
    """

    def _place(
        self,
        in_channels: int,
        out_channels: int,
        groups: int,
        channel_dims: tuple[int, ...],
        options: dict,
    ) -> None:
        """Apply the placement rule: rank, world size, ``shards``, the team's subgroup.

        ``options`` are the layer's :class:`LayerOptions`; ``channel_dims`` the input dims
        that hold its channels (what ``Shard(d)`` may name).
        """
        unknown = sorted(set(options) - LayerOptions.__optional_keys__)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword argument(s) {unknown}; it "
                f"takes {sorted(LayerOptions.__optional_keys__)} after the torch.nn arguments"
            )
        input_layout = layout_name(
            options.get("input_layout", "replicated"), "input_layout", channel_dims
        )
        output_layout = layout_name(
            options.get("output_layout", "replicated"), "output_layout", channel_dims
        )
        split = canonical_split(options.get("split", "colwise"))
        shard_groups = options.get("shard_groups")
        self.input_layout, self.output_layout = input_layout, output_layout
        self.split, self.shard_groups = split, shard_groups
        self._checks = options.get("checks")
        pg = resolve_process_group(options.get("process_group"))
        self.rank, self.world_size = rank_and_world_size(pg)
        self.shards = layer_shards(
            in_channels, out_channels, groups, self.world_size, self.rank, pg,
            split=split, shard_groups=shard_groups,
            input_layout=input_layout, output_layout=output_layout,
        )  # fmt: skip
        placement = self.shards.placement
        self._team_shards: ChannelShards | None = None
        if placement.filter_split:
            self._team_shards = self.shards.team(team_subgroup(pg, placement.team))
        self._communicates = communicates(placement, input_layout, output_layout)

    def _make_guards(self, config: tuple, channel_dim: int) -> None:
        """The checks of the layer's input and of its parameters' gathers."""
        pg, site, checks = self.process_group, self._name(), self._checks
        self.input_guard = InputGuard(site, config, pg, channel_dim=channel_dim, checks=checks)
        self.state_guard = InputGuard(
            f"{site} gathering its parameters", ("state", *config), pg, channel_dim=0,
            checks=checks,
        )  # fmt: skip

    def _make_parameters(self, weight_shape, bias: bool, device, dtype, init: bool) -> None:
        """``weight`` (this rank's part of ``weight_shape``) and ``bias`` (its output rows)."""
        shape = list(weight_shape)
        shards, dim = self.shards.weight
        shape[dim] = shards.widths[self.rank]
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if bias:
            rows = self.shards.outputs.widths[self.rank]
            self.bias = nn.Parameter(torch.empty(rows, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        if init:
            self.reset_parameters()

    @property
    def process_group(self):
        """The ``ProcessGroup`` the layer runs over, or ``None`` on a single device."""
        return self.shards.outputs.process_group

    @property
    def _mpgroups_tensor_shards(self) -> dict[str, tuple[ChannelShards, int]]:
        """``{name: (shards, dim)}``: how ``weight`` and ``bias`` split (see
        ``channel_modules.tensor_shards``)."""
        split = {"weight": self.shards.weight}
        if self.bias is not None:
            split["bias"] = (self.shards.outputs, 0)
        return split

    def reset_parameters(self) -> None:
        """Initialise as the ``torch.nn`` layer does on the full weight, then keep this rank's
        part: it builds the whole layer (which draws exactly the random numbers its
        ``__init__`` draws), so with the same seed every rank holds exactly its part of the
        single-device initialisation."""
        full = self._nn_type(*self._arguments(), device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            for name, (shards, dim) in self._mpgroups_tensor_shards.items():
                start, stop = shards.own
                target, whole = getattr(self, name), getattr(full, name)
                if isinstance(target, DTensor) and target.placements[0].is_replicate():
                    target.to_local().copy_(whole)  # held whole (uneven split): all rows
                else:
                    own_rows(target, shards, dim).copy_(whole.narrow(dim, start, stop - start))

    def _take_shards_of(self, module: nn.Module) -> None:
        """Copy this rank's part of ``module``'s parameters (the whole ``torch.nn`` layer)."""
        for name, (shards, dim) in self._mpgroups_tensor_shards.items():
            full = getattr(module, name)
            start, stop = shards.own
            part = full.detach().narrow(dim, start, stop - start).clone()
            setattr(self, name, nn.Parameter(part, requires_grad=full.requires_grad))
        self.train(module.training)

    def _to_full(self, nn_type: type[nn.Module]) -> nn.Module:
        full = nn_type(*self._arguments(), device="meta", dtype=self.weight.dtype)
        for name, local in (("weight", self.weight), ("bias", self.bias)):
            if local is not None:
                whole = self._gather(name).detach().clone()
                setattr(full, name, nn.Parameter(whole, requires_grad=local.requires_grad))
        full.train(self.training)
        return full

    def full_weight(self) -> Tensor:
        """The whole weight ``[C_out, C_in / G, *kernel_size]``, from every rank (collective)."""
        return self._gather("weight")

    def full_bias(self) -> Tensor | None:
        """The whole bias ``[C_out]`` from every rank (collective), or ``None`` without bias."""
        return None if self.bias is None else self._gather("bias")

    def _gather(self, name: str) -> Tensor:
        shards, dim = self._mpgroups_tensor_shards[name]
        local = own_rows(getattr(self, name), shards, dim)
        widths = shards.widths
        self.state_guard(
            local.movedim(dim, 0),
            problem=None,
            expected_channels=widths,
            channels_note=[f"its {w} of the full {name}'s {shards.total} along dim {dim}"
                           for w in widths],
        )  # fmt: skip
        return gather_rows(local, shards, dim=dim)


class ConvConversion(ShardedLayer):
    """``from_conv``/``to_conv`` for the group-parallel conv layers."""

    @classmethod
    def from_conv(
        cls, conv: nn.modules.conv._ConvNd, process_group=None, **options: Unpack[LayerOptions]
    ):
        """Shard an existing ``nn.ConvNd``: this rank keeps its part of the weight and bias.

        ``options`` as the constructor's (:class:`LayerOptions`). The new parameters are
        copies on ``conv``'s device and dtype, with its ``requires_grad``; ``conv`` itself is
        left as it was.
        """
        if type(conv) is not cls._nn_type:
            raise TypeError(
                f"{cls.__name__}.from_conv expects an {cls._nn_type.__name__}, "
                f"got {type(conv).__name__}"
            )
        layer = cls(
            *conv_arguments(conv),
            device="meta",
            dtype=conv.weight.dtype,
            process_group=process_group,
            _init_weights=False,
            **options,
        )
        layer._take_shards_of(conv)
        return layer

    def to_conv(self) -> nn.modules.conv._ConvNd:
        """The whole layer as a plain ``nn.ConvNd`` (a collective: every rank must call it)."""
        return self._to_full(self._nn_type)


def conv_arguments(conv) -> tuple:
    """``nn.ConvNd``'s positional arguments, from a ConvNd or a group-parallel layer."""
    return (
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )
