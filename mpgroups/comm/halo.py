"""The halo exchange: each rank receives the rows of its neighbours' blocks that its window
reads (:mod:`mpgroups.sharding.spatial`), point to point.

Forward and backward are a pair of autograd Functions, each the other's dual, so the
exchange is differentiable to any order: forward sends rows and assembles the window;
backward sends each received row's gradient back to the rank that owns the row, which adds
it to its own (a row read twice, by reflect or circular padding on a small block, adds
twice). Nothing is sent when the group has one rank or no window reads another rank's rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mpgroups.comm.collectives import issued
from mpgroups.sharding.spatial import ZERO_ROW, HaloPlan

__all__ = [
    "Exchange",
    "assemble_window",
    "assemble_windows",
    "halo_exchange",
    "halo_pieces",
    "halo_rows",
    "split_window_grad",
    "split_windows_grad",
]

# One step of a window's assembly: (this rank's plan, the dim, the group along that dim).
# A block split along dims 2 and 3 takes two, the second exchanging the first's window
# (its halo rows included), so the corners come from the diagonal neighbours.
Exchange = tuple[HaloPlan, int, object]


def _swap(
    process_group, outgoing: list[tuple[int, Tensor]], incoming: list[tuple[int, Tensor]]
) -> None:
    """Send each ``(peer, tensor)`` of ``outgoing`` and fill each of ``incoming`` (group ranks),
    all at once; returns when every transfer is done."""
    ops = [
        dist.P2POp(dist.isend, tensor, dist.get_global_rank(process_group, peer), process_group)
        for peer, tensor in outgoing
    ]
    ops += [
        dist.P2POp(dist.irecv, tensor, dist.get_global_rank(process_group, peer), process_group)
        for peer, tensor in incoming
    ]
    if not ops:
        return
    nbytes = sum(t.numel() * t.element_size() for _, t in outgoing)
    with issued("halo_exchange", process_group.size(), nbytes):
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _rows(x: Tensor, rows: tuple[int, ...], dim: int) -> Tensor:
    """``x``'s ``rows`` along ``dim`` as one contiguous tensor (what goes on the wire)."""
    first = rows[0]
    if rows == tuple(range(first, first + len(rows))):
        return x.narrow(dim, first, len(rows)).contiguous()
    return x.index_select(dim, torch.tensor(rows, device=x.device)).contiguous()


def _with_rows(x: Tensor, rows: int, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = rows
    return shape


def _window_parts(
    x: Tensor, received: dict[int, Tensor], plan: HaloPlan, dim: int, fill: float
) -> list[Tensor]:
    """The window's runs in order: rows of ``x``, of what a peer sent (``received``, by
    peer), or padding rows holding ``fill``."""
    parts = []
    for source, start, length in plan.runs:
        if source == ZERO_ROW:
            parts.append(x.new_full(_with_rows(x, length, dim), fill))
        else:
            held = x if source == plan.rank else received[source]
            parts.append(held.narrow(dim, start, length))
    return parts


def split_window_grad(
    grad: Tensor, plan: HaloPlan, dim: int, own_shape, received_shapes
) -> tuple[Tensor, list[Tensor]]:
    """The dual of the window's assembly: from the window's gradient, that of this rank's
    own rows (shaped ``own_shape``) and of each received piece (``plan.receives`` order),
    a row read twice adding twice. Out of place, so differentiable again."""
    own = grad.new_zeros(own_shape)
    back = {
        peer: grad.new_zeros(shape)
        for (peer, _), shape in zip(plan.receives, received_shapes, strict=True)
    }
    position = 0
    for source, start, length in plan.runs:
        piece = grad.narrow(dim, position, length)
        position += length
        if source == ZERO_ROW:
            continue
        index = torch.arange(start, start + length, device=grad.device)
        if source == plan.rank:
            own = own.index_add(dim, index, piece)
        else:
            back[source] = back[source].index_add(dim, index, piece)
    return own, list(back.values())


def _exchange(x: Tensor, plan: HaloPlan, process_group, dim: int, fill: float = 0.0) -> Tensor:
    peers = [peer for peer, _ in plan.receives]
    received = dict(zip(peers, _receive(x, plan, process_group, dim), strict=True))
    parts = _window_parts(x, received, plan, dim, fill)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _return_grads(grad: Tensor, plan: HaloPlan, process_group, dim: int, rows: int) -> Tensor:
    """The dual of :func:`_exchange`: the gradient of this rank's own ``rows`` rows."""
    shapes = [_with_rows(grad, count, dim) for _, count in plan.receives]
    own, back = split_window_grad(grad, plan, dim, _with_rows(grad, rows, dim), shapes)
    return _give_back(back, plan, process_group, dim, own)


class _HaloExchange(torch.autograd.Function):
    """Forward: this rank's window from its block and its neighbours' rows; backward: the
    window's gradient, each row's part sent back to its owner and added there."""

    @staticmethod
    def forward(ctx, x, plan, process_group, dim, fill):
        ctx.plan, ctx.process_group, ctx.dim, ctx.rows = plan, process_group, dim, x.shape[dim]
        return _exchange(x, plan, process_group, dim, fill)

    @staticmethod
    def backward(ctx, grad):
        dual = _HaloReturn.apply(grad, ctx.plan, ctx.process_group, ctx.dim, ctx.rows)
        return dual, None, None, None, None


class _HaloReturn(torch.autograd.Function):
    """Forward: a window's gradient returned to the rows' owners; backward: the exchange."""

    @staticmethod
    def forward(ctx, grad, plan, process_group, dim, rows):
        ctx.plan, ctx.process_group, ctx.dim = plan, process_group, dim
        return _return_grads(grad, plan, process_group, dim, rows)

    @staticmethod
    def backward(ctx, grad):
        exchanged = _HaloExchange.apply(grad, ctx.plan, ctx.process_group, ctx.dim, 0.0)
        return exchanged, None, None, None, None


def _receive(x: Tensor, plan: HaloPlan, process_group, dim: int) -> list[Tensor]:
    """Send this rank's rows that others read; the rows received, in ``plan.receives`` order."""
    outgoing = [(peer, _rows(x, rows, dim)) for peer, rows in plan.sends]
    incoming = [(peer, x.new_empty(_with_rows(x, count, dim))) for peer, count in plan.receives]
    _swap(process_group, outgoing, incoming)
    return [tensor for _, tensor in incoming]


def _give_back(grads, plan: HaloPlan, process_group, dim: int, own: Tensor) -> Tensor:
    """The dual of :func:`_receive`: each received row's gradient goes back to its owner;
    what comes back for this rank's rows is added to ``own`` (in place), which is returned."""
    incoming = [(peer, own.new_empty(_with_rows(own, len(sent), dim))) for peer, sent in plan.sends]
    outgoing = [(peer, g.contiguous()) for (peer, _), g in zip(plan.receives, grads, strict=True)]
    _swap(process_group, outgoing, incoming)
    for (_, sent), (_, received) in zip(plan.sends, incoming, strict=True):
        own.index_add_(dim, torch.tensor(sent, device=own.device), received)
    return own


class _HaloRows(torch.autograd.Function):
    """Forward: the rows of the neighbours' blocks this rank's window reads, one tensor per
    neighbour, after a zero-row token (so that every rank, even one that only sends, runs the
    backward); backward: their gradients sent back to the owners and added there."""

    @staticmethod
    def forward(ctx, x, plan, process_group, dim):
        ctx.plan, ctx.process_group, ctx.dim, ctx.shape = plan, process_group, dim, x.shape
        token = x.new_empty(_with_rows(x, 0, dim))
        ctx.like = token.detach()  # no data: dtype and device for a backward with no grads
        return (token, *_receive(x, plan, process_group, dim))

    @staticmethod
    def backward(ctx, _token_grad, *grads):
        like = _token_grad if _token_grad is not None else ctx.like
        grads = [
            g if g is not None else like.new_zeros(_with_rows(like, count, ctx.dim))
            for g, (_, count) in zip(grads, ctx.plan.receives, strict=True)
        ]
        back = _HaloRowsBack.apply(like, ctx.plan, ctx.process_group, ctx.dim, ctx.shape, *grads)
        return back, None, None, None


class _HaloRowsBack(torch.autograd.Function):
    """Forward: received rows' gradients returned to their owners; backward: the exchange."""

    @staticmethod
    def forward(ctx, like, plan, process_group, dim, shape, *grads):
        ctx.plan, ctx.process_group, ctx.dim = plan, process_group, dim
        return _give_back(grads, plan, process_group, dim, like.new_zeros(shape))

    @staticmethod
    def backward(ctx, grad):
        token, *received = _HaloRows.apply(grad, ctx.plan, ctx.process_group, ctx.dim)
        return (token, None, None, None, None, *received)


def halo_rows(x: Tensor, plan: HaloPlan, process_group, dim: int = 2) -> list[Tensor]:
    """``[token, *received]``: a zero-row tensor, then the rows this rank receives from each
    peer of ``plan.receives`` (a collective, as :func:`halo_exchange`). With
    :func:`assemble_window` they make the window, but kept apart they let a layer save its
    own block and the halo rows instead of a copy of both (the block is often saved anyway,
    by the layer before)."""
    if process_group is None or process_group.size() == 1:
        return [x.new_empty(_with_rows(x, 0, dim))]
    return list(_HaloRows.apply(x, plan, process_group, dim))


def assemble_window(x: Tensor, pieces: list[Tensor], plan: HaloPlan, dim: int, fill: float = 0.0):
    """The window from this rank's block ``x`` and ``pieces`` (:func:`halo_rows`' result), by
    differentiable ops; the token joins it, so every rank's backward reaches the exchange."""
    token, *received = pieces
    by_peer = {peer: tensor for (peer, _), tensor in zip(plan.receives, received, strict=True)}
    return torch.cat([token, *_window_parts(x, by_peer, plan, dim, fill)], dim)


def halo_exchange(
    x: Tensor, plan: HaloPlan, process_group, dim: int = 2, fill: float = 0.0
) -> Tensor:
    """This rank's window along ``dim``: ``[N, C, plan.window_rows, *rest]`` from its block
    ``x`` ``[N, C, rows, *rest]`` (a collective: every rank of ``process_group`` calls it with
    its own part of the same plan). Padding rows hold ``fill`` (``-inf`` for a max pool);
    they get no gradient."""
    if process_group is None or process_group.size() == 1:
        return _exchange(x, plan, None, dim, fill)
    return _HaloExchange.apply(x, plan, process_group, dim, fill)


def halo_pieces(x: Tensor, exchanges: list[Exchange]) -> list[list[Tensor]]:
    """Per exchange, :func:`halo_rows` of the window the exchanges before it assembled (a
    collective per exchange, as :func:`halo_exchange`)."""
    pieces, window = [], x
    for step, (plan, dim, group) in enumerate(exchanges):
        pieces.append(halo_rows(window, plan, group, dim))
        if step + 1 < len(exchanges):
            window = assemble_window(window, pieces[-1], plan, dim)
    return pieces


def assemble_windows(
    x: Tensor, pieces: list[list[Tensor]], exchanges: list[Exchange], fill: float = 0.0
) -> Tensor:
    """The window of every exchange in turn, from ``x`` and :func:`halo_pieces`' result."""
    for got, (plan, dim, _) in zip(pieces, exchanges, strict=True):
        x = assemble_window(x, got, plan, dim, fill)
    return x


def split_windows_grad(
    grad: Tensor, exchanges: list[Exchange], own_shape, pieces: list[list[Tensor]]
) -> tuple[Tensor, list[list[Tensor]]]:
    """The dual of :func:`assemble_windows`: from the window's gradient, that of the block
    (shaped ``own_shape``) and of each piece. A token's is a view of its window's gradient,
    not fresh zeros: under double backward every rank then has each exchange's backward in
    its graph, and runs it with its neighbours."""
    shapes = [list(own_shape)]
    for plan, dim, _ in exchanges[:-1]:
        shapes.append(shapes[-1][:dim] + [plan.window_rows] + shapes[-1][dim + 1 :])
    grads: list[list[Tensor]] = []
    for (plan, dim, _), shape, got in reversed(list(zip(exchanges, shapes, pieces, strict=True))):
        token_grad = grad.narrow(dim, 0, 0)
        grad, received_grads = split_window_grad(grad, plan, dim, shape, [t.shape for t in got[1:]])
        grads.insert(0, [token_grad, *received_grads])
    return grad, grads
