"""Plan styles: small objects that only *describe* how one module runs in parallel.

A plan is a dict from module names (as in ``model.named_modules()``; ``fnmatch`` patterns
such as ``"layer*.*.conv2"`` allowed) to a style; :func:`mpgroups.parallelize` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpgroups.layout import check_layout

__all__ = ["ChannelLocal", "GroupParallel"]


@dataclass(frozen=True)
class GroupParallel:
    """A conv (any ``groups``) becomes its ``GroupParallelConvNd`` with these layouts.

    Every grouped conv that the plan does not name gets ``GroupParallel()`` (the drop-in,
    replicated → replicated). Name a conv with ``groups=1`` to make it column-parallel.
    """

    input_layout: str = "replicated"
    output_layout: str = "replicated"

    def __post_init__(self) -> None:
        check_layout("input_layout", self.input_layout)
        check_layout("output_layout", self.output_layout)


@dataclass(frozen=True)
class ChannelLocal:
    """A per-channel module that receives a sharded activation and runs on the local shard.

    BatchNorm, InstanceNorm and GroupNorm (each shard holding whole norm groups) keep their
    rows of the parameters and buffers; channel-agnostic modules (activations, pooling,
    dropout) are unchanged and need an entry only to end the chain. With
    ``output_layout="replicated"`` the module's output is all-gathered, ending the chain.

    ``channels`` and ``groups`` give the sharded layout; by default those of the nearest
    sharded-output conv before this module in ``model.named_modules()`` order.
    """

    output_layout: str = "sharded"
    channels: int | None = None
    groups: int | None = None

    def __post_init__(self) -> None:
        check_layout("output_layout", self.output_layout)
