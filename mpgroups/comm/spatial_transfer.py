"""Enter and leave the spatial layout: each rank holds a balanced block of rows along one
spatial dim (dim 2 by default; ``torch.tensor_split``'s blocks, rank order).

``spatial_shard`` takes this rank's block of a tensor every rank holds (no communication in
forward); ``scatter_spatial`` sends each rank its block from one rank; ``gather_spatial``
puts the blocks back together, on every rank or on one. Their backwards are the duals:
shard ↔ all-gather, scatter ↔ gather, all-gather ↔ own block (every rank computing the
same loss from the gathered tensor, as with ``gather_channels``). Ranks are named as
``torch.distributed`` names them (``src``/``dst`` global, ``group_src``/``group_dst`` within
the group).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from mpgroups.comm.checks import (
    InputGuard,
    Problem,
    balanced_blocks,
    channel_counts,
    tensor_problem,
)
from mpgroups.comm.collectives import (
    META_DIMS,
    all_gather_channels,
    gather_channels_to,
    scatter_channels_from,
    slice_channels,
    sum_over_ranks,
)
from mpgroups.comm.process_groups import group_rank, host_group, resolve_process_group
from mpgroups.comm.transfer import receiving_end, source_meta
from mpgroups.sharding.layout import ChannelShards
from mpgroups.sharding.spatial import row_blocks

__all__ = ["gather_spatial", "scatter_spatial", "spatial_shard"]


def _spatial_shards(size: int, process_group) -> ChannelShards:
    """The balanced blocks of ``size`` rows over ``process_group``, this rank's among them."""
    blocks = row_blocks(size, process_group.size())
    return ChannelShards(process_group, blocks, dist.get_rank(process_group))


def _problem(x, dim: int) -> Problem | None:
    return tensor_problem(x, f"[N, C, *spatial] with dim {dim} spatial", dim + 1, META_DIMS)


def _check_dim(dim: int) -> None:
    if dim < 2:
        raise ValueError(f"dim must be a spatial dim (2 or more) of [N, C, *spatial], got {dim}")


def spatial_shard(x: Tensor, process_group=None, dim: int = 2) -> Tensor:
    """This rank's block of rows along ``dim`` of ``x``, which every rank holds whole.

    No communication in forward (nor any check: use it where the ranks already hold the same
    tensor, as after a seeded generator); backward all-gathers the blocks' gradients, so a
    ``x`` that requires grad gets its whole gradient on every rank.

    Args:
        x: ``[N, C, L, *rest]`` (``dim`` = 2), the same on every rank.
        process_group: ``ProcessGroup``, 1-D ``DeviceMesh`` or ``None`` (the default group;
            none initialised: ``x`` itself).

    Returns:
        ``[N, C, l_r, *rest]``: rows ``torch.tensor_split(x, P, dim)[rank]``.
    """
    _check_dim(dim)
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return x
    return slice_channels(x, _spatial_shards(x.shape[dim], pg), dim)


def scatter_spatial(
    x: Tensor | None,
    src: int | None = None,
    *,
    process_group=None,
    dim: int = 2,
    device=None,
    group_src: int | None = None,
) -> Tensor:
    """Forward: the source rank sends each rank its block of rows along ``dim``; backward:
    the blocks' gradients gathered onto the source.

    Args:
        x: ``[N, C, L, *rest]`` on the source; ignored (may be ``None``) elsewhere.
        src: the source's global rank; or ``group_src``, its rank within the group; with
            neither, the group's rank 0.
        device: where the block lives on the other ranks (default: the group's device).

    Returns:
        ``[N, C, l_r, *rest]``, laid out as ``x`` (shape, dtype, layout and whether a
        backward is recorded come from the source; when one is, every rank must run backward
        through the result).
    """
    _check_dim(dim)
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return x
    src = group_rank(pg, src, group_src, "src")
    src = 0 if src is None else src
    holds = dist.get_rank(pg) == src
    guard = InputGuard(
        f"scatter_spatial(dim={dim}, group_src={src})", ("scatter_spatial", dim, src), pg
    )
    meta = source_meta(x, src, guard, _problem(x, dim) if holds else None)
    if len(meta.shape) <= dim:
        raise ValueError(f"scatter_spatial(dim={dim}) got a tensor of {len(meta.shape)} dims")
    shards = _spatial_shards(meta.shape[dim], pg)
    if not holds:
        x = receiving_end(meta, device, pg)
    return scatter_channels_from(x, shards, src, meta, x.device, dim)


def gather_spatial(
    y: Tensor,
    dst: int | None = None,
    *,
    process_group=None,
    dim: int = 2,
    group_dst: int | None = None,
) -> Tensor:
    """Forward: the whole tensor from every rank's block of rows along ``dim``; backward:
    the dual (own block of the gradient, or a scatter from ``dst``).

    With neither ``dst`` nor ``group_dst`` every rank gets ``[N, C, L, *rest]`` (all-gather);
    otherwise only that rank does, the others an empty tensor, and every rank must run
    backward through the result.

    Args:
        y: this rank's block ``[N, C, l_r, *rest]``; the blocks must be balanced as
            ``torch.tensor_split`` splits ``L`` (checked across ranks: a mismatch raises
            :class:`~mpgroups.InputMismatchError` on every rank).
    """
    _check_dim(dim)
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return y
    dst = group_rank(pg, dst, group_dst, "dst")
    world = pg.size()
    guard = InputGuard(
        f"gather_spatial(dim={dim}, group_dst={dst})",
        ("gather_spatial", dim, dst),
        pg,
        channel_dim=dim,
        counted="rows",
    )

    records = guard(
        y,
        problem=_problem(y, dim),
        expected_channels=balanced_blocks,
        channels_note=lambda sent: [f"balanced blocks of {sum(sent)} rows"] * world,
    )
    if records is not None:
        total = sum(channel_counts(records, dim))
    else:
        total = sum_over_ranks(y.shape[dim], host_group(pg))
    shards = _spatial_shards(total, pg)
    if y.shape[dim] != shards.widths[shards.rank]:
        raise ValueError(
            f"rank {shards.rank} holds {y.shape[dim]} rows along dim {dim}; balanced blocks "
            f"of {total} rows give it {shards.widths[shards.rank]}"
        )
    if dst is None:
        return all_gather_channels(y, shards, dim)
    return gather_channels_to(y, shards, dst, dim)
