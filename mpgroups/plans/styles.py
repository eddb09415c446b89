"""Plan styles: small objects that only *describe* how one module runs in parallel.

A plan is a dict from module names (as in ``model.named_modules()``; ``fnmatch`` patterns
such as ``"layer*.*.conv2"`` allowed) to a style; :func:`mpgroups.parallelize` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpgroups.sharding.layout import check_layout, check_split

__all__ = ["ChannelLocal", "GroupParallel", "Replicated"]


@dataclass(frozen=True)
class GroupParallel:
    """A conv (any ``groups``) becomes its ``GroupParallelConvNd``, an ``nn.Linear`` a
    :class:`~mpgroups.ParallelLinear`, with these layouts and this ``split``.

    Every grouped conv that the plan does not name gets ``GroupParallel()`` (the drop-in,
    replicated → replicated). A ``groups=1`` conv or a Linear with ``split="out"`` is
    column-parallel, with ``split="in"`` (``input_layout="sharded"``) row-parallel.
    ``shard_groups`` lays a ``groups=1`` layer's sharded sides out as those of a conv with
    that many groups, so it pairs with a grouped neighbour (see DESIGN §3b).
    """

    input_layout: str = "replicated"
    output_layout: str = "replicated"
    split: str = "out"
    shard_groups: int | None = None

    def __post_init__(self) -> None:
        check_layout("input_layout", self.input_layout)
        check_layout("output_layout", self.output_layout)
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
        check_layout("output_layout", self.output_layout)


@dataclass(frozen=True)
class Replicated:
    """The module stays as it is, whole on every rank (a grouped conv is not converted: for
    groups that cannot be placed on the process group's size, or to keep a layer local)."""
