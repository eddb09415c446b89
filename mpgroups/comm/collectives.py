"""Channel collectives as autograd functions. The only module that calls ``torch.distributed``
collectives.

A channel dimension split over a process group is described by
:class:`~mpgroups.sharding.layout.ChannelShards`. Uneven shards are padded to the widest for the
collective and trimmed after, since gloo has no all-gather of uneven sizes; the padding counts
as sent in :class:`~mpgroups.comm.counter.CommCounter`.

The autograd collectives (``all_gather_channels``, ``all_gather_channels_partial``,
``slice_channels``) are the identity on a group of one rank; callers of the others only call
them with more than one rank. Each wraps a private ``autograd.Function`` whose backward applies
the dual Function (gather ↔ slice, all-gather ↔ reduce-scatter, scatter ↔ gather), so backward
is itself differentiable and higher-order gradients (``create_graph=True``) are those of the
single-device op. The functions without autograd (``gather_rows``, ``broadcast_*``, the
records) move state and metadata.

Gradient convention: a replicated tensor's gradient is the complete gradient on every rank;
a sharded tensor's gradient is the complete gradient of the shard.

Memory format: results keep the physical dimension order of their input (a channels_last
activation gives a channels_last result), as ``nn.Conv2d`` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from mpgroups.comm.counter import counted, record
from mpgroups.sharding.layout import ChannelShards
from mpgroups.sharding.placement import Slice

# torch.compiler.disable, importing torch._dynamo on the first call rather than at import (it
# takes about a third of `import mpgroups` and a process that never compiles never needs it).
outside_graphs = getattr(torch, "_disable_dynamo", torch.compiler.disable)

__all__ = [
    "META_DIMS",
    "WIRE_DTYPES",
    "TensorMeta",
    "all_gather_channels",
    "all_gather_channels_partial",
    "all_gather_records",
    "all_ranks_agree",
    "all_reduce_sum",
    "barrier",
    "broadcast_ints",
    "broadcast_meta",
    "broadcast_tensors_",
    "outside_graphs",
    "comm_device",
    "copy_to_ranks",
    "copy_to_ranks_together",
    "dense_order",
    "gather_channels_to",
    "gather_rows",
    "issued",
    "gather_to",
    "scatter_channels_from",
    "scatter_from",
    "settle_first",
    "settle_pending",
    "slice_channels",
    "slice_group_channels",
    "reduce_scatter_channels",
    "start_all_gather_records",
    "start_all_reduce",
    "sum_over_ranks",
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
META_DIMS = 8  # at most this many dims in a tensor broadcast_meta describes


# --- Layout helpers. A custom Function must return neither a view nor one of its inputs (the
# caller's in-place ops on the result, ``relu_``, would be refused), so every result below is
# a fresh tensor, allocated in its input's physical dimension order.


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _dense_order(x: Tensor) -> tuple[int, ...]:
    """The order in which to lay out a result computed from ``x``: ``(0, 2, 3, 1)`` when ``x``
    is channels_last (``(0, 2, 3, 4, 1)`` in 3-D), else the identity.

    As ``suggest_memory_format`` decides: from the order of the strides, so a channel slice
    of a channels_last tensor (a view with gaps) counts as channels_last too. With one
    channel both layouts can be contiguous; then channels_last puts stride 1 on the channel.
    """
    identity = tuple(range(x.dim()))
    if x.dim() not in (4, 5):
        return identity
    last = (0, *range(2, x.dim()), 1)
    if x.is_contiguous():
        one_channel_last = x.shape[1] == 1 and x.stride(1) == 1 and x.shape[2:].numel() > 1
        return last if one_channel_last else identity
    # Innermost first: channels, then the spatial dims from the last, then the batch.
    inner_to_outer = [d for d in reversed(last) if x.shape[d] > 1]
    strides = [x.stride(d) for d in inner_to_outer]
    if len(strides) > 1 and inner_to_outer[0] == 1 and strides == sorted(strides):
        return last
    return identity


dense_order = _dense_order  # public: modules that allocate results laid out as their input


def _empty_like_order(shape, order, like: Tensor) -> Tensor:
    return torch.empty_permuted(shape, order, dtype=like.dtype, device=like.device)


def _narrow_copy(x: Tensor, start: int, width: int, dim: int, order: tuple[int, ...]) -> Tensor:
    """``x.narrow(dim, start, width)`` as a tensor of its own, laid out in ``order``."""
    piece = x.narrow(dim, start, width)
    return _empty_like_order(piece.shape, order, x).copy_(piece)


def _own_slice(x: Tensor, start: int, width: int, dim: int) -> Tensor:
    """``x.narrow(dim, start, width)`` as a tensor of its own, in ``x``'s memory format."""
    return _narrow_copy(x, start, width, dim, _dense_order(x))


def _trimmed(buffer: Tensor, width: int, dim: int, order: tuple[int, ...]) -> Tensor:
    """The first ``width`` entries of a padded receive buffer along ``dim``, laid out in
    ``order``: the buffer itself when it is whole and already in that order."""
    if buffer.shape[dim] == width and order == tuple(range(buffer.dim())):
        return buffer
    return _narrow_copy(buffer, 0, width, dim, order)


def _padded(x: Tensor, width: int, dim: int) -> Tensor:
    """``x`` widened to ``width`` along ``dim`` with zeros, contiguous."""
    if x.shape[dim] == width:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = width
    out = x.new_zeros(shape)
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


# --- The collectives on plain tensors (no autograd).


def _all_gather(x: Tensor, shards: ChannelShards, dim: int) -> Tensor:
    """Concatenate every rank's shard along ``dim``; the result is the full tensor.

    On the wire every shard is contiguous (ranks need not agree on memory formats); the
    result is assembled in ``x``'s memory format.
    """
    widths = shards.widths
    if x.shape[dim] != widths[shards.rank]:
        raise ValueError(
            f"rank {shards.rank} holds {x.shape[dim]} entries along dim {dim}, its shard "
            f"{shards.own} has {widths[shards.rank]}"
        )
    send = _padded(x, max(widths), dim)
    recv = send.new_empty((shards.world_size, *send.shape))
    with _issued("all_gather", shards.world_size, recv.numel() * recv.element_size()):
        _all_gather_single(recv.view(-1), send.view(-1), group=shards.process_group)
    return _assemble(recv, shards, dim, x)


def _assemble(received, shards: ChannelShards, dim: int, like: Tensor) -> Tensor:
    """The full tensor from each rank's padded piece ``received[r]``, laid out as ``like``."""
    shape = list(like.shape)
    shape[dim] = shards.total
    whole = _empty_like_order(shape, _dense_order(like), like)
    for r, (start, stop) in enumerate(shards.slices):
        whole.narrow(dim, start, stop - start).copy_(received[r].narrow(dim, 0, stop - start))
    return whole


def _reduce_scatter(x: Tensor, shards: ChannelShards, dim: int) -> Tensor:
    """Sum the full-width ``x`` over ranks; each rank keeps its own shard of the sum, in
    ``x``'s memory format (contiguous on the wire)."""
    if x.shape[dim] != shards.total:
        raise ValueError(
            f"reduce-scatter expects {shards.total} entries along dim {dim}, got {x.shape[dim]}"
        )
    width = max(shards.widths)
    send = torch.stack([_padded(x.narrow(dim, a, b - a), width, dim) for a, b in shards.slices])
    recv = send.new_empty(send.shape[1:])
    with _issued("reduce_scatter", shards.world_size, send.numel() * send.element_size()):
        _reduce_scatter_single(recv.view(-1), send.view(-1), group=shards.process_group)
    return _trimmed(recv, shards.widths[shards.rank], dim, _dense_order(x))


# Input checks in flight (a model's root check), to settle before the next collective.
_settle_first: list[Callable[[], None]] = []


@contextmanager
def _issued(op: str, group_size: int, nbytes: int, kind: str = "data") -> Iterator[None]:
    """Around every collective of this module: a check still in flight settles first (it
    raises before any data moves), then the collective is counted."""
    if _settle_first:
        # In a graph compiled apart from its model's root (a compiled block of an eager
        # model), this leaves the graph to settle; torch.compile guards on the list, so a
        # graph traced with none in flight stays whole.
        _settle_outside_graph() if torch.compiler.is_compiling() else settle_pending()
    with counted(op, group_size, nbytes, kind):
        yield


issued = _issued  # public: the other communication modules' collectives are counted alike


@outside_graphs
def _settle_outside_graph() -> None:
    settle_pending()


def _all_reduce(x: Tensor, process_group) -> Tensor:
    """The sum of every rank's ``x``, as a fresh tensor in ``x``'s memory format (dense on
    the wire: the buffer is reduced as one flat run of memory)."""
    order = _dense_order(x)
    total = _empty_like_order(x.shape, order, x).copy_(x)
    with _issued("all_reduce", process_group.size(), total.numel() * total.element_size()):
        dist.all_reduce(total.permute(order).view(-1), group=process_group)
    return total


def start_all_reduce(x: Tensor, process_group) -> Callable[[], Tensor]:
    """Start the sum of every rank's ``x`` (as :func:`all_reduce_sum`'s forward, no autograd)
    and return at once; the function returned waits for it and returns the sum. ``x`` is
    summed in place when it is dense (a fresh gradient the caller owns), else copied first.
    The collective is counted when it is waited for, with the time spent launching and
    waiting: what the caller did not hide."""
    settle_pending()
    started = time.perf_counter()
    order = _dense_order(x)
    total = x if x.permute(order).is_contiguous() else _empty_like_order(x.shape, order, x)
    if total is not x:
        total.copy_(x)
    work = dist.all_reduce(total.permute(order).view(-1), group=process_group, async_op=True)
    launch = time.perf_counter() - started

    def wait() -> Tensor:
        begun = time.perf_counter()
        work.wait()
        seconds = launch + time.perf_counter() - begun
        nbytes = total.numel() * total.element_size()
        record("all_reduce", process_group.size(), nbytes, seconds=seconds)
        return total

    return wait


def comm_device(process_group: dist.ProcessGroup, like: Tensor | None = None) -> torch.device:
    """Where a collective's own small buffers live: the device the group is bound to; for
    NCCL unbound, the GPU of ``like`` (the tensor the collective is about), else the current
    CUDA device; the CPU for gloo."""
    bound = getattr(process_group, "bound_device_id", None)
    if bound is not None:
        return bound
    if dist.get_backend(process_group) == "nccl":
        if like is not None and like.is_cuda:
            return like.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TensorMeta(NamedTuple):
    """What ranks other than a tensor's holder need to receive a shard of it."""

    shape: torch.Size
    dtype: torch.dtype
    requires_grad: bool  # a backward through it is recorded on the holder
    order: tuple[int, ...]  # its memory layout (see _dense_order)


def scatter_from(
    x: Tensor | None, shards: ChannelShards, src: int, meta: TensorMeta, device, dim: int = 1
):
    """Scatter ``x`` (whole, on group rank ``src``) along ``dim``; every rank gets its shard,
    laid out as ``x`` is (contiguous on the wire)."""
    width = max(shards.widths)
    shape = list(meta.shape)
    shape[dim] = width
    recv = torch.empty(shape, dtype=meta.dtype, device=device)
    chunks = None
    if shards.rank == src:
        chunks = [_padded(x.narrow(dim, a, b - a), width, dim) for a, b in shards.slices]
    nbytes = recv.numel() * recv.element_size() * shards.world_size
    with _issued("scatter", shards.world_size, nbytes):
        dist.scatter(recv, chunks, group=shards.process_group, group_src=src)
    return _trimmed(recv, shards.widths[shards.rank], dim, meta.order)


def gather_to(x: Tensor, shards: ChannelShards, dst: int, dim: int = 1) -> Tensor:
    """Gather shards along ``dim`` onto group rank ``dst``, laid out as ``x`` is; the other
    ranks get an empty tensor."""
    width = max(shards.widths)
    send = _padded(x, width, dim)
    recv = None
    if shards.rank == dst:
        recv = [torch.empty_like(send) for _ in range(shards.world_size)]
    nbytes = send.numel() * send.element_size() * shards.world_size
    with _issued("gather", shards.world_size, nbytes):
        dist.gather(send, recv, group=shards.process_group, group_dst=dst)
    if shards.rank != dst:
        return x.new_empty(0)
    return _assemble(recv, shards, dim, x)


# --- Autograd functions: each backward applies the dual Function, so it is differentiable.


class _AllGather(torch.autograd.Function):
    """Forward: all-gather. Backward: take own slice when every rank consumes the result
    alike; reduce-scatter when each rank consumes it differently (``partial``)."""

    @staticmethod
    def forward(ctx, x, shards, dim, partial):
        ctx.shards, ctx.dim, ctx.partial = shards, dim, partial
        return _all_gather(x, shards, dim)

    @staticmethod
    def backward(ctx, grad):
        dual = _ReduceScatter if ctx.partial else _Slice
        return dual.apply(grad, ctx.shards, ctx.dim), None, None, None


class _Slice(torch.autograd.Function):
    """Forward: take own slice of a replicated tensor; backward: all-gather."""

    @staticmethod
    def forward(ctx, x, shards, dim):
        ctx.shards, ctx.dim = shards, dim
        start, stop = shards.own
        return _own_slice(x, start, stop - start, dim)

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.shards, ctx.dim, False), None, None


class _ReduceScatter(torch.autograd.Function):
    """Forward: reduce-scatter; backward: all-gather whose own backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, shards, dim):
        ctx.shards, ctx.dim = shards, dim
        return _reduce_scatter(x, shards, dim)

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.shards, ctx.dim, True), None, None


class _AllReduce(torch.autograd.Function):
    """Forward: all-reduce (sum); backward: identity (every rank already holds the complete
    gradient of the replicated sum)."""

    @staticmethod
    def forward(ctx, x, process_group):
        ctx.process_group = process_group
        return _all_reduce(x, process_group)

    @staticmethod
    def backward(ctx, grad):
        return _Copy.apply(grad, ctx.process_group), None


class _Copy(torch.autograd.Function):
    """Forward: identity on a replicated tensor that each rank consumes differently;
    backward: all-reduce (sum) of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, process_group):
        ctx.process_group = process_group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduce.apply(grad, ctx.process_group), None


class _SliceBlock(torch.autograd.Function):
    """Forward: take channels ``block`` (no communication); backward: reduce-scatter within
    the team, then all-gather over the whole group."""

    @staticmethod
    def forward(ctx, x, block, team_shards, shards, dim):
        ctx.team_shards, ctx.shards, ctx.dim = team_shards, shards, dim
        return _own_slice(x, block[0], block[1] - block[0], dim)

    @staticmethod
    def backward(ctx, grad):
        own_piece = _ReduceScatter.apply(grad, ctx.team_shards, ctx.dim)
        return _AllGather.apply(own_piece, ctx.shards, ctx.dim, False), None, None, None, None


class _ScatterFrom(torch.autograd.Function):
    """Forward: scatter from ``src``; backward: gather onto ``src``."""

    @staticmethod
    def forward(ctx, x, shards, src, meta, device, dim):
        ctx.shards, ctx.src, ctx.dim = shards, src, dim
        return scatter_from(x, shards, src, meta, device, dim)

    @staticmethod
    def backward(ctx, grad):
        return _GatherTo.apply(grad, ctx.shards, ctx.src, ctx.dim), None, None, None, None, None


class _GatherTo(torch.autograd.Function):
    """Forward: gather onto ``dst``; backward: scatter from ``dst``."""

    @staticmethod
    def forward(ctx, x, shards, dst, dim):
        ctx.shards, ctx.dst, ctx.dim = shards, dst, dim
        ctx.shard_shape, ctx.order = x.shape, _dense_order(x)
        return gather_to(x, shards, dst, dim)

    @staticmethod
    def backward(ctx, grad):
        shape = list(ctx.shard_shape)
        shape[ctx.dim] = ctx.shards.total
        meta = TensorMeta(torch.Size(shape), grad.dtype, False, ctx.order)
        scattered = _ScatterFrom.apply(grad, ctx.shards, ctx.dst, meta, grad.device, ctx.dim)
        return scattered, None, None, None


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


def reduce_scatter_channels(x: Tensor, shards: ChannelShards, dim: int = 1) -> Tensor:
    """Forward: sum every rank's full-width ``x`` and keep own shard along ``dim``;
    backward: all-gather the shards' grads (each rank's partial sum read all of them).

    ``x`` is ``[N, C, *spatial]`` on every rank; the result ``[N, c_r, *spatial]``.
    """
    if shards.world_size == 1:
        return x
    return _ReduceScatter.apply(x, shards, dim)


def all_reduce_sum(x: Tensor, process_group) -> Tensor:
    """Forward: sum ``x`` over the ranks (all-reduce); backward: identity.

    For partial sums (a row-parallel layer's output) that become one replicated tensor.
    """
    if process_group is None or process_group.size() == 1:
        return x
    return _AllReduce.apply(x, process_group)


def copy_to_ranks(x: Tensor, process_group) -> Tensor:
    """Forward: identity; backward: sum the ranks' gradients (all-reduce).

    For a replicated tensor that each rank consumes differently (the input of a
    column-parallel layer), so its gradient is the complete one on every rank.
    """
    if process_group is None or process_group.size() == 1:
        return x
    return _Copy.apply(x, process_group)


class _CopyTogether(torch.autograd.Function):
    """Forward: identity on replicated tensors (a layer's parameters) that each rank uses
    differently; backward: their gradients summed over the ranks in one all-reduce."""

    @staticmethod
    def forward(ctx, process_group, *tensors):
        ctx.process_group = process_group
        ctx.shapes = [t.shape for t in tensors]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        like = next(g for g in grads if g is not None)
        flat = torch.cat(
            [
                (g if g is not None else like.new_zeros(shape)).reshape(-1)
                for g, shape in zip(grads, ctx.shapes, strict=True)
            ]
        )
        total = _AllReduce.apply(flat, ctx.process_group)
        sizes = [math.prod(shape) for shape in ctx.shapes]
        parts = total.split(sizes)
        return (None, *(p.view(shape) for p, shape in zip(parts, ctx.shapes, strict=True)))


def copy_to_ranks_together(tensors: list[Tensor | None], process_group) -> list[Tensor | None]:
    """:func:`copy_to_ranks` of several tensors (``None`` entries pass through) whose
    gradients are summed in one all-reduce instead of one each: a layer's weight and bias."""
    present = [t for t in tensors if t is not None]
    if process_group is None or process_group.size() == 1 or not present:
        return list(tensors)
    copies = iter(_CopyTogether.apply(process_group, *present))
    return [None if t is None else next(copies) for t in tensors]


def slice_channels(x: Tensor, shards: ChannelShards, dim: int = 1) -> Tensor:
    """Forward: take own slice of a replicated ``x``; backward: all-gather the slices' grads."""
    if shards.world_size == 1:
        return x
    return _Slice.apply(x, shards, dim)


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
    return _SliceBlock.apply(x, block, team_shards, shards, dim)


def scatter_channels_from(
    x: Tensor, shards: ChannelShards, src: int, meta: TensorMeta, device, dim: int = 1
) -> Tensor:
    """Forward: rank ``src`` sends each rank its shard of ``x`` ``[N, C, *spatial]`` along
    ``dim`` (channels by default); backward: gather onto ``src``. ``meta`` describes ``x``
    (see ``broadcast_meta``)."""
    return _ScatterFrom.apply(x, shards, src, meta, device, dim)


def gather_channels_to(x: Tensor, shards: ChannelShards, dst: int, dim: int = 1) -> Tensor:
    """Forward: gather the shards along ``dim`` (channels by default) onto group rank
    ``dst`` (the others get an empty tensor); backward: scatter ``dst``'s gradient."""
    return _GatherTo.apply(x, shards, dst, dim)


def broadcast_meta(x: Tensor | None, src: int, process_group) -> TensorMeta:
    """Describe group rank ``src``'s ``x`` to every rank (one tiny broadcast)."""
    holder = x if isinstance(x, Tensor) else None
    meta = torch.zeros(4 + META_DIMS, dtype=torch.int64, device=comm_device(process_group, holder))
    if dist.get_rank(process_group) == src:
        records_grad = torch.is_grad_enabled() and x.requires_grad
        channels_last = _dense_order(x) != tuple(range(x.dim()))
        values = [x.dim(), WIRE_DTYPES.index(x.dtype), records_grad, channels_last, *x.shape]
        meta[: len(values)] = torch.tensor(values)
    record("broadcast", process_group.size(), meta.numel() * meta.element_size(), kind="meta")
    settle_pending()
    dist.broadcast(meta, group=process_group, group_src=src)
    ndim, dtype_index, requires_grad, channels_last = meta[:4].tolist()
    order = tuple(range(ndim))
    if channels_last:
        order = (0, *range(2, ndim), 1)
    shape = torch.Size(meta[4 : 4 + ndim].tolist())
    return TensorMeta(shape, WIRE_DTYPES[dtype_index], bool(requires_grad), order)


def gather_rows(
    x: Tensor, shards: ChannelShards, dst: int | None = None, dim: int = 0
) -> Tensor | None:
    """The whole tensor from each rank's slice ``shards.own`` of dim ``dim`` (no autograd).

    For state: parameters, buffers, gradients. ``dst=None``: every rank gets it; otherwise
    only group rank ``dst`` does, the others get ``None``.
    """
    if shards.world_size == 1:
        return x.detach()
    if dim != 0:
        whole = gather_rows(x.detach().movedim(dim, 0), shards, dst)
        return None if whole is None else whole.movedim(0, dim).contiguous()
    # The trailing size spelled out: -1 is ambiguous for an empty shard (a (0,) bias).
    rows = x.detach().reshape(1, x.shape[0], math.prod(x.shape[1:]))
    with torch.no_grad():
        if dst is None:
            whole = _all_gather(rows, shards, 1)
        else:
            whole = gather_to(rows.contiguous(), shards, dst)
            if shards.rank != dst:
                return None
    return whole.reshape(shards.total, *x.shape[1:])


def barrier(process_group) -> None:
    """Wait until every rank of the group arrives (no-op without a group)."""
    if process_group is not None and process_group.size() > 1:
        record("barrier", process_group.size(), 0, kind="meta")
        settle_pending()
        dist.barrier(group=process_group)


def broadcast_tensors_(tensors: list[Tensor], process_group, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with group rank ``src``'s values (one call per dtype)."""
    if process_group is None or process_group.size() == 1 or not tensors:
        return
    by_kind: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for same in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in same])
            with _issued("broadcast", process_group.size(), flat.numel() * flat.element_size()):
                dist.broadcast(flat, group=process_group, group_src=src)
            offset = 0
            for t in same:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def _all_reduce_int(value: int, op, process_group) -> int:
    """``value`` reduced with ``op`` over the ranks of the group (one tiny all-reduce)."""
    if process_group is None or process_group.size() == 1:
        return value
    reduced = torch.tensor([value], dtype=torch.int64, device=comm_device(process_group))
    record("all_reduce", process_group.size(), reduced.element_size(), kind="meta")
    settle_pending()
    dist.all_reduce(reduced, op=op, group=process_group)
    return int(reduced.item())


def all_ranks_agree(flag: bool, process_group) -> bool:
    """``True`` on every rank when ``flag`` is true on every rank (one tiny all-reduce)."""
    return bool(_all_reduce_int(int(flag), dist.ReduceOp.MIN, process_group))


def sum_over_ranks(value: int, process_group) -> int:
    """The sum of ``value`` over the ranks of the group (one tiny all-reduce)."""
    return _all_reduce_int(value, dist.ReduceOp.SUM, process_group)


def broadcast_ints(values: list[int], process_group, src: int = 0) -> list[int]:
    """Group rank ``src``'s list of integers, on every rank (two tiny broadcasts)."""
    if process_group is None or process_group.size() == 1:
        return list(values)
    device = comm_device(process_group)
    length = torch.tensor([len(values)], dtype=torch.int64, device=device)
    record("broadcast", process_group.size(), length.element_size(), kind="meta")
    settle_pending()
    dist.broadcast(length, group=process_group, group_src=src)
    data = torch.zeros(int(length.item()), dtype=torch.int64, device=device)
    if dist.get_rank(process_group) == src:
        data.copy_(torch.tensor(values, dtype=torch.int64))
    record("broadcast", process_group.size(), data.numel() * data.element_size(), kind="meta")
    dist.broadcast(data, group=process_group, group_src=src)
    return data.tolist()


def start_all_gather_records(values: Tensor, process_group) -> Callable[[], Tensor]:
    """Start :func:`all_gather_records` of host ``values`` over a gloo ``process_group`` and
    return at once; the function returned waits for it and returns the ``[P, K]`` records."""
    if process_group is None or process_group.size() == 1:
        return lambda: values.unsqueeze(0)
    recv = values.new_empty((process_group.size(), values.numel()))
    record("all_gather", process_group.size(), recv.numel() * recv.element_size(), kind="meta")
    work = _all_gather_single(recv.view(-1), values, group=process_group, async_op=True)

    def wait() -> Tensor:
        work.wait()
        return recv

    return wait


def settle_first(fn: Callable[[], None]) -> None:
    """Have ``fn`` (an input check in flight) run before this process issues its next
    collective through this module (its data must not move before the check has agreed), or
    before the next record exchange."""
    _settle_first.append(fn)


def settle_pending() -> None:
    """Run what :func:`settle_first` left (in order, each once)."""
    while _settle_first:
        _settle_first.pop(0)()


def all_gather_records(values: Tensor, process_group, like: Tensor | None = None) -> Tensor:
    """``[P, K]``: every rank's int64 ``values`` of length ``K`` (one tiny all-gather), on
    the device :func:`comm_device` picks for ``like``."""
    if process_group is None or process_group.size() == 1:
        return values.unsqueeze(0)
    send = values.to(comm_device(process_group, like))
    recv = send.new_empty((process_group.size(), send.numel()))
    with _issued(
        "all_gather", process_group.size(), recv.numel() * recv.element_size(), kind="meta"
    ):
        _all_gather_single(recv.view(-1), send, group=process_group)
    return recv.cpu()
