"""Moving a module's hooks to the module that replaces it.

When ``parallelize`` (or a ``parallelize_module`` style) puts a parallel layer where a
``torch.nn`` one was, the hooks users registered on the old module, and the handles they hold
to remove them, keep working on the new one.
"""

from __future__ import annotations

from torch import nn

__all__ = ["HOOK_DICTS", "move_hooks"]

# A module's hook registries (``nn.Module.__init__`` creates each of them).
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the hook registries of ``old`` (the same dicts: handles stay valid)."""
    for attr in HOOK_DICTS:
        setattr(new, attr, getattr(old, attr))
