"""A module's state held as DTensors while its ``forward`` computes on local tensors.

torch's tools that reduce over a model's parameters (``clip_grad_norm_``/``get_total_norm``,
``GradScaler``'s overflow check, DCP's ``get_model_state_dict``, FSDP2) know that a tensor is
split over ranks only when it is a ``DTensor``: a plain local shard looks to them like the
whole tensor. :func:`distribute_state` turns a module's own parameters and per-channel buffers
into ``DTensor`` s on a 1-D ``DeviceMesh`` (``Shard(dim)`` for a split tensor, ``Replicate()``
for a copy every rank holds), under the same names, and registers two hooks: before
``forward`` each ``DTensor`` attribute is shadowed by its local tensor (``to_local()``:
differentiable, so gradients arrive on the ``DTensor`` parameter as ``DTensor`` s of the same
placement), after ``forward`` (also when it raises) the shadows go. The module's code therefore
runs exactly as before, on the local tensors, with no ``DTensor`` dispatch in the hot path;
``named_parameters()``, ``state_dict()`` and optimizers see the ``DTensor`` s.

Buffers updated in place during ``forward`` (BatchNorm's running statistics) are updated
through the local view, which shares the ``DTensor``'s storage.

A split must follow ``torch.chunk``'s rule (what ``Shard`` means: ``ceil(n / P)`` rows per
rank, the last fewer): :func:`chunk_slices` gives it, and :func:`distribute_state` refuses a
tensor whose rows on this rank differ, because DTensor's collectives (``full_tensor``, DCP's
offsets) would then compute on the wrong rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import Placement

from mpgroups.sharding.placement import Slice

__all__ = ["chunk_slices", "distribute_state", "dtensor_stride", "local_tensor"]


def chunk_slices(size: int, world_size: int) -> tuple[Slice, ...]:
    """``(start, stop)`` of what each rank holds of ``size`` items in a DTensor ``Shard`` over
    ``world_size`` ranks (``torch.chunk``'s split: ``ceil(size / P)`` per rank, the last ranks
    fewer or none), as torch itself computes it."""
    local_size_and_offset = getattr(Shard, "local_shard_size_and_offset", None)
    slices = []
    for rank in range(world_size):
        if local_size_and_offset is not None:
            length, start = local_size_and_offset(size, world_size, rank)
        else:  # older torch: the same torch.chunk arithmetic
            chunk = -(-size // world_size)
            start = min(size, chunk * rank)
            length = max(0, min(size, start + chunk) - start)
        slices.append((int(start), int(start) + int(length)))
    return tuple(slices)


def dtensor_stride(local: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a dense ``shape`` laid out in ``local``'s dim order (channels_last stays
    channels_last)."""
    order = sorted(range(local.dim()), key=local.stride, reverse=True)
    stride = [0] * local.dim()
    step = 1
    for d in reversed(order):
        stride[d] = step
        step *= max(shape[d], 1)
    return tuple(stride)


def local_tensor(tensor: Tensor | None) -> Tensor | None:
    """This rank's part of ``tensor`` (a ``DTensor``'s local tensor; a plain tensor itself).

    Under ``torch.no_grad`` the result shares the ``DTensor``'s storage: writing into it
    writes the ``DTensor``."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def distribute_state(
    module: nn.Module,
    mesh: DeviceMesh,
    placements: Mapping[str, tuple[Placement, tuple[int, ...]]],
    made: dict[int, Tensor] | None = None,
) -> None:
    """Hold ``module``'s own parameters and buffers named in ``placements`` as ``DTensor`` s
    on ``mesh`` (1-D), in place; ``forward`` keeps computing on the local tensors.

    Args:
        placements: ``{name: (placement, global shape)}``; the current local tensor of
            ``name`` is this rank's part of a tensor of that global shape. A ``Shard(d)``
            part must be the rows ``torch.chunk`` gives this rank along ``d``.

    Parameters stay ``nn.Parameter`` s with their ``requires_grad``; a tensor that already is
    a ``DTensor`` is left alone. Build optimizers afterwards (the parameters are new objects).
    ``made`` (``{id(local tensor): its DTensor}``, filled in here) keeps a tensor that several
    modules share one object.

    Raises:
        ValueError: a ``Shard(d)`` part whose size along ``d`` is not ``torch.chunk``'s.
    """
    rank, world_size = mesh.get_local_rank(), mesh.size()
    for name, (placement, shape) in placements.items():
        current = getattr(module, name)
        if current is None or isinstance(current, DTensor):
            continue
        if made is not None and id(current) in made:
            entries = module._parameters if name in module._parameters else module._buffers
            entries[name] = made[id(current)]
            continue
        if isinstance(placement, Shard):
            dim = placement.dim % len(shape)
            chunks = chunk_slices(shape[dim], world_size)
            start, stop = chunks[rank]
            if current.shape[dim] != stop - start:
                raise ValueError(
                    f"{type(module).__name__}.{name}: rank {rank} holds {current.shape[dim]} "
                    f"of the {shape[dim]} rows along dim {dim}, a DTensor Shard({dim}) over "
                    f"{world_size} ranks holds {stop - start} ({list(chunks)})"
                )
        value = DTensor.from_local(
            current.detach(),
            mesh,
            (placement,),
            run_check=False,
            shape=torch.Size(shape),
            stride=dtensor_stride(current, tuple(shape)),
        )
        if name in module._parameters:
            value = nn.Parameter(value, requires_grad=current.requires_grad)
            module._parameters[name] = value
        else:
            module._buffers[name] = value
        if made is not None:
            made[id(current)] = value
    if not getattr(module, "_mpgroups_local_forward", False):
        module.register_forward_pre_hook(_shadow_with_locals)
        module.register_forward_hook(_drop_shadows, always_call=True)
        module._mpgroups_local_forward = True


def _dtensor_entries(module: nn.Module):
    for entries in (module._parameters, module._buffers):
        for name, value in entries.items():
            if isinstance(value, DTensor):
                yield name, value


def _shadow_with_locals(module: nn.Module, args) -> None:
    # An instance attribute is found before nn.Module.__getattr__ looks into _parameters.
    for name, value in list(_dtensor_entries(module)):
        module.__dict__[name] = value.to_local()


def _drop_shadows(module: nn.Module, args, output) -> None:
    for name, _ in list(_dtensor_entries(module)):
        module.__dict__.pop(name, None)
