"""mpgroups: model-parallel grouped convolution for PyTorch.

The conv groups of ``nn.Conv1d/2d/3d(groups=G)`` are placed on the ranks of a process group;
with no process group the layers are plain single-device convolutions.
"""

from mpgroups import models
from mpgroups.auto_plan import auto_plan
from mpgroups.channel_modules import GatherChannels
from mpgroups.channel_transfer import gather_channels, scatter_channels
from mpgroups.checkpoint import (
    CheckpointError,
    atomic_save,
    load_sharded_state_dict,
    safe_load,
    save_sharded_state_dict,
)
from mpgroups.conv import GroupParallelConv1d, GroupParallelConv2d, GroupParallelConv3d
from mpgroups.counter import CommCounter
from mpgroups.global_batch import match_global_batch
from mpgroups.input_checks import InputMismatchError
from mpgroups.linear import ParallelLinear
from mpgroups.parallelize import PlanError, parallelize, unparallelize
from mpgroups.placement import Placement, PlacementError, place
from mpgroups.plan import ChannelLocal, GroupParallel, Replicated
from mpgroups.state_dict import (
    full_grad_dict,
    full_state_dict,
    load_full_state_dict,
    local_parameter_bytes,
)
from mpgroups.tp_styles import ChannelwiseNorm, GroupwiseParallel

__all__ = [
    "ChannelLocal",
    "ChannelwiseNorm",
    "CheckpointError",
    "CommCounter",
    "GatherChannels",
    "GroupParallel",
    "GroupParallelConv1d",
    "GroupParallelConv2d",
    "GroupParallelConv3d",
    "GroupwiseParallel",
    "InputMismatchError",
    "ParallelLinear",
    "Placement",
    "PlacementError",
    "PlanError",
    "Replicated",
    "atomic_save",
    "auto_plan",
    "full_grad_dict",
    "full_state_dict",
    "gather_channels",
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
    "unparallelize",
]

__version__ = "0.1.0"
