"""Enter and leave the spatial layout: each rank holds a balanced block of rows along one
spatial dim (dim 2 by default; ``torch.tensor_split``'s blocks, rank order).

``spatial_shard`` takes this rank's block of a tensor every rank holds (no communication in
forward); ``scatter_spatial`` sends each rank its block from one rank; ``gather_spatial``
puts the blocks back together, on every rank or on one. Their backwards are the duals:
shard ↔ all-gather, scatter ↔ gather, all-gather ↔ own block (every rank computing the
same loss from the gathered tensor, as with ``gather_channels``). Ranks are named as
``torch.distributed`` names them (``src``/``dst`` global, ``group_src``/``group_dst`` within
the group).

Given a 2-D ``DeviceMesh`` with dims ``("sp_h", "sp_w")`` as ``process_group``, each splits
dims 2 and 3 together (rank ``(h, w)`` holds block ``h`` of dim 2 and block ``w`` of dim 3):
a step along each mesh dim in turn (``group_src``/``group_dst``: the row-major index on the
mesh).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from mpgroups.comm.checks import (
    InputGuard,
    Problem,
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
from mpgroups.comm.spatial_groups import GRID_DIM_NAMES, check_grid
from mpgroups.comm.transfer import receiving_end, source_meta
from mpgroups.sharding.layout import ChannelShards
from mpgroups.sharding.spatial import BlockGrid, row_blocks

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


def _grid(process_group, dim: int):
    """``process_group`` when it is a 2-D ``("sp_h", "sp_w")`` mesh (dims 2 and 3 split),
    else ``None``."""
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(process_group, DeviceMesh) or process_group.ndim == 1:
        return None
    check_grid(process_group)
    if dim != 2:
        raise ValueError(f"a 2-D mesh splits dims 2 and 3 together: leave dim=2, got {dim}")
    return process_group


def _grid_coordinate(mesh, rank: int) -> tuple[int, int]:
    """Where global rank ``rank`` sits on ``mesh``."""
    found = (mesh.mesh == rank).nonzero()
    if len(found) == 0:
        raise ValueError(f"rank {rank} is not on the mesh {mesh.mesh.tolist()}")
    return tuple(int(i) for i in found[0])


def _grid_rank(mesh, rank: int | None, rank_in_group: int | None, name: str) -> int | None:
    """The global rank an argument names on a grid (``group_<name>``: the row-major index)."""
    if rank is not None and rank_in_group is not None:
        raise ValueError(f"give {name} (a global rank) or group_{name}, not both")
    if rank_in_group is not None:
        return int(mesh.mesh.flatten()[rank_in_group])
    if rank is not None:
        _grid_coordinate(mesh, rank)
    return rank


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
    mesh = _grid(process_group, dim)
    if mesh is not None:
        for axis, name in enumerate(GRID_DIM_NAMES):
            x = spatial_shard(x, mesh.get_group(name), 2 + axis)
        return x
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
    mesh = _grid(process_group, dim)
    if mesh is not None:
        source = _grid_rank(mesh, src, group_src, "src")
        source = int(mesh.mesh.flatten()[0]) if source is None else source
        row, column = _grid_coordinate(mesh, source)
        if mesh.get_coordinate()[1] == column:  # the source's column: its rows, whole width
            x = scatter_spatial(
                x, group_src=row, process_group=mesh.get_group("sp_h"), device=device
            )
        return scatter_spatial(
            x, group_src=column, process_group=mesh.get_group("sp_w"), dim=3, device=device
        )
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
    mesh = _grid(process_group, dim)
    if mesh is not None:
        target = _grid_rank(mesh, dst, group_dst, "dst")
        row, column = (None, None) if target is None else _grid_coordinate(mesh, target)
        y = gather_spatial(y, group_dst=column, process_group=mesh.get_group("sp_w"), dim=3)
        if column is not None and mesh.get_coordinate()[1] != column:
            return y  # empty: this rank's column gathered onto the target's column
        return gather_spatial(y, group_dst=row, process_group=mesh.get_group("sp_h"))
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return y
    dst = group_rank(pg, dst, group_dst, "dst")
    blocks = BlockGrid(dims=(dim,), shape=(pg.size(),))
    guard = InputGuard(
        f"gather_spatial(dim={dim}, group_dst={dst})",
        ("gather_spatial", dim, dst),
        pg,
        channel_dim=dim,
        counted="rows",
    )

    records = guard(
        y, problem=_problem(y, dim), expected_channels=blocks.expected, channels_note=blocks.note
    )
    if records is not None:
        (total,) = blocks.totals(channel_counts(records, dim))
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
