"""mpgroups: model-parallel grouped convolution for PyTorch.

The conv groups of ``nn.Conv1d/2d/3d(groups=G)`` are placed on the ranks of a process group;
with no process group the layers are plain single-device convolutions.
"""

from mpgroups.collectives import gather_channels, scatter_channels
from mpgroups.conv import GroupParallelConv1d, GroupParallelConv2d, GroupParallelConv3d
from mpgroups.counter import CommCounter
from mpgroups.placement import Placement, PlacementError, place

__all__ = [
    "CommCounter",
    "GroupParallelConv1d",
    "GroupParallelConv2d",
    "GroupParallelConv3d",
    "Placement",
    "PlacementError",
    "gather_channels",
    "place",
    "scatter_channels",
]

__version__ = "0.1.0"
