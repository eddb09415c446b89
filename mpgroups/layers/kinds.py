"""The ``torch.nn`` layers mpgroups replaces, and the parallel layer that replaces each."""

from __future__ import annotations

from torch import nn

from mpgroups.layers.conv import (
    GroupParallelConv1d,
    GroupParallelConv2d,
    GroupParallelConv3d,
    _GroupParallelConvNd,
)
from mpgroups.layers.linear import ParallelLinear

__all__ = ["CONVS", "PARALLEL_CONV_OF", "PARALLEL_LAYERS", "PARALLEL_OF"]

CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PARALLEL_CONV_OF: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: GroupParallelConv1d,
    nn.Conv2d: GroupParallelConv2d,
    nn.Conv3d: GroupParallelConv3d,
}
PARALLEL_OF: dict[type[nn.Module], type[nn.Module]] = {
    **PARALLEL_CONV_OF,
    nn.Linear: ParallelLinear,
}
PARALLEL_LAYERS: tuple[type[nn.Module], ...] = (_GroupParallelConvNd, ParallelLinear)
