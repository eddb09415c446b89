"""Layouts of an activation and the channel shards of a layer (docs/design.md §3).

Pure bookkeeping on channel counts and ranks: nothing here moves data or calls
``torch.distributed``, so all of it is tested without processes.

* ``"replicated"``: every rank holds the whole tensor ``[N, C, *spatial]``.
* ``"sharded"``: rank ``r`` holds the channels :func:`~mpgroups.sharding.placement.shard_slice`
  gives it, ``[N, c_r, *spatial]``.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any

from mpgroups.sharding.placement import GroupPlacement, PlacementError, Slice, place, shard_slice

__all__ = [
    "LAYOUTS",
    "NOT_PICKLABLE",
    "SPLITS",
    "ChannelShards",
    "LayerShards",
    "canonical_split",
    "check_layout",
    "check_split",
    "communicates",
    "layout_name",
    "layer_shards",
    "layout_shards",
]

LAYOUTS = ("replicated", "sharded")
NOT_PICKLABLE = (
    "a group-parallel module cannot be pickled: it holds a process group, which does not "
    "travel to another process. Save mpgroups.full_state_dict(model) (or "
    "mpgroups.save_sharded_state_dict) and load it into a model built there."
)


def check_layout(name: str, layout: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")


def layout_name(layout, argument: str, channel_dims: tuple[int, ...]) -> str:
    """The layout ``layout`` names: ``"replicated"`` for DTensor's ``Replicate()``,
    ``"sharded"`` for ``Shard(d)`` with ``d`` one of ``channel_dims`` (the tensor dims that
    hold the channels, or a Linear's features), or one of :data:`LAYOUTS` as it is.

    A ``Shard`` here means split along the channels by the placement rule, which is
    ``torch.chunk``'s split whenever the ranks divide the channels and groups evenly. The
    placements are read through their own ``is_replicate``/``is_shard`` (this module imports
    no torch).

    Raises:
        ValueError: naming ``argument``, for anything else (``Partial()``, another dim).
    """
    if isinstance(layout, str):
        check_layout(argument, layout)
        return layout
    if callable(getattr(layout, "is_replicate", None)) and layout.is_replicate():
        return "replicated"
    if callable(getattr(layout, "is_shard", None)) and layout.is_shard():
        if layout.dim in channel_dims:
            return "sharded"
    dims = " or ".join(f"Shard({d})" for d in channel_dims)
    raise ValueError(
        f"{argument} must be Replicate(), {dims} (split along the channels), or one of "
        f"{LAYOUTS}; got {layout!r}"
    )


@dataclass(frozen=True, eq=False)
class ChannelShards:
    """How one tensor dimension is split over a process group.

    Attributes:
        process_group: the ``ProcessGroup`` the slices are spread over, or ``None`` for a
            single rank.
        slices: ``(start, stop)`` per rank of the group, starting at 0, contiguous, in rank
            order; uneven (even empty) slices allowed.
        rank: this process's rank in the group.

    Immutable, and copies of it share the process group: ``copy.deepcopy`` of a module that
    holds one returns the same object. Pickling one that holds a process group raises, since
    a process group cannot travel to another process.
    """

    process_group: Any
    slices: tuple[Slice, ...]
    rank: int

    def __post_init__(self) -> None:
        if not self.slices or self.slices[0][0] != 0:
            raise ValueError(f"shard slices must start at 0, got {self.slices}")
        if any(a[1] != b[0] for a, b in zip(self.slices, self.slices[1:], strict=False)):
            raise ValueError(f"shard slices must be contiguous, got {self.slices}")
        if not 0 <= self.rank < len(self.slices):
            raise ValueError(f"rank {self.rank} has no slice in {self.slices}")

    @property
    def world_size(self) -> int:
        return len(self.slices)

    @property
    def own(self) -> Slice:
        """This rank's ``(start, stop)``."""
        return self.slices[self.rank]

    @property
    def total(self) -> int:
        return self.slices[-1][1]

    @property
    def widths(self) -> list[int]:
        return [stop - start for start, stop in self.slices]

    def __copy__(self) -> ChannelShards:
        return self

    def __deepcopy__(self, memo) -> ChannelShards:
        return self

    def __reduce_ex__(self, protocol):
        if self.process_group is not None:
            raise TypeError(NOT_PICKLABLE)
        return super().__reduce_ex__(protocol)


def layout_shards(
    channels: int, groups: int, world_size: int, rank: int, process_group=None
) -> ChannelShards:
    """The sharded layout of ``channels`` channels for conv ``groups`` on ``world_size`` ranks."""
    slices = tuple(shard_slice(channels, groups, world_size, r) for r in range(world_size))
    return ChannelShards(process_group, slices, rank)


# Which dimension of a layer's weight the ranks divide, in the words of torch's
# ColwiseParallel/RowwiseParallel: "colwise" shards the weight's rows (output channels),
# "rowwise" its columns (input channels; the ranks' partial sums are added).
SPLITS = ("colwise", "rowwise")
# The spellings of mpgroups 0.1, kept for one release.
DEPRECATED_SPLITS = {"out": "colwise", "in": "rowwise"}


def _outside_package_stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside mpgroups: a warning points at the user's
    line, however many of our frames lie between (a layer built by ``from_conv``, a style)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def ours(code) -> bool:  # our files, and the __init__ a dataclass generates for a style
        generated = code.co_filename == "<string>" and code.co_name == "__init__"
        return generated or os.path.abspath(code.co_filename).startswith(package)

    frame, level = sys._getframe(1), 1
    while frame is not None and ours(frame.f_code):
        frame, level = frame.f_back, level + 1
    return level


def canonical_split(split: str) -> str:
    """``split`` as one of :data:`SPLITS`; the deprecated ``"out"``/``"in"`` with a
    ``FutureWarning`` at the caller's line; anything else raises ``ValueError``."""
    if split in DEPRECATED_SPLITS:
        new = DEPRECATED_SPLITS[split]
        warnings.warn(
            f"split={split!r} is deprecated and will be removed in the next release; use "
            f"split={new!r} (the same weight split as torch's "
            f"{'Colwise' if new == 'colwise' else 'Rowwise'}Parallel)",
            FutureWarning,
            stacklevel=_outside_package_stacklevel(),
        )
        return new
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


@dataclass(frozen=True)
class LayerShards:
    """The channel splits one group-parallel layer works with.

    Attributes:
        placement: what this rank owns (:func:`~mpgroups.sharding.placement.place`; with
            ``split="rowwise"`` or ``shard_groups`` its ``in_slice``/``out_slice`` are those of the
            layer).
        inputs: the sharded layout of the layer's input channels.
        outputs: the sharded layout of its output channels (each rank's ``out_slice``).
        team_slices: for a filter split (``G < P``), how the team's group input channels
            split over the team, relative to the group's first channel; else ``None``.
        split: which dimension of the weight the ranks divide: ``"colwise"`` (rows: each
            rank its output channels' filters) or ``"rowwise"`` (columns: each rank the
            filters' input channels it holds; the ranks' partial sums are added). Whole groups
            per rank (``G >= P``) are always ``"colwise"``: the two coincide.
    """

    placement: GroupPlacement
    inputs: ChannelShards
    outputs: ChannelShards
    team_slices: tuple[Slice, ...] | None
    split: str = "colwise"

    def team(self, team_process_group) -> ChannelShards:
        """The team's input split over ``team_process_group`` (a filter split only)."""
        if self.team_slices is None:
            raise ValueError("this layer holds whole groups: it has no team")
        return ChannelShards(team_process_group, self.team_slices, self.placement.team_rank)

    @property
    def weight(self) -> tuple[ChannelShards, int]:
        """How the weight ``[C_out, C_in / G, ...]`` splits: ``(shards, dim)``."""
        if self.split == "rowwise":
            return self.inputs, 1
        return self.outputs, 0


def check_split(split: str, groups: int, world_size: int, input_layout: str) -> None:
    """Raise ``ValueError`` unless the layer can divide its weight along ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "rowwise" and input_layout != "sharded":
        raise ValueError(
            "split='rowwise' (row-parallel) sums partial results of each rank's input channels: "
            "it needs input_layout='sharded'"
        )
    if split == "rowwise" and 1 < groups < world_size:
        if world_size % groups == 0:
            works = "use split='colwise' (each team splits its group's filters)"
        else:
            works = (
                f"nor can split='colwise' place groups={groups} on {world_size} ranks (the "
                f"ranks must form equal teams, one per group): leave the layer whole "
                f"(NoParallel), or use a process group whose size divides by {groups}"
            )
        raise ValueError(
            f"split='rowwise' with 1 < groups={groups} < world size {world_size} is not "
            f"supported; {works}"
        )


def layer_shards(
    in_channels: int,
    out_channels: int,
    groups: int,
    world_size: int,
    rank: int,
    process_group=None,
    *,
    split: str = "colwise",
    shard_groups: int | None = None,
    input_layout: str = "replicated",
    output_layout: str = "replicated",
) -> LayerShards:
    """Apply the placement rule to every rank and collect the splits of one layer.

    ``shard_groups`` (only with ``groups=1``) lays the layer's sharded sides out as those of a
    conv with ``shard_groups`` groups, so a dense layer pairs with a grouped neighbour whose
    groups do not split evenly (a ``groups=1`` layer may split its channels any way).
    """
    check_split(split, groups, world_size, input_layout)
    if groups >= world_size:
        split = "colwise"
    if shard_groups is not None and shard_groups != groups:
        if groups != 1:
            raise ValueError(
                f"shard_groups={shard_groups} applies to a groups=1 layer; this one has "
                f"groups={groups}, which decides its shards"
            )
        in_groups = shard_groups if input_layout == "sharded" else 1
        out_groups = shard_groups if output_layout == "sharded" else 1
    else:
        in_groups = out_groups = groups
    inputs = layout_shards(in_channels, in_groups, world_size, rank, process_group)
    if split == "rowwise":
        # Row-parallel (groups=1 here): every rank reads its input shard and adds into all
        # outputs; the bias rows follow the output shards (some may be empty).
        if in_channels % groups or out_channels % groups:
            place(in_channels, out_channels, groups, world_size, rank)  # raises with the reason
        outputs = layout_shards(out_channels, out_groups, world_size, rank, process_group)
        if 0 in inputs.widths:
            raise PlacementError(
                f"split='rowwise' gives every rank a piece of the {in_channels} input channels, "
                f"but the shards {list(inputs.slices)} leave a rank without one"
            )
        placement = GroupPlacement(
            rank, world_size, groups, (0, 1), inputs.own, outputs.own, (0, world_size)
        )
    else:
        placement = place(in_channels, out_channels, groups, world_size, rank)
        if out_groups != groups:
            outputs = layout_shards(out_channels, out_groups, world_size, rank, process_group)
            if 0 in outputs.widths:
                raise PlacementError(
                    f"the output shards {list(outputs.slices)} of {out_channels} channels "
                    f"leave a rank without an output channel"
                )
            placement = replace(placement, out_slice=outputs.own)
        else:
            outputs = ChannelShards(
                process_group,
                tuple(
                    place(in_channels, out_channels, groups, world_size, r).out_slice
                    for r in range(world_size)
                ),
                rank,
            )
    team_slices = None
    if placement.filter_split:
        team_start, team_stop = placement.team
        absolute = inputs.slices[team_start:team_stop]
        offset = absolute[0][0]
        team_slices = tuple((a - offset, b - offset) for a, b in absolute)
    return LayerShards(placement, inputs, outputs, team_slices, split)


def communicates(placement: GroupPlacement, input_layout: str, output_layout: str) -> bool:
    """Whether a call of the layer can issue a collective, forward or backward (docs/design.md §3).

    Decided from the configuration alone, never from the input, so every rank agrees. Only a
    sharded → sharded layer holding whole groups computes alone.
    """
    if placement.world_size == 1:
        return False
    if input_layout == "sharded" and output_layout == "sharded":
        return placement.filter_split
    return True
