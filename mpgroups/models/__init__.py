"""Models built group-parallel over a process group, and plain ones the plans split."""

from mpgroups.models.alexnet import AlexNet
from mpgroups.models.unet import UNet

__all__ = ["AlexNet", "UNet"]
