"""Move channel-sharded data that lives on one rank, or must end on one or on all.

``scatter_channels`` (one rank holds the whole tensor; every rank gets its shard) and
``gather_channels`` (every rank, or just one, gets the whole tensor) are the explicit
forms of the sharded layout's entry and exit (docs/design.md §3). Both are checked like the layers:
with checks on, the ranks first exchange a record of what they pass, so a mismatch raises
on every rank instead of hanging.

Ranks are named as ``torch.distributed`` names them: ``src``/``dst`` are global ranks,
``group_src``/``group_dst`` ranks within ``process_group``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mpgroups.comm.checks import InputGuard, Problem, channel_counts, tensor_problem
from mpgroups.comm.collectives import (
    META_DIMS,
    all_gather_channels,
    broadcast_meta,
    comm_device,
    gather_channels_to,
    scatter_channels_from,
    sum_over_ranks,
)
from mpgroups.comm.process_groups import group_rank, host_group, resolve_process_group
from mpgroups.sharding.layout import layout_shards

__all__ = ["gather_channels", "receiving_end", "scatter_channels", "source_meta"]


def _shape_problem(x) -> Problem | None:
    return tensor_problem(x, f"[N, C, *spatial] (2 to {META_DIMS} dims)", 2, META_DIMS)


def scatter_channels(
    x: Tensor | None,
    src: int | None = None,
    *,
    groups: int,
    process_group=None,
    device=None,
    group_src: int | None = None,
) -> Tensor:
    """Forward: the source rank sends each rank its channel shard; backward: gather onto it.

    Args:
        x: ``[N, C, *spatial]`` on the source rank; ignored (may be ``None``) elsewhere.
        src: the source's global rank, as in ``torch.distributed.scatter``; or
        group_src: its rank within ``process_group``. With neither, the group's rank 0.
        groups: conv groups that define the sharded layout (see ``placement.shard_slice``).
        process_group: ``ProcessGroup``, 1-D ``DeviceMesh`` or ``None`` (default group).
        device: where the shard lives on the ranks other than the source (default: the
            group's device: its bound device; for NCCL the current CUDA device; the CPU for
            gloo).

    Returns:
        This rank's shard ``[N, c_r, *spatial]`` in the sharded layout, laid out as ``x``
        (channels_last stays channels_last). Shape, dtype, layout and whether a backward is
        recorded come from the source (one small broadcast); when one is, every rank must run
        backward through the result.
    """
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return x
    src = group_rank(pg, src, group_src, "src")
    src = 0 if src is None else src
    rank = dist.get_rank(pg)
    guard = InputGuard(
        f"scatter_channels(groups={groups}, group_src={src})",
        ("scatter_channels", groups, src),
        pg,
    )
    meta = source_meta(x, src, guard, _shape_problem(x) if rank == src else None)
    shards = layout_shards(meta.shape[1], groups, pg.size(), rank, pg)
    if rank != src:
        x = receiving_end(meta, device, pg)
    return scatter_channels_from(x, shards, src, meta, x.device)


def source_meta(x: Tensor | None, src: int, guard: InputGuard, problem: Problem | None):
    """A scatter's first steps: check the source's ``x`` across ranks (``problem``: its local
    problem, on the source), then describe it to every rank (:class:`TensorMeta`), raising on
    every rank if the source records a backward that a rank under ``no_grad`` would miss."""
    pg = guard.process_group
    holds = dist.get_rank(pg) == src
    guard(
        x if holds else None,
        problem=problem,
        expected_channels=lambda sent: [sent[r] if r == src else None for r in range(len(sent))],
        channels_note=lambda sent: [""] * len(sent),
    )
    # Host integers on the host: over NCCL a device buffer would make every rank wait for it.
    meta = broadcast_meta(x, src, host_group(pg))
    guard.raise_together(
        holds or torch.is_grad_enabled() or not meta.requires_grad,
        f"rank {src} records a backward through its input, and a rank that runs under "
        f"torch.no_grad() would not join the gather of its gradient",
    )
    return meta


def receiving_end(meta, device, process_group) -> Tensor:
    """What a rank other than the source passes to the scatter: an empty tensor on
    ``device`` (default: the group's), a leaf that requires grad where the source's input
    records a backward, so this rank joins the backward's gather."""
    where = torch.device(device) if device is not None else comm_device(process_group)
    return torch.empty(0, dtype=meta.dtype, device=where, requires_grad=meta.requires_grad)


def gather_channels(
    x: Tensor,
    dst: int | None = None,
    *,
    groups: int,
    process_group=None,
    group_dst: int | None = None,
) -> Tensor:
    """Forward: gather channel shards into the whole tensor; backward: the dual scatter.

    With neither ``dst`` nor ``group_dst``: every rank gets ``[N, C, *spatial]`` (all-gather;
    backward takes own slice). ``dst`` (a global rank, as in ``torch.distributed.gather``) or
    ``group_dst`` (a rank within ``process_group``): only that rank gets it, the others an
    empty tensor (gather; backward scatters its gradient, so every rank must run backward
    through the result).

    Args:
        x: this rank's shard ``[N, c_r, *spatial]`` of the sharded layout for ``groups``.
    """
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return x
    dst = group_rank(pg, dst, group_dst, "dst")
    rank, world = dist.get_rank(pg), pg.size()
    guard = InputGuard(
        f"gather_channels(groups={groups}, group_dst={dst})", ("gather_channels", groups, dst), pg
    )

    def layout(sent: list[int]) -> list[int]:
        if min(sent) < 0:  # a rank without channels: its record says what it sent instead
            return sent
        return layout_shards(sum(sent), groups, world, 0).widths

    records = guard(
        x,
        problem=_shape_problem(x),
        expected_channels=layout,
        channels_note=lambda sent: [f"the sharded layout of {sum(sent)} channels"] * world,
    )
    if records is not None:
        total = sum(channel_counts(records))
    else:
        total = sum_over_ranks(x.shape[1], host_group(pg))
    shards = layout_shards(total, groups, world, rank, pg)
    if x.shape[1] != shards.widths[rank]:
        raise ValueError(
            f"rank {rank} holds {x.shape[1]} channels; the sharded layout of "
            f"{shards.total} channels with groups={groups} gives it {shards.widths[rank]}"
        )
    if dst is None:
        return all_gather_channels(x, shards)
    return gather_channels_to(x, shards, dst)
