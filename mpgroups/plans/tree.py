"""What every plan needs of a module tree: its error, and putting a module in another's place."""

from __future__ import annotations

from torch import nn

__all__ = ["PlanError", "replace_module"]


class PlanError(ValueError):
    """A plan that cannot be applied, or a sharded activation where a whole tensor is needed."""


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` under ``root`` (``""`` is the root itself); return the root."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new
    return root
