"""mpgroups: model-parallel grouped convolution for PyTorch.

The conv groups of ``nn.Conv1d/2d/3d(groups=G)`` are placed on the ranks of a process group;
with no process group the layers are plain single-device convolutions.
"""

from mpgroups import models
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
from mpgroups.input_checks import InputMismatchError
from mpgroups.parallelize import PlanError, parallelize, unparallelize
from mpgroups.placement import Placement, PlacementError, place
from mpgroups.plan import ChannelLocal, GroupParallel
from mpgroups.state_dict import (
    full_grad_dict,
    full_state_dict,
    load_full_state_dict,
    local_parameter_bytes,
)

__all__ = [
    "ChannelLocal",
    "CheckpointError",
    "CommCounter",
    "GatherChannels",
    "GroupParallel",
    "GroupParallelConv1d",
    "GroupParallelConv2d",
    "GroupParallelConv3d",
    "InputMismatchError",
    "Placement",
    "PlacementError",
    "PlanError",
    "atomic_save",
    "full_grad_dict",
    "full_state_dict",
    "gather_channels",
    "load_full_state_dict",
    "load_sharded_state_dict",
    "local_parameter_bytes",
    "models",
    "parallelize",
    "place",
    "safe_load",
    "save_sharded_state_dict",
    "scatter_channels",
    "unparallelize",
]

__version__ = "0.1.0"
