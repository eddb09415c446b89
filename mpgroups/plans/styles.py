"""Plan styles: small objects that only *describe* how one module runs in parallel.

A plan is a dict from module names (as in ``model.named_modules()``; ``fnmatch`` patterns
such as ``"layer*.*.conv2"`` allowed) to a style; :func:`mpgroups.parallelize` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpgroups.sharding.layout import canonical_split, check_split, layout_name

__all__ = ["DEPRECATED_STYLES", "ChannelLocal", "NoParallel", "ParallelLayer", "Plan"]

# A style's layouts name channels: dim 1 of a conv's activation, the last dim of a Linear's.
_CHANNEL_DIMS = (1, -1)


def _set_layout(style, argument: str) -> None:
    object.__setattr__(
        style, argument, layout_name(getattr(style, argument), argument, _CHANNEL_DIMS)
    )


@dataclass(frozen=True)
class ParallelLayer:
    """A conv (any ``groups``) becomes its ``GroupParallelConvNd``, an ``nn.Linear`` a
    :class:`~mpgroups.ParallelLinear`, with these layouts and this ``split``.

    Layouts are DTensor placements, ``Replicate()`` or ``Shard(1)`` (``Shard(-1)`` for a
    Linear), or their names ``"replicated"``/``"sharded"``; the style holds the names.

    Every grouped conv that the plan does not name gets ``ParallelLayer()`` (the drop-in,
    replicated → replicated). A ``groups=1`` conv or a Linear with ``split="colwise"`` is
    column-parallel (torch's ``ColwiseParallel``), with ``split="rowwise"`` (a sharded input)
    row-parallel (``RowwiseParallel``).
    ``shard_groups`` lays a ``groups=1`` layer's sharded sides out as those of a conv with
    that many groups, so it pairs with a grouped neighbour (see docs/design.md §3b).
    """

    input_layout: str = "replicated"
    output_layout: str = "replicated"
    split: str = "colwise"
    shard_groups: int | None = None

    def __post_init__(self) -> None:
        _set_layout(self, "input_layout")
        _set_layout(self, "output_layout")
        object.__setattr__(self, "split", canonical_split(self.split))
        check_split(self.split, 1, 1, self.input_layout)

    def layer_kwargs(self) -> dict:
        """The keyword arguments of the parallel layer this style builds."""
        return {
            "input_layout": self.input_layout,
            "output_layout": self.output_layout,
            "split": self.split,
            "shard_groups": self.shard_groups,
        }


@dataclass(frozen=True)
class ChannelLocal:
    """A per-channel module that receives a sharded activation and runs on the local shard.

    BatchNorm, InstanceNorm and GroupNorm (each shard holding whole norm groups) keep their
    rows of the parameters and buffers; dropout becomes a
    :class:`~mpgroups.layers.channel_modules.ShardedDropout` (the whole tensor's mask, its slice
    kept); channel-agnostic modules (activations, pooling, ``nn.Flatten``) are unchanged and
    need an entry only to end the chain. With
    ``output_layout="replicated"`` the module's output is all-gathered, ending the chain.

    ``channels`` and ``groups`` give the sharded layout; by default those of the nearest
    sharded-output conv before this module in ``model.named_modules()`` order.
    """

    output_layout: str = "sharded"
    channels: int | None = None
    groups: int | None = None

    def __post_init__(self) -> None:
        _set_layout(self, "output_layout")


@dataclass(frozen=True)
class NoParallel:
    """The module stays as it is, whole on every rank (a grouped conv is not converted: for
    groups that cannot be placed on the process group's size, or to keep a layer local); the
    name torchtitan gives the same style."""


class Plan(dict):
    """A plan made for a process group of ``world_size`` ranks (what
    :func:`mpgroups.auto_plan` returns): a ``dict`` of module names to styles, to print, edit
    and pass to :func:`mpgroups.parallelize`, which refuses it over a group of another size
    (a plan for 4 ranks leaves ``groups=3`` whole; over 2 ranks it would silently replicate
    layers that could be split, and shard others as no group of that size can)."""

    def __init__(self, styles=(), *, world_size: int) -> None:
        super().__init__(styles)
        self.world_size = world_size

    def __repr__(self) -> str:
        return f"Plan({dict.__repr__(self)}, world_size={self.world_size})"


# The names of mpgroups 0.1, kept for one release: name -> (new name, the class).
DEPRECATED_STYLES = {
    "GroupParallel": ("ParallelLayer", ParallelLayer),
    "Replicated": ("NoParallel", NoParallel),
}
