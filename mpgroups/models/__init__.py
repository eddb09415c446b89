"""Models built group-parallel over a process group."""

from mpgroups.models.alexnet import AlexNet

__all__ = ["AlexNet"]
