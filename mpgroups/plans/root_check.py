"""The check a parallelized model makes at its root, once per forward (docs/design.md §6):
one :class:`~mpgroups.comm.checks.RootCheck` over every rank the model spans, which the
checks of its layers follow."""

from __future__ import annotations

from torch import nn
from torch.utils.hooks import RemovableHandle

from mpgroups.comm.checks import InputGuard, RootCheck, fingerprint
from mpgroups.sharding.spatial import BlockGrid

__all__ = ["check_at_root"]


def check_at_root(
    model: nn.Module, process_group, guard_names: tuple[str, ...], split: BlockGrid | None = None
) -> list[RemovableHandle]:
    """Make ``model`` check its input once per forward over ``process_group`` (``split``: how
    the ranks hold blocks of it), its layers' guards (the attributes ``guard_names`` of every
    module) following that check; returns the hooks' handles."""
    guards = []
    for name, module in model.named_modules():
        for attribute in guard_names:
            guard = module.__dict__.get(attribute)
            if isinstance(guard, InputGuard):
                # Named by its place too: identical layers on different paths differ, so
                # ranks that took different branches never pair one's with another's.
                guard.site_id = fingerprint(guard.site_id, name)
                guards.append(guard)
    root = RootCheck(type(model).__name__, process_group, guards, split=split)
    return [
        model.register_forward_pre_hook(root, prepend=True, with_kwargs=True),
        model.register_forward_hook(root.finish, prepend=True, always_call=True),
    ]
