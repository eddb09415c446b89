"""State dicts of the equivalent single-device model, from a parallelized one, and back.

A parallel module's state holds its slices of the full tensors: rows (dim 0) of a
group-parallel conv's ``weight`` and ``bias`` and of a sharded BatchNorm's state, columns
(dim 1) of a row-parallel (``split="rowwise"``) layer's ``weight``; every other entry is the same
on every rank. A parallelized model holds them as ``DTensor`` s (``Shard(dim)`` of the slice,
or the whole tensor ``Replicate()`` where the split is not ``torch.chunk``'s, see
:mod:`mpgroups.layers.dtensor_state`), a layer placed by hand as plain tensors of the slice;
:func:`local_rows` reads either as the slice. The full state dict has the keys, order and
shapes of the original ``torch.nn`` model, so it loads there with ``strict=True``.

Under FSDP2 (``fully_shard(model, mesh=mesh["dp"])`` around a model parallelized over
``mesh["gp"]``) parameters and gradients are ``DTensor``s sharded over the data-parallel mesh:
each is first made whole over its mesh (``full_tensor``, a collective), then gathered over the
group-parallel ranks as any entry; loading distributes a plain entry back into a ``DTensor``
parameter (each rank keeps its part). A ``DTensor`` that itself spans the split (the entries
of ``GroupwiseParallel``/``ChannelwiseNorm`` and torch's tensor-parallel styles) is made whole
by DTensor and loaded as its placement says.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mpgroups.comm.checks import check_same_call
from mpgroups.comm.collectives import gather_rows
from mpgroups.layers.channel_modules import tensor_shards
from mpgroups.layers.dtensor_state import local_tensor, own_rows
from mpgroups.sharding.layout import ChannelShards

__all__ = [
    "fsdp_process_group",
    "full_grad_dict",
    "full_state_dict",
    "load_full_state_dict",
    "local_parameter_bytes",
    "local_rows",
    "model_process_group",
    "sharded_keys",
]


def sharded_keys(model: nn.Module) -> dict[str, tuple[ChannelShards, int]]:
    """``{state_dict key: (shards, dim)}`` for the entries split over ranks along ``dim``."""
    keys: dict[str, tuple[ChannelShards, int]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, split in tensor_shards(module).items():
            keys[dot + name] = split
    return keys


def _group_shards(sharded: dict[str, tuple[ChannelShards, int]]) -> ChannelShards | None:
    for shards, _ in sharded.values():
        if shards.world_size > 1:
            return shards
    return None


def model_process_group(model: nn.Module):
    """The process group the model's sharded state is spread over, or ``None``."""
    shards = _group_shards(sharded_keys(model))
    return None if shards is None else shards.process_group


def fsdp_process_group(model: nn.Module):
    """The process group FSDP2 (``fully_shard``) shards ``model``'s parameters over: the 1-D
    mesh of its ``DTensor`` parameters, or the first dim of a 2-D one (FSDP2 lays a
    parameter that already was a ``DTensor``, such as a parallelized model's, out on its
    ``(dp, gp)`` mesh, dp first). ``None`` when no module of ``model`` is fully sharded
    (``DTensor`` parameters alone are not data parallel) or the mesh has more dimensions."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(module, FSDPModule) for module in model.modules()):
        return None
    for param in model.parameters():
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            return mesh.get_group(0) if mesh.ndim <= 2 else None
    return None


def _is_whole(value, shards: ChannelShards, dim: int) -> bool:
    """True when ``value`` is a ``DTensor`` that spans the whole split (a parallelized model's
    and the styles' entries). Every rank decides alike (a DTensor's shape is the global one)."""
    return isinstance(value, DTensor) and value.shape[dim] == shards.total


def local_rows(
    items: dict[str, Tensor | None], sharded: dict[str, tuple[ChannelShards, int]]
) -> dict[str, Tensor | None]:
    """``items`` in mpgroups' terms, detached: an entry split over the model's ranks as this
    rank's rows (``shards.own`` along ``dim``), every other entry whole. A ``DTensor`` that
    holds the rows gives its local tensor; any other ``DTensor`` (FSDP2's shards over dp) is
    made whole first, a collective over its mesh, in the order of ``items``."""
    out = {}
    for key, value in items.items():
        split = sharded.get(key)
        if split is not None and _is_whole(value, *split):
            shards, dim = split
            if value.device_mesh.ndim == 1:
                value = own_rows(value.detach(), shards, dim)
            else:
                start, stop = shards.own
                value = value.detach().full_tensor().narrow(dim, start, stop - start)
        elif isinstance(value, DTensor):
            value = value.detach().full_tensor()
        out[key] = value if value is None else value.detach()
    return out


def _gather_all(
    items: dict[str, Tensor],
    sharded: dict[str, tuple[ChannelShards, int]],
    rank0_only: bool,
    what: str,
) -> dict[str, Tensor]:
    items = local_rows(items, sharded)
    group_shards = _group_shards(sharded)
    if group_shards is None:
        return items
    # Every rank must gather the same entries in the same order: check that before the first.
    layout = [
        (key, dim, shards.total, tuple(items[key].movedim(dim, 0).shape[1:]))
        for key, (shards, dim) in sharded.items()
        if key in items and shards.world_size > 1
    ]
    check_same_call(what, tuple(layout), group_shards.process_group)
    keep = not rank0_only or group_shards.rank == 0
    out = {}
    for key, value in items.items():
        shards, dim = sharded.get(key, (None, 0))
        if shards is not None and shards.world_size > 1:
            value = gather_rows(value, shards, dst=0 if rank0_only else None, dim=dim)
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
        shards, dim = sharded.get(key, (None, 0))
        if shards is not None and not _is_whole(local.get(key), shards, dim):
            expected = list(local[key].shape)
            expected[dim] = shards.total
            if list(value.shape) != expected:
                raise ValueError(
                    f"state_dict['{key}'] has shape {tuple(value.shape)}, the full tensor of "
                    f"this model has shape {tuple(expected)}"
                )
            start, stop = shards.own
            value = value.narrow(dim, start, stop - start)
        target = local.get(key)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            # FSDP2: each rank keeps its part of the data-parallel shards (no communication).
            value = distribute_tensor(
                value.to(device=target.device, dtype=target.dtype),
                target.device_mesh,
                target.placements,
                src_data_rank=None,
            )
        to_load[key] = value
    return model.load_state_dict(to_load, strict=strict)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards plus the replicated ones; of a
    ``DTensor`` parameter, its local part)."""
    return sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
