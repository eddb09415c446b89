"""Where each conv group lives: the one placement rule of mpgroups.

Pure arithmetic on channel counts; imports nothing from ``torch.distributed``.

A grouped convolution ``Conv(C_in, C_out, groups=G)`` placed on ``P`` ranks:

* ``G >= P`` -- whole groups per rank. The ``G`` groups split over the ``P`` ranks in the
  ``torch.tensor_split`` convention (the first ``G % P`` ranks get one more group). Rank ``r``
  runs one grouped conv with ``local_groups`` groups.
* ``G < P`` and ``P % G == 0`` -- filter split. The ranks form ``G`` teams of ``P // G``
  consecutive ranks; team ``g`` holds group ``g`` and splits its ``C_out / G`` filters
  (balanced, possibly uneven). Each rank runs a dense conv on its group's input channels.
* anything else is refused with :class:`PlacementError`.

All slices are half-open ``(start, stop)`` pairs of channel or rank indices.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroupPlacement", "PlacementError", "balanced_split", "place", "shard_slice"]

Slice = tuple[int, int]


class PlacementError(ValueError):
    """A grouped conv that the placement rule cannot put on the given number of ranks."""


def balanced_split(n: int, parts: int) -> list[Slice]:
    """Split ``range(n)`` into ``parts`` contiguous ``(start, stop)`` pieces.

    Same convention as ``torch.tensor_split``: the first ``n % parts`` pieces get one more item.
    """
    if parts < 1:
        raise ValueError(f"cannot split {n} items into {parts} parts")
    base, extra = divmod(n, parts)
    slices = []
    start = 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        slices.append((start, stop))
        start = stop
    return slices


@dataclass(frozen=True)
class GroupPlacement:
    """What rank ``rank`` of ``world_size`` owns of a grouped conv.

    Attributes:
        rank, world_size: position in the layer's process group.
        groups: the conv's total group count ``G``.
        group_slice: the conv groups this rank computes, ``(start, stop)``; one group when
            ``G < P``.
        in_slice: the input channels this rank reads (all channels of its groups).
        out_slice: the output channels this rank writes.
        team: the ranks ``(start, stop)`` that share this rank's ``group_slice``; just
            ``(rank, rank + 1)`` when ``G >= P``.
    """

    rank: int
    world_size: int
    groups: int
    group_slice: Slice
    in_slice: Slice
    out_slice: Slice
    team: Slice

    @property
    def filter_split(self) -> bool:
        """True when several ranks share one group (``G < P``)."""
        return self.team[1] - self.team[0] > 1

    @property
    def local_groups(self) -> int:
        """Group count of the local conv: the rank's groups, or 1 for a filter split."""
        return 1 if self.filter_split else self.group_slice[1] - self.group_slice[0]

    @property
    def team_size(self) -> int:
        return self.team[1] - self.team[0]

    @property
    def team_rank(self) -> int:
        """This rank's position inside its team."""
        return self.rank - self.team[0]

    @property
    def local_in_channels(self) -> int:
        return self.in_slice[1] - self.in_slice[0]

    @property
    def local_out_channels(self) -> int:
        return self.out_slice[1] - self.out_slice[0]


def check_placeable(groups: int, world_size: int) -> None:
    """Raise :class:`PlacementError` unless ``groups`` conv groups fit on ``world_size`` ranks."""
    if groups < 1:
        raise PlacementError(f"groups must be a positive integer, got {groups}")
    if world_size < 1:
        raise PlacementError(f"world_size must be a positive integer, got {world_size}")
    if groups < world_size and world_size % groups != 0:
        works = sorted({p for p in range(1, groups + 1)} | {groups * k for k in (2, 3, 4)})
        raise PlacementError(
            f"groups={groups} cannot be placed on {world_size} ranks: with fewer groups than "
            f"ranks, the ranks must form equal teams, one per group (world_size % groups == 0). "
            f"Process groups of size {', '.join(map(str, works))}, ... work for groups={groups}."
        )


def place(
    in_channels: int, out_channels: int, groups: int, world_size: int, rank: int
) -> GroupPlacement:
    """Apply the placement rule to one rank.

    Args:
        in_channels, out_channels, groups: the conv, as in ``nn.Conv2d``.
        world_size: ``P``, the number of ranks in the layer's process group.
        rank: ``r`` in ``[0, P)``.

    Raises:
        PlacementError: channels not divisible by ``groups``, ``G < P`` with ``P % G != 0``,
            or a team with more ranks than its group has filters.
    """
    if in_channels % groups != 0 or out_channels % groups != 0:
        raise PlacementError(
            f"in_channels={in_channels} and out_channels={out_channels} must both be divisible "
            f"by groups={groups}"
        )
    check_placeable(groups, world_size)
    if not 0 <= rank < world_size:
        raise PlacementError(f"rank {rank} is outside a process group of size {world_size}")
    in_per_group = in_channels // groups
    out_per_group = out_channels // groups
    if groups >= world_size:
        group_slice = balanced_split(groups, world_size)[rank]
        g0, g1 = group_slice
        return GroupPlacement(
            rank=rank,
            world_size=world_size,
            groups=groups,
            group_slice=group_slice,
            in_slice=(g0 * in_per_group, g1 * in_per_group),
            out_slice=(g0 * out_per_group, g1 * out_per_group),
            team=(rank, rank + 1),
        )
    team_size = world_size // groups
    if out_per_group < team_size:
        raise PlacementError(
            f"out_channels={out_channels} with groups={groups} gives {out_per_group} filter(s) per "
            f"group, too few to split over teams of {team_size} ranks (world_size={world_size}): "
            f"every rank must own at least one output channel"
        )
    group = rank // team_size
    team_start = group * team_size
    f0, f1 = balanced_split(out_per_group, team_size)[rank - team_start]
    return GroupPlacement(
        rank=rank,
        world_size=world_size,
        groups=groups,
        group_slice=(group, group + 1),
        in_slice=(group * in_per_group, (group + 1) * in_per_group),
        out_slice=(group * out_per_group + f0, group * out_per_group + f1),
        team=(team_start, team_start + team_size),
    )


def shard_slice(channels: int, groups: int, world_size: int, rank: int) -> Slice:
    """Channels of a ``channels``-wide activation that rank ``rank`` holds in the sharded layout.

    The sharded layout gives each rank the output slice of a conv with ``channels`` in and out
    channels and the same ``groups``: its groups' channels when ``G >= P``, its piece of its
    group's channels when ``G < P`` (which may be empty when the group has fewer channels than
    the team has ranks).
    """
    if channels % groups != 0:
        raise PlacementError(f"channels={channels} must be divisible by groups={groups}")
    check_placeable(groups, world_size)
    if groups >= world_size:
        return place(channels, channels, groups, world_size, rank).out_slice
    team_size = world_size // groups
    per_group = channels // groups
    group, team_rank = divmod(rank, team_size)
    c0, c1 = balanced_split(per_group, team_size)[team_rank]
    return (group * per_group + c0, group * per_group + c1)
