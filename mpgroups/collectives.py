"""Channel collectives as autograd functions. The only module that calls ``torch.distributed``
collectives.

A channel dimension split over a process group is described by :class:`ChannelShards`: one
``(start, stop)`` slice per rank of the group, contiguous and in rank order, possibly uneven
(even empty). Uneven shards are padded to the widest for the collective and trimmed after,
since gloo has no all-gather of uneven sizes; the padding counts as sent in
:class:`~mpgroups.counter.CommCounter`.

Every function is the identity (or a plain slice) on a group of one rank and issues no
collective there. Each public function is an autograd function whose backward is the dual
collective; the one-line summary of each says which.

Gradient convention: a replicated tensor's gradient is the complete gradient on every rank;
a sharded tensor's gradient is the complete gradient of the shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from mpgroups.counter import counted, record
from mpgroups.groups import resolve_process_group
from mpgroups.placement import Slice, shard_slice

__all__ = [
    "ChannelShards",
    "all_gather_channels",
    "all_gather_channels_partial",
    "all_gather_records",
    "all_ranks_agree",
    "barrier",
    "broadcast_ints",
    "broadcast_tensors_",
    "channel_shards",
    "gather_channels",
    "gather_rows",
    "reduce_scatter_channels",
    "scatter_channels",
    "slice_channels",
    "slice_group_channels",
]

# torch 2.13 renamed the single-tensor collectives; 2.11 has only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# Dtypes as small integers in the metadata records ranks exchange (index = code).
WIRE_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_MAX_DIMS = 8


@dataclass(frozen=True, eq=False)
class ChannelShards:
    """How one tensor dimension is split over a process group.

    Attributes:
        group: the process group, or ``None`` for a single rank.
        slices: ``(start, stop)`` per rank of ``group``, starting at 0, contiguous, in rank order.
        rank: this process's rank in ``group``.
    """

    group: dist.ProcessGroup | None
    slices: tuple[Slice, ...]
    rank: int

    def __post_init__(self) -> None:
        if self.slices[0][0] != 0 or any(
            a[1] != b[0] for a, b in zip(self.slices, self.slices[1:], strict=False)
        ):
            raise ValueError(f"shard slices must be contiguous from 0, got {self.slices}")

    @property
    def world_size(self) -> int:
        return len(self.slices)

    @property
    def own(self) -> Slice:
        return self.slices[self.rank]

    @property
    def total(self) -> int:
        return self.slices[-1][1]

    @property
    def widths(self) -> list[int]:
        return [stop - start for start, stop in self.slices]

    @classmethod
    def relative(cls, group, slices, rank: int) -> ChannelShards:
        """Shards from absolute slices, renumbered to start at 0."""
        offset = slices[0][0]
        return cls(group, tuple((a - offset, b - offset) for a, b in slices), rank)


def _take(x: Tensor, shards: ChannelShards, dim: int) -> Tensor:
    start, stop = shards.own
    return x.narrow(dim, start, stop - start)


# A custom Function must return neither a view nor one of its inputs: the caller's in-place
# ops on the result (``relu_``, ``mul_``) would then be refused by autograd. So the forwards
# below return slices as copies, and receive buffers whole or as trimmed copies.


def _own_slice(x: Tensor, start: int, width: int, dim: int) -> Tensor:
    """``x.narrow(dim, start, width)`` as a contiguous tensor of its own."""
    return x.narrow(dim, start, width).clone(memory_format=torch.contiguous_format)


def _trimmed(buffer: Tensor, width: int, dim: int) -> Tensor:
    """The first ``width`` entries of a padded receive buffer: the buffer itself when whole."""
    return buffer if buffer.shape[dim] == width else _own_slice(buffer, 0, width, dim)


def _padded(x: Tensor, width: int, dim: int) -> Tensor:
    """``x`` widened to ``width`` along ``dim`` with zeros, contiguous."""
    if x.shape[dim] == width:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = width
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


def _all_gather(x: Tensor, shards: ChannelShards, dim: int) -> Tensor:
    """Concatenate every rank's shard along ``dim``; the result is the full tensor."""
    if shards.world_size == 1:
        return x
    widths = shards.widths
    if x.shape[dim] != widths[shards.rank]:
        raise ValueError(
            f"rank {shards.rank} holds {x.shape[dim]} entries along dim {dim}, its shard "
            f"{shards.own} has {widths[shards.rank]}"
        )
    width = max(widths)
    send = _padded(x, width, dim)
    recv = send.new_empty((shards.world_size, *send.shape))
    with counted("all_gather", shards.world_size, recv.numel() * recv.element_size()):
        _all_gather_single(recv.view(-1), send.view(-1), group=shards.group)
    # One copy from [P, ..., width, ...] into the full tensor, trimming the padding.
    return torch.cat([recv[r].narrow(dim, 0, w) for r, w in enumerate(widths)], dim=dim)


def _reduce_scatter(x: Tensor, shards: ChannelShards, dim: int) -> Tensor:
    """Sum the full-width ``x`` over ranks; each rank keeps its own shard of the sum."""
    if shards.world_size == 1:
        return x
    if x.shape[dim] != shards.total:
        raise ValueError(
            f"reduce-scatter expects {shards.total} entries along dim {dim}, got {x.shape[dim]}"
        )
    width = max(shards.widths)
    send = torch.stack([_padded(x.narrow(dim, a, b - a), width, dim) for a, b in shards.slices])
    recv = send.new_empty(send.shape[1:])
    with counted("reduce_scatter", shards.world_size, send.numel() * send.element_size()):
        _reduce_scatter_single(recv.view(-1), send.view(-1), group=shards.group)
    return _trimmed(recv, shards.widths[shards.rank], dim)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shards, dim, partial_consumer):
        ctx.shards, ctx.dim, ctx.partial_consumer = shards, dim, partial_consumer
        return _all_gather(x, shards, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial_consumer:
            return _reduce_scatter(grad, ctx.shards, ctx.dim), None, None, None
        return _take(grad, ctx.shards, ctx.dim).contiguous(), None, None, None


class _Slice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shards, dim):
        ctx.shards, ctx.dim = shards, dim
        start, stop = shards.own
        return _own_slice(x, start, stop - start, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad.contiguous(), ctx.shards, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shards, dim):
        ctx.shards, ctx.dim = shards, dim
        return _reduce_scatter(x, shards, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad.contiguous(), ctx.shards, ctx.dim), None, None


class _SliceGroupChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, team_shards, shards, dim):
        ctx.block, ctx.team_shards, ctx.shards, ctx.dim = block, team_shards, shards, dim
        return _own_slice(x, block[0], block[1] - block[0], dim)

    @staticmethod
    def backward(ctx, grad):
        own_piece = _reduce_scatter(grad.contiguous(), ctx.team_shards, ctx.dim)
        return _all_gather(own_piece, ctx.shards, ctx.dim), None, None, None, None


def all_gather_channels(x: Tensor, shards: ChannelShards, dim: int = 1) -> Tensor:
    """Forward: all-gather the shards along ``dim``; backward: take own slice.

    For a result that every rank consumes identically (a replicated activation).
    ``x`` is this rank's shard ``[N, c_r, *spatial]``; the result is ``[N, C, *spatial]``.
    """
    if shards.world_size == 1:
        return x
    return _AllGather.apply(x, shards, dim, False)


def all_gather_channels_partial(x: Tensor, shards: ChannelShards, dim: int = 1) -> Tensor:
    """Forward: all-gather the shards along ``dim``; backward: reduce-scatter.

    For a result that each rank consumes differently (each computes a partial gradient of
    it), as the members of a filter-split team do with their group's input channels.
    """
    if shards.world_size == 1:
        return x
    return _AllGather.apply(x, shards, dim, True)


def slice_channels(x: Tensor, shards: ChannelShards, dim: int = 1) -> Tensor:
    """Forward: take own slice of a replicated ``x``; backward: all-gather the slices' grads."""
    if shards.world_size == 1:
        return x
    return _Slice.apply(x, shards, dim)


def reduce_scatter_channels(x: Tensor, shards: ChannelShards, dim: int = 1) -> Tensor:
    """Forward: sum ``x`` over ranks and keep own shard; backward: all-gather."""
    if shards.world_size == 1:
        return x
    return _ReduceScatter.apply(x, shards, dim)


def slice_group_channels(
    x: Tensor, block: Slice, team_shards: ChannelShards, shards: ChannelShards, dim: int = 1
) -> Tensor:
    """Forward: take the channels ``block`` that a whole team reads, with no communication;
    backward: sum the team's partial grads (reduce-scatter within the team), then all-gather
    the summed pieces over the whole group.

    Args:
        x: replicated ``[N, C, *spatial]``.
        block: ``(start, stop)`` channels of this rank's conv group.
        team_shards: how ``block`` splits over the team (relative to ``block``).
        shards: how all ``C`` channels split over the group (the sharded layout).
    """
    return _SliceGroupChannels.apply(x, block, team_shards, shards, dim)


def _comm_device(process_group: dist.ProcessGroup) -> torch.device:
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_meta(
    x: Tensor | None, src: int, process_group
) -> tuple[torch.Size, torch.dtype, bool]:
    """Send ``x``'s shape, dtype and ``requires_grad`` from group rank ``src`` to every rank."""
    meta = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64, device=_comm_device(process_group))
    if dist.get_rank(process_group) == src:
        if x is None or x.dim() > _MAX_DIMS:
            raise ValueError(
                f"rank {src} must pass a tensor of at most {_MAX_DIMS} dims to scatter"
            )
        values = [x.dim(), WIRE_DTYPES.index(x.dtype), int(x.requires_grad), *x.shape]
        meta[: len(values)] = torch.tensor(values)
    record("broadcast", process_group.size(), meta.numel() * meta.element_size(), kind="meta")
    dist.broadcast(meta, group=process_group, group_src=src)
    ndim, dtype_index, requires_grad = meta[:3].tolist()
    return torch.Size(meta[3 : 3 + ndim].tolist()), WIRE_DTYPES[dtype_index], bool(requires_grad)


def channel_shards(channels: int, groups: int, process_group=None) -> ChannelShards:
    """The sharded layout of ``channels`` channels for conv ``groups`` (DESIGN §3).

    ``process_group`` as for the layers (``None``: the default group, or one rank).
    """
    pg = resolve_process_group(process_group)
    world_size = 1 if pg is None else pg.size()
    rank = 0 if pg is None else dist.get_rank(pg)
    slices = tuple(shard_slice(channels, groups, world_size, r) for r in range(world_size))
    return ChannelShards(pg, slices, rank)


def _scatter_from(
    x: Tensor | None, shards: ChannelShards, src: int, shape, dtype, device
) -> Tensor:
    """Scatter ``x`` (whole, on group rank ``src``) along dim 1; every rank gets its shard."""
    width = max(shards.widths)
    recv = torch.empty((shape[0], width, *shape[2:]), dtype=dtype, device=device)
    chunks = None
    if shards.rank == src:
        x = x.contiguous()
        chunks = [_padded(x.narrow(1, a, b - a), width, 1) for a, b in shards.slices]
    nbytes = recv.numel() * recv.element_size() * shards.world_size
    with counted("scatter", shards.world_size, nbytes):
        dist.scatter(recv, chunks, group=shards.group, group_src=src)
    return _trimmed(recv, shards.widths[shards.rank], 1)


class _ScatterFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shards, src, shape, dtype, device):
        ctx.shards, ctx.src = shards, src
        return _scatter_from(x, shards, src, shape, dtype, device)

    @staticmethod
    def backward(ctx, grad):
        full = _gather_to(grad.contiguous(), ctx.shards, ctx.src)
        return full, None, None, None, None, None


def _gather_to(x: Tensor, shards: ChannelShards, dst: int) -> Tensor:
    """Gather shards along dim 1 onto group rank ``dst``; other ranks get an empty tensor."""
    width = max(shards.widths)
    send = _padded(x, width, 1)
    recv = None
    if shards.rank == dst:
        recv = [torch.empty_like(send) for _ in range(shards.world_size)]
    nbytes = send.numel() * send.element_size() * shards.world_size
    with counted("gather", shards.world_size, nbytes):
        dist.gather(send, recv, group=shards.group, group_dst=dst)
    if shards.rank != dst:
        return x.new_empty(0)
    return torch.cat([r.narrow(1, 0, w) for r, w in zip(recv, shards.widths, strict=True)], dim=1)


class _GatherTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shards, dst):
        ctx.shards, ctx.dst = shards, dst
        ctx.shape = (x.shape[0], None, *x.shape[2:])
        return _gather_to(x, shards, dst)

    @staticmethod
    def backward(ctx, grad):
        shard = _scatter_from(grad, ctx.shards, ctx.dst, ctx.shape, grad.dtype, grad.device)
        return shard, None, None


def scatter_channels(x: Tensor | None, src: int = 0, *, groups: int, process_group=None) -> Tensor:
    """Forward: rank ``src`` sends each rank its channel shard; backward: gather onto ``src``.

    Args:
        x: ``[N, C, *spatial]`` on group rank ``src``; ignored (may be ``None``) elsewhere.
        src: the holding rank, numbered within ``process_group``.
        groups: conv groups that define the sharded layout (see ``placement.shard_slice``).
        process_group: ``ProcessGroup``, 1-D ``DeviceMesh`` or ``None`` (default group).

    Returns:
        This rank's shard ``[N, c_r, *spatial]`` in the sharded layout. Shape, dtype and
        ``requires_grad`` come from ``src`` (one small broadcast). When ``x`` requires grad,
        every rank must run backward through the result.
    """
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return x
    shape, dtype, requires_grad = _broadcast_meta(x, src, pg)
    shards = channel_shards(shape[1], groups, pg)
    if shards.rank != src:
        # A leaf that requires grad on non-source ranks keeps them in the backward gather.
        x = torch.empty(0, dtype=dtype, device=_comm_device(pg), requires_grad=requires_grad)
    return _ScatterFrom.apply(x, shards, src, shape, dtype, x.device)


def gather_channels(
    x: Tensor, dst: int | None = None, *, groups: int, process_group=None
) -> Tensor:
    """Forward: gather channel shards into the whole tensor; backward: the dual scatter.

    ``dst=None``: every rank gets ``[N, C, *spatial]`` (all-gather; backward takes own slice).
    ``dst=r``: only group rank ``r`` gets it, the others an empty tensor (gather; backward
    scatters ``r``'s gradient, so every rank must run backward through the result).

    Args:
        x: this rank's shard ``[N, c_r, *spatial]`` of the sharded layout for ``groups``.
    """
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return x
    from mpgroups import validation  # validation builds on this module

    rank = dist.get_rank(pg)
    if validation.checks_enabled():

        def layout(sent: list[int]) -> list[int]:
            return channel_shards(sum(sent), groups, pg).widths

        records = validation.check_across_ranks(
            x,
            process_group=pg,
            rank=rank,
            layer=f"gather_channels(groups={groups}, dst={dst})",
            layer_id=validation.fingerprint("gather_channels", groups, dst),
            call=0,
            problem=None
            if x.dim() >= 2
            else (validation.BAD_DIMS, f"expects [N, C, ...], got shape {tuple(x.shape)}"),
            channel_dim=1,
            expected_channels=layout,
            channels_note=lambda sent: [f"the sharded layout of {sum(sent)} channels"] * len(sent),
        )
        total = sum(validation.channel_counts(records))
    else:
        channels = torch.tensor([x.shape[1]], dtype=torch.int64, device=_comm_device(pg))
        record("all_reduce", pg.size(), channels.element_size(), kind="meta")
        dist.all_reduce(channels, group=pg)
        total = int(channels.item())
    shards = channel_shards(total, groups, pg)
    if x.shape[1] != shards.widths[rank]:
        raise ValueError(
            f"rank {rank} holds {x.shape[1]} channels; the sharded layout of "
            f"{shards.total} channels with groups={groups} gives it {shards.widths[rank]}"
        )
    if dst is None:
        return all_gather_channels(x, shards)
    return _GatherTo.apply(x, shards, dst)


def gather_rows(x: Tensor, shards: ChannelShards, dst: int | None = None) -> Tensor | None:
    """The whole tensor from each rank's rows ``shards.own`` of dim 0 (no autograd).

    For state: parameters, buffers, gradients. ``dst=None``: every rank gets it; otherwise
    only group rank ``dst`` does, the others get ``None``.
    """
    if shards.world_size == 1:
        return x
    rows = x.detach().reshape(1, x.shape[0], -1)
    with torch.no_grad():
        if dst is None:
            whole = _all_gather(rows, shards, 1)
        else:
            whole = _gather_to(rows.contiguous(), shards, dst)
            if shards.rank != dst:
                return None
    return whole.reshape(shards.total, *x.shape[1:])


def barrier(process_group=None) -> None:
    """Wait until every rank of the group arrives (no-op without a group)."""
    pg = resolve_process_group(process_group)
    if pg is not None and pg.size() > 1:
        record("barrier", pg.size(), 0, kind="meta")
        dist.barrier(group=pg)


def broadcast_tensors_(tensors: list[Tensor], process_group=None, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with group rank ``src``'s values (one call per dtype)."""
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1 or not tensors:
        return
    by_kind: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for same in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            with counted("broadcast", pg.size(), flat.numel() * flat.element_size()):
                dist.broadcast(flat, group=pg, group_src=src)
            offset = 0
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def all_ranks_agree(flag: bool, process_group=None) -> bool:
    """``True`` on every rank when ``flag`` is true on every rank (one tiny all-reduce)."""
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device(pg))
    record("all_reduce", pg.size(), value.element_size(), kind="meta")
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=pg)
    return bool(value.item())


def broadcast_ints(values: list[int], process_group=None, src: int = 0) -> list[int]:
    """Group rank ``src``'s list of integers, on every rank (two tiny broadcasts)."""
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return list(values)
    device = _comm_device(pg)
    length = torch.tensor([len(values)], dtype=torch.int64, device=device)
    record("broadcast", pg.size(), length.element_size(), kind="meta")
    dist.broadcast(length, group=pg, group_src=src)
    data = torch.zeros(int(length.item()), dtype=torch.int64, device=device)
    if dist.get_rank(pg) == src:
        data.copy_(torch.tensor(values, dtype=torch.int64))
    record("broadcast", pg.size(), data.numel() * data.element_size(), kind="meta")
    dist.broadcast(data, group=pg, group_src=src)
    return data.tolist()


def all_gather_records(values: Tensor, process_group) -> Tensor:
    """``[P, K]``: every rank's int64 ``values`` of length ``K`` (one tiny all-gather)."""
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return values.unsqueeze(0)
    send = values.to(_comm_device(pg))
    recv = send.new_empty((pg.size(), send.numel()))
    with counted("all_gather", pg.size(), recv.numel() * recv.element_size(), kind="meta"):
        _all_gather_single(recv.view(-1), send, group=pg)
    return recv.cpu()
