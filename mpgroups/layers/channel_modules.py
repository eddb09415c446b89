"""Per-channel modules on a channel shard, and the module that ends a sharded chain.

In a sharded chain (docs/design.md §3) each rank holds a contiguous slice of the channels. Modules
that act on each channel alone run unchanged on that slice:

* channel-agnostic modules (activations, pooling, ``nn.Flatten(start_dim=1)``) need nothing
  at all;
* dropout draws the whole tensor's mask and keeps its slice (:class:`ShardedDropout`);
* per-channel modules with state (BatchNorm, InstanceNorm, GroupNorm with whole norm groups
  on each rank) keep the rows of their parameters and buffers that belong to the slice:
  :func:`shard_channel_module` does that, in place, and :func:`unshard_channel_module` gathers
  them back.

A module whose state is split this way carries ``_mpgroups_row_shards``: every parameter and
buffer with at least one dimension holds the rows ``row_shards.own`` of the full tensor along
dim 0 (``num_batches_tracked`` and other scalars are the same on every rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.comm.checks import (
    BAD_CHANNELS,
    InputGuard,
    Problem,
    check_same_call,
    tensor_problem,
)
from mpgroups.comm.collectives import all_gather_channels, dense_order, gather_rows
from mpgroups.comm.process_groups import rank_and_world_size, resolve_process_group
from mpgroups.layers.dtensor_state import own_rows
from mpgroups.sharding.layout import ChannelShards, layout_shards

__all__ = [
    "CHANNEL_AGNOSTIC",
    "DROPOUTS",
    "NORMS",
    "GatherChannels",
    "ShardedDropout",
    "channel_shards",
    "is_channel_agnostic",
    "row_shards",
    "shard_channel_module",
    "tensor_shards",
    "unshard_channel_module",
]

# Modules that compute each channel from that channel alone and hold no per-channel state.
CHANNEL_AGNOSTIC: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,  # only with num_parameters=1, checked in is_channel_agnostic
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Per-channel modules with state that shard_channel_module runs on a channel shard.
NORMS: tuple[type[nn.Module], ...] = (*_BATCH_NORMS, *_INSTANCE_NORMS, nn.GroupNorm)


# Dropout draws a mask of its input's shape: on a shard it needs the whole tensor's mask
# (ShardedDropout), so it is not channel-agnostic.
DROPOUTS: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_DROPOUT_FUNCTIONS = {
    nn.Dropout: F.dropout,
    nn.Dropout1d: F.dropout1d,
    nn.Dropout2d: F.dropout2d,
    nn.Dropout3d: F.dropout3d,
}


def is_channel_agnostic(module: nn.Module) -> bool:
    """True when ``module`` gives the same result on a channel slice as on the whole tensor
    (for ``nn.Flatten(start_dim=1)``: the matching slice of the flattened features)."""
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1
    return isinstance(module, CHANNEL_AGNOSTIC)


def channel_shards(channels: int, groups: int, process_group=None) -> ChannelShards:
    """The sharded layout of ``channels`` channels for conv ``groups`` over ``process_group``
    (``None``: the default group, or a single rank)."""
    pg = resolve_process_group(process_group)
    rank, world_size = rank_and_world_size(pg)
    return layout_shards(channels, groups, world_size, rank, pg)


def row_shards(module: nn.Module) -> ChannelShards | None:
    """How ``module``'s state is split along dim 0, or ``None`` when it is whole."""
    return getattr(module, "_mpgroups_row_shards", None)


def tensor_shards(module: nn.Module) -> dict[str, tuple[ChannelShards, int]]:
    """``{name: (shards, dim)}`` for ``module``'s own parameters and buffers that are split
    over ranks: each rank holds the slice ``shards.own`` of the full tensor along ``dim``.

    A parallel layer says so itself (``_mpgroups_tensor_shards``); a module sharded by
    :func:`shard_channel_module` holds rows (dim 0) of every tensor with a dimension.
    """
    declared = getattr(module, "_mpgroups_tensor_shards", None)
    if declared is not None:
        return dict(declared)
    shards = row_shards(module)
    if shards is None:
        return {}
    named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return {name: (shards, 0) for name, t in named if t is not None and t.dim() >= 1}


def _num_channels(module: nn.Module) -> int:
    if isinstance(module, _BATCH_NORMS + _INSTANCE_NORMS):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    raise TypeError(
        f"{type(module).__name__} is not a per-channel module mpgroups can shard; supported: "
        f"BatchNorm, InstanceNorm, GroupNorm and channel-agnostic modules"
    )


def _set_channels(module: nn.Module, channels: int, norm_groups: int | None) -> None:
    if isinstance(module, nn.GroupNorm):
        module.num_channels = channels
        module.num_groups = norm_groups
    else:
        module.num_features = channels


def shard_channel_module(module: nn.Module, shards: ChannelShards) -> nn.Module:
    """Keep ``shards.own`` of ``module``'s per-channel parameters and buffers, in place.

    Parameters stay parameters (new tensors, same ``requires_grad``); ``training`` is kept.
    A channel-agnostic module is returned unchanged.

    Raises:
        ValueError: the module's channel count is not ``shards.total``, or (GroupNorm) a
            shard boundary falls inside a norm group.
    """
    if is_channel_agnostic(module):
        return module
    channels = _num_channels(module)
    if channels != shards.total:
        raise ValueError(
            f"{type(module).__name__} has {channels} channels but the sharded activation "
            f"it receives has {shards.total}"
        )
    start, stop = shards.own
    norm_groups = None
    if isinstance(module, nn.GroupNorm):
        per_group = channels // module.num_groups
        bad = [a for a, _ in shards.slices if a % per_group]
        if bad:
            raise ValueError(
                f"GroupNorm({module.num_groups}, {channels}) cannot run on channel shards "
                f"{list(shards.slices)}: shard boundaries {bad} fall inside a norm group of "
                f"{per_group} channels"
            )
        norm_groups = (stop - start) // per_group
    with torch.no_grad():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 1:
                local = nn.Parameter(param[start:stop].clone(), requires_grad=param.requires_grad)
                setattr(module, name, local)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.dim() >= 1:
                setattr(module, name, buffer[start:stop].clone())
    module._mpgroups_full_norm_groups = getattr(module, "num_groups", None)
    _set_channels(module, stop - start, norm_groups)
    module._mpgroups_row_shards = shards
    return module


def unshard_channel_module(module: nn.Module) -> nn.Module:
    """Gather the whole state back onto every rank, in place (a collective)."""
    shards = row_shards(module)
    if shards is None:
        return module
    state = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    layout = tuple((name, tuple(t.shape[1:])) for name, t in state if t is not None)
    check_same_call(
        f"unsharding {type(module).__name__}", (shards.total, layout), shards.process_group
    )
    with torch.no_grad():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() >= 1:
                full = gather_rows(own_rows(param, shards, 0), shards)
                setattr(module, name, nn.Parameter(full, requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.dim() >= 1:
                setattr(module, name, gather_rows(own_rows(buffer, shards, 0), shards))
    _set_channels(module, shards.total, module._mpgroups_full_norm_groups)
    del module._mpgroups_row_shards, module._mpgroups_full_norm_groups
    return module


class ShardedDropout(nn.Module):
    """``nn.Dropout`` (or ``Dropout1d/2d/3d``) on an activation sharded along dim 1.

    Draws the mask of the *whole* tensor from the RNG, exactly as the single-device module
    would (same call, same shape, same generator), and keeps this rank's slice of it: with
    the same seed on every rank, a run at any P drops exactly what one device drops. The
    shard may be of channels or of the flattened features of channels (``nn.Flatten``
    before it): the slice is scaled by ``x.shape[1] / own channels``. Costs one mask of the
    whole tensor per call on every rank.
    """

    def __init__(self, dropout: nn.Module, shards: ChannelShards) -> None:
        super().__init__()
        if type(dropout) not in _DROPOUT_FUNCTIONS:
            raise TypeError(f"ShardedDropout wraps {DROPOUTS}, got {type(dropout).__name__}")
        if 0 in shards.widths:
            raise ValueError(
                f"dropout on channel shards {list(shards.slices)}: every rank must hold at "
                f"least one channel"
            )
        self.kind = type(dropout)
        self.p, self.inplace = dropout.p, dropout.inplace
        self.shards = shards
        self.train(dropout.training)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        start, stop = self.shards.own
        scale, rest = divmod(x.shape[1], stop - start)
        if rest:
            raise ValueError(
                f"ShardedDropout: input of shape {tuple(x.shape)} is not a shard of channels "
                f"{start}..{stop} of {self.shards.total} (nor of their flattened features)"
            )
        shape = (x.shape[0], self.shards.total * scale, *x.shape[2:])
        # Laid out as the whole tensor is (a channels_last shard: channels_last), since the
        # mask is drawn in memory order.
        ones = torch.empty_permuted(shape, dense_order(x), dtype=x.dtype, device=x.device)
        ones.fill_(1)
        mask = _DROPOUT_FUNCTIONS[self.kind](ones, self.p, True)
        # A copy of this rank's part: the product saves its mask for backward, and a view
        # would keep the whole tensor's mask alive.
        keep = torch.empty_like(x).copy_(mask.narrow(1, start * scale, (stop - start) * scale))
        return x.mul_(keep) if self.inplace else x * keep

    def to_dropout(self) -> nn.Module:
        """The plain ``torch.nn`` dropout module this one stands for."""
        dropout = self.kind(self.p, self.inplace)
        dropout.train(self.training)
        return dropout

    def extra_repr(self) -> str:
        return f"{self.kind.__name__}(p={self.p}), shard={self.shards.own} of {self.shards.total}"


class GatherChannels(nn.Module):
    """End of a sharded chain: ``[N, c_r, *spatial]`` shards → ``[N, C, *spatial]`` on every rank.

    Forward: all-gather along channels; backward: take own slice (docs/design.md §4). The layout is
    that of ``channels`` channels for conv ``groups`` over ``process_group``.
    """

    def __init__(
        self, channels: int, groups: int, *, process_group=None, checks: bool | None = None
    ) -> None:
        super().__init__()
        self._setup(channel_shards(channels, groups, process_group), groups, checks)

    @classmethod
    def from_shards(cls, shards: ChannelShards, checks: bool | None = None) -> GatherChannels:
        """A gather for an existing layout (``groups`` is then ``None``)."""
        gather = cls.__new__(cls)
        nn.Module.__init__(gather)
        gather._setup(shards, None, checks)
        return gather

    def _setup(self, shards: ChannelShards, groups: int | None, checks: bool | None) -> None:
        self.shards = shards
        self.channels = shards.total
        self.groups = groups
        site = f"GatherChannels({self.channels}, groups={groups})"
        self.input_guard = InputGuard(
            site, ("GatherChannels", shards.slices), shards.process_group, checks=checks
        )

    def forward(self, x: Tensor) -> Tensor:
        shards = self.shards
        start, stop = shards.own
        self.input_guard(
            x,
            problem=_shard_problem(x, start, stop, self.channels),
            expected_channels=shards.widths,
            channels_note=[f"shard {a}..{b} of {self.channels}" for a, b in shards.slices],
        )
        return all_gather_channels(x, shards)

    def extra_repr(self) -> str:
        return f"{self.channels}, groups={self.groups}, shard={self.shards.own}"


def _shard_problem(x, start: int, stop: int, channels: int) -> Problem | None:
    expects = f"a channel shard [N, {stop - start}, ...] (channels {start}..{stop} of {channels})"
    problem = tensor_problem(x, expects, 2)
    if problem is None and x.shape[1] != stop - start:
        return BAD_CHANNELS, f"expects {expects}, got shape {tuple(x.shape)}"
    return problem
