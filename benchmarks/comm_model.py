"""What a group-parallel layer communicates, from the placement rule alone, and what it costs.

:func:`layer_collectives` lists the data collectives of one forward + backward (DESIGN §3), with
the byte counts :class:`~mpgroups.counter.CommCounter` records (padding of uneven shards
included). :func:`collective_seconds` prices one collective with an α–β model in the
bus-bandwidth convention of nccl-tests. ``cases.py`` lists a benchmark case's collectives
with it; ``projection.py`` prices them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mpgroups.placement import place, shard_slice

__all__ = [
    "LINKS",
    "Collective",
    "Link",
    "collective_seconds",
    "layer_collectives",
    "ring_bytes_factor",
    "ring_steps",
    "spatial_out",
]


@dataclass(frozen=True)
class Collective:
    """One collective: ``op``, the ranks taking part, bytes (CommCounter's convention),
    and whether it runs in the forward or the backward pass."""

    op: str
    group_size: int
    nbytes: int
    phase: str


@dataclass(frozen=True)
class Link:
    """α–β parameters of an interconnect: latency per step (s), bus bandwidth (bytes/s)."""

    name: str
    latency_s: float
    busbw_bytes_per_s: float


# Typical nccl-tests bus bandwidths for all-gather at large sizes, and per-step latencies.
LINKS = {
    "nvlink4": Link("NVLink 4 (H100 SXM)", 5e-6, 360e9),
    "pcie5": Link("PCIe 5.0 x16", 10e-6, 40e9),
}


def layer_collectives(
    in_channels: int,
    out_channels: int,
    groups: int,
    world_size: int,
    rank: int,
    layouts: tuple[str, str],
    batch: int,
    in_spatial: int,
    out_spatial: int,
    element_size: int,
    input_requires_grad: bool = True,
) -> list[Collective]:
    """The data collectives of one forward + backward of a group-parallel conv on ``rank``.

    ``in_spatial``/``out_spatial`` are the numbers of spatial positions (H·W).
    """
    if world_size == 1:
        return []
    pl = place(in_channels, out_channels, groups, world_size, rank)
    in_widths = [
        b - a
        for a, b in (shard_slice(in_channels, groups, world_size, r) for r in range(world_size))
    ]
    out_widths = [
        b - a
        for a, b in (
            place(in_channels, out_channels, groups, world_size, r).out_slice
            for r in range(world_size)
        )
    ]
    unit = batch * element_size
    out = []
    in_layout, out_layout = layouts
    if pl.filter_split:
        team_widths = in_widths[pl.team[0] : pl.team[1]]
        team_bytes = pl.team_size * max(team_widths) * in_spatial * unit
        if in_layout == "replicated":
            if input_requires_grad:
                out.append(Collective("reduce_scatter", pl.team_size, team_bytes, "backward"))
                full = world_size * max(in_widths) * in_spatial * unit
                out.append(Collective("all_gather", world_size, full, "backward"))
        else:
            out.append(Collective("all_gather", pl.team_size, team_bytes, "forward"))
            if input_requires_grad:
                out.append(Collective("reduce_scatter", pl.team_size, team_bytes, "backward"))
    elif in_layout == "replicated" and input_requires_grad:
        full = world_size * max(in_widths) * in_spatial * unit
        out.append(Collective("all_gather", world_size, full, "backward"))
    if out_layout == "replicated":
        full = world_size * max(out_widths) * out_spatial * unit
        out.append(Collective("all_gather", world_size, full, "forward"))
    return out


def collective_seconds(op: str, group_size: int, nbytes: int, link: Link) -> float:
    """α–β time of one ring collective: its latency steps plus the bus traffic.

    nccl-tests: bus bandwidth = algorithm bandwidth × (P-1)/P for all-gather, reduce-scatter,
    gather and scatter, × 2(P-1)/P for all-reduce; ``nbytes`` is their "size".
    """
    if group_size <= 1:
        return 0.0
    steps = ring_steps(op, group_size)
    return (
        steps * link.latency_s + nbytes * ring_bytes_factor(op, group_size) / link.busbw_bytes_per_s
    )


def ring_steps(op: str, group_size: int) -> int:
    """Latency steps of a ring collective: ``P-1``, or ``2(P-1)`` for all-reduce."""
    p = group_size
    return 2 * (p - 1) if op == "all_reduce" else p - 1


def ring_bytes_factor(op: str, group_size: int) -> float:
    """Bus bytes per byte of ``nbytes`` (nccl-tests' correction factor)."""
    p = group_size
    return 2 * (p - 1) / p if op == "all_reduce" else (p - 1) / p


def spatial_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a convolution along one dimension, as ``nn.Conv2d`` computes it."""
    return math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1)
