"""mpgroups: model-parallel grouped convolution for PyTorch.

The conv groups of ``nn.Conv1d/2d/3d(groups=G)`` are placed on the ranks of a process group;
with no process group the layers are plain single-device convolutions.
"""

from mpgroups import models
from mpgroups.comm.checks import InputMismatchError
from mpgroups.comm.counter import CommCounter
from mpgroups.comm.spatial_transfer import gather_spatial, scatter_spatial, spatial_shard
from mpgroups.comm.transfer import gather_channels, scatter_channels
from mpgroups.layers.channel_modules import GatherChannels
from mpgroups.layers.conv import GroupParallelConv1d, GroupParallelConv2d, GroupParallelConv3d
from mpgroups.layers.linear import ParallelLinear
from mpgroups.layers.spatial_conv import SpatialConv1d, SpatialConv2d, SpatialConv3d
from mpgroups.plans.auto_plan import auto_plan
from mpgroups.plans.dtensor_model import distribute_parameters
from mpgroups.plans.global_batch import match_global_batch
from mpgroups.plans.parallelize import PlanError, parallelize, unparallelize
from mpgroups.plans.styles import DEPRECATED_STYLES, ChannelLocal, NoParallel, ParallelLayer, Plan
from mpgroups.plans.tp_styles import ChannelwiseNorm, GroupwiseParallel
from mpgroups.sharding.placement import GroupPlacement, PlacementError, place
from mpgroups.state.checkpoint import (
    CheckpointError,
    atomic_save,
    load_sharded_state_dict,
    safe_load,
    save_sharded_state_dict,
)
from mpgroups.state.state_dict import (
    full_grad_dict,
    full_state_dict,
    load_full_state_dict,
    local_parameter_bytes,
)

__all__ = [
    "ChannelLocal",
    "ChannelwiseNorm",
    "CheckpointError",
    "CommCounter",
    "GatherChannels",
    "GroupParallelConv1d",
    "GroupParallelConv2d",
    "GroupParallelConv3d",
    "GroupPlacement",
    "GroupwiseParallel",
    "InputMismatchError",
    "NoParallel",
    "ParallelLayer",
    "ParallelLinear",
    "Plan",
    "PlacementError",
    "PlanError",
    "SpatialConv1d",
    "SpatialConv2d",
    "SpatialConv3d",
    "atomic_save",
    "auto_plan",
    "distribute_parameters",
    "full_grad_dict",
    "full_state_dict",
    "gather_channels",
    "gather_spatial",
    "load_full_state_dict",
    "load_sharded_state_dict",
    "local_parameter_bytes",
    "match_global_batch",
    "models",
    "parallelize",
    "place",
    "safe_load",
    "save_sharded_state_dict",
    "scatter_channels",
    "scatter_spatial",
    "spatial_shard",
    "unparallelize",
]

__version__ = "0.1.0"

# Names of mpgroups 0.1 that read like torch's own (GroupParallel beside GroupwiseParallel,
# Replicated beside Replicate, Placement beside DTensor's Placement): kept for one release.
_DEPRECATED = {**DEPRECATED_STYLES, "Placement": ("GroupPlacement", GroupPlacement)}


def __getattr__(name: str):
    if name in _DEPRECATED:
        import warnings

        new, value = _DEPRECATED[name]
        warnings.warn(
            f"mpgroups.{name} is deprecated and will be removed in the next release; use "
            f"mpgroups.{new}",
            FutureWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module 'mpgroups' has no attribute {name!r}")
