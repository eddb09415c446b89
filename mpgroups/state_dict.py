"""State dicts of the equivalent single-device model, from a parallelized one, and back.

A parallel module's state holds its rows of the full tensors along dim 0 (``weight`` and
``bias`` of a group-parallel conv, the per-channel state of a sharded BatchNorm); every other
entry is the same on every rank. The full state dict has the keys, order and shapes of the
original ``torch.nn`` model, so it loads there with ``strict=True``.
"""

from __future__ import annotations

from torch import Tensor, nn

from mpgroups.channel_modules import row_shards
from mpgroups.collectives import gather_rows
from mpgroups.input_checks import check_same_call
from mpgroups.layout import ChannelShards

__all__ = [
    "full_grad_dict",
    "full_state_dict",
    "load_full_state_dict",
    "local_parameter_bytes",
    "model_process_group",
    "sharded_keys",
]


def sharded_keys(model: nn.Module) -> dict[str, ChannelShards]:
    """``{state_dict key: how its rows split over ranks}`` for the entries split along dim 0."""
    keys: dict[str, ChannelShards] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        shards = row_shards(module)
        if shards is None:
            continue
        dot = f"{prefix}." if prefix else ""
        named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in named:
            if tensor is not None and tensor.dim() >= 1:
                keys[dot + name] = shards
    return keys


def _group_shards(sharded: dict[str, ChannelShards]) -> ChannelShards | None:
    for shards in sharded.values():
        if shards.world_size > 1:
            return shards
    return None


def model_process_group(model: nn.Module):
    """The process group the model's sharded state is spread over, or ``None``."""
    shards = _group_shards(sharded_keys(model))
    return None if shards is None else shards.process_group


def _gather_all(
    items: dict[str, Tensor], sharded: dict[str, ChannelShards], rank0_only: bool, what: str
) -> dict[str, Tensor]:
    group_shards = _group_shards(sharded)
    if group_shards is None:
        return {key: value.detach() for key, value in items.items()}
    # Every rank must gather the same entries in the same order: check that before the first.
    layout = [
        (key, shards.total, tuple(items[key].shape[1:]))
        for key, shards in sharded.items()
        if key in items and shards.world_size > 1
    ]
    check_same_call(what, tuple(layout), group_shards.process_group)
    keep = not rank0_only or group_shards.rank == 0
    out = {}
    for key, value in items.items():
        shards = sharded.get(key)
        if shards is not None and shards.world_size > 1:
            value = gather_rows(value, shards, dst=0 if rank0_only else None)
        if keep:
            out[key] = value
    return out


def full_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, Tensor]:
    """``model.state_dict()`` of the equivalent single-device model (a collective).

    Same keys in the same order as the unconverted model, full shapes. With
    ``rank0_only=True`` only rank 0 of the model's process group receives the entries (a
    gather instead of an all-gather); the other ranks get an empty dict.
    """
    what = f"full_state_dict of {type(model).__name__}"
    return _gather_all(model.state_dict(), sharded_keys(model), rank0_only, what)


def full_grad_dict(model: nn.Module) -> dict[str, Tensor | None]:
    """``{parameter name: full gradient}`` as the single-device model would hold (a collective).

    Parameters without a gradient map to ``None`` on every rank.
    """
    sharded = sharded_keys(model)
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.grad is None]
    grads = {name: p.grad for name, p in params.items() if p.grad is not None}
    full = _gather_all(grads, sharded, False, f"full_grad_dict of {type(model).__name__}")
    return {name: full.get(name) if name not in missing else None for name in params}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor], strict: bool = True):
    """Load a full (single-device) state dict: each rank keeps its rows of the sharded entries.

    Returns what ``model.load_state_dict`` returns.

    Raises:
        ValueError: an entry's shape is not the full shape of the matching parallel entry.
        RuntimeError: missing or unexpected keys with ``strict=True`` (from ``load_state_dict``).
    """
    sharded = sharded_keys(model)
    local = model.state_dict()
    to_load = {}
    for key, value in state_dict.items():
        shards = sharded.get(key)
        if shards is not None:
            expected = (shards.total, *local[key].shape[1:])
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"state_dict['{key}'] has shape {tuple(value.shape)}, the full tensor of "
                    f"this model has shape {expected}"
                )
            start, stop = shards.own
            value = value[start:stop]
        to_load[key] = value
    return model.load_state_dict(to_load, strict=strict)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards plus the replicated ones)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
