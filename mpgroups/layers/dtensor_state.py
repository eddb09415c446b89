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

A ``Shard`` must follow ``torch.chunk``'s rule (``ceil(n / P)`` rows per rank, the last
fewer): :func:`chunk_slices` gives it, and :func:`distribute_state` refuses a tensor whose rows
on this rank differ, because DTensor's collectives (``full_tensor``, DCP's offsets) would then
compute on the wrong rows. mpgroups' placement rule splits whole conv groups, in
``torch.tensor_split``'s balance, which is often another split (``groups=3`` on 2 ranks: 8 + 4
rows of 12; 10 classes on 4 ranks: 3, 3, 2, 2 against 3, 3, 3, 1). Such a tensor is held
**whole** on every rank instead (``Replicate()``), and the module computes on its rows of it:
the rows' gradient is gathered from every rank in backward (one all-gather of the tensor's
gradient), so every rank holds the whole, identical gradient and the optimizer updates every
copy alike; a buffer updated during a training ``forward`` has its rows gathered after it.
Correct for every tool, at the cost of the whole tensor (and its optimizer state) on every
rank for those layers only (``mpgroups.plans.dtensor_model``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import Placement

from mpgroups.comm.collectives import gather_rows
from mpgroups.sharding.layout import ChannelShards
from mpgroups.sharding.placement import Slice

__all__ = [
    "LOCAL_FORWARD_HOOKS",
    "chunk_slices",
    "distribute_state",
    "dtensor_stride",
    "local_tensor",
    "own_rows",
]


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


def own_rows(tensor: Tensor | None, shards: ChannelShards, dim: int) -> Tensor | None:
    """This rank's rows ``shards.own`` along ``dim`` of a split entry, however it is held: a
    ``Shard`` DTensor's local tensor, the rows of a tensor held whole (``Replicate()``), or a
    plain tensor of the rows itself. Shares storage with the entry."""
    if not isinstance(tensor, DTensor):
        return tensor
    local = tensor.to_local()
    if isinstance(tensor.placements[0], Shard) or shards.world_size == 1:
        return local
    start, stop = shards.own
    return local.narrow(dim, start, stop - start)


def distribute_state(
    module: nn.Module,
    mesh: DeviceMesh,
    placements: Mapping[str, tuple[Placement, tuple[int, ...]]],
    made: dict[int, tuple[Tensor, Tensor]] | None = None,
    whole_rows: Mapping[str, tuple[ChannelShards, int]] | None = None,
) -> None:
    """Hold ``module``'s own parameters and buffers named in ``placements`` as ``DTensor`` s
    on ``mesh`` (1-D), in place; ``forward`` keeps computing on the local tensors.

    Args:
        placements: ``{name: (placement, global shape)}``; the current local tensor of
            ``name`` is this rank's part of a tensor of that global shape. A ``Shard(d)``
            part must be the rows ``torch.chunk`` gives this rank along ``d``.

    Parameters stay ``nn.Parameter`` s with their ``requires_grad``; a tensor that already is
    a ``DTensor`` is left alone. Build optimizers afterwards (the parameters are new objects).
    ``made`` (``{id(local tensor): (that tensor, its DTensor)}``, filled in here; holding the
    tensor keeps its id from being reused) keeps a tensor that several modules share one
    object. ``whole_rows`` names ``Replicate()`` entries of which
    ``forward`` computes on this rank's rows only (``{name: (shards, dim)}``, see the module
    docstring).

    Raises:
        ValueError: a ``Shard(d)`` part whose size along ``d`` is not ``torch.chunk``'s.
    """
    rank, world_size = mesh.get_local_rank(), mesh.size()
    for name, (placement, shape) in placements.items():
        current = getattr(module, name)
        if current is None or isinstance(current, DTensor):
            continue
        if made is not None and made.get(id(current), (None,))[0] is current:
            entries = module._parameters if name in module._parameters else module._buffers
            entries[name] = made[id(current)][1]
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
            made[id(current)] = (current, value)
    if whole_rows:
        module._mpgroups_whole_rows = {**getattr(module, "_mpgroups_whole_rows", {}), **whole_rows}
        if any(name in module._buffers for name in whole_rows):
            module.register_forward_hook(_share_updated_rows)
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
    whole_rows = getattr(module, "_mpgroups_whole_rows", {})
    # A gradient reaches the DTensor through _LocalView (torch.compile traces torch's own
    # to_local()); where none can flow, the local tensor itself is taken: an autograd
    # function there is pure cost (a few µs a tensor, a few % of a batch-1 forward).
    grad = torch.is_grad_enabled()
    compiling = torch.compiler.is_compiling()
    for name, value in list(_dtensor_entries(module)):
        if compiling:
            local = value.to_local()
        elif grad and value.requires_grad:
            local = _LocalView.apply(value)
        else:
            local = value._local_tensor
        if name in whole_rows:
            shards, dim = whole_rows[name]
            if name in module._parameters:
                local = _OwnRows.apply(local, shards, dim)
            else:
                local = own_rows(value, shards, dim)
        module.__dict__[name] = local


def _share_updated_rows(module: nn.Module, args, output) -> None:
    """After a training forward, every rank's updated rows of the whole buffers (running
    statistics) onto every rank: the copies stay one tensor."""
    if not module.training:
        return
    for name, (shards, dim) in module._mpgroups_whole_rows.items():
        value = module._buffers.get(name)
        if isinstance(value, DTensor):
            with torch.no_grad():
                rows = own_rows(value, shards, dim)
                # Through .data: BatchNorm's backward saved this rank's rows (which keep their
                # values) and checks their version; the other rows are not read by it.
                value.to_local().data.copy_(gather_rows(rows.contiguous(), shards, dim=dim))


class _LocalView(torch.autograd.Function):
    """``DTensor.to_local()`` with a cheaper backward: the gradient, laid out as the local
    tensor, gets the DTensor's own spec (torch recomputes the global layout and goes through
    ``DTensor.from_local``, about 90 µs a parameter on CPU, a few % of a training step)."""

    @staticmethod
    def forward(ctx, value: DTensor) -> Tensor:
        local = value._local_tensor
        ctx.spec, ctx.local = value._spec, local
        return local.view_as(local)

    @staticmethod
    def backward(ctx, grad: Tensor):
        spec, local = ctx.spec, ctx.local
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is differentiable
            return DTensor.from_local(
                grad, spec.mesh, spec.placements, run_check=False, shape=spec.shape,
                stride=spec.stride,
            )  # fmt: skip
        if grad.stride() != local.stride():
            # Laid out otherwise (an expanded grad of a sum, another memory format): copied
            # into the local tensor's layout, which the DTensor's spec describes.
            grad = torch.empty_like(local).copy_(grad)
        return DTensor(grad, copy.copy(spec), requires_grad=False)


class _OwnRows(torch.autograd.Function):
    """This rank's rows of a tensor every rank holds whole; backward gathers every rank's
    rows' gradient, so the whole tensor's gradient is the same on every rank."""

    @staticmethod
    def forward(ctx, whole: Tensor, shards: ChannelShards, dim: int) -> Tensor:
        ctx.shards, ctx.dim = shards, dim
        start, stop = shards.own
        return whole.narrow(dim, start, stop - start)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        return gather_rows(grad.contiguous(), ctx.shards, dim=ctx.dim), None, None


def _drop_shadows(module: nn.Module, args, output) -> None:
    for name, _ in list(_dtensor_entries(module)):
        module.__dict__.pop(name, None)


# The hooks distribute_state registers, for whoever removes them.
LOCAL_FORWARD_HOOKS = (_shadow_with_locals, _drop_shadows, _share_updated_rows)


def _sharded_grad_first(handler):
    """torch's handler of GradScaler's overflow check on DTensor gradients, given a split
    gradient first: torch (2.13) reads the placements of the first gradient alone to decide
    whether each rank's found-inf flag is reduced over the mesh, so with a replicated first
    parameter (a stem conv) an inf in one rank's shard skipped the step on that rank only.
    The op updates every gradient in place and does not care about their order."""

    def handle(op_call, args, kwargs):
        grads, *rest = args
        split = [g for g in grads if not all(p.is_replicate() for p in g.placements)]
        if split and split[0] is not grads[0]:
            grads = [split[0], *(g for g in grads if g is not split[0])]
        return handler(op_call, (grads, *rest), kwargs)

    handle._mpgroups = True
    return handle


def _install_found_inf_fix() -> None:
    handlers = getattr(DTensor._op_dispatcher, "_custom_op_handlers", None)
    op = torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default
    if handlers is not None and op in handlers and not getattr(handlers[op], "_mpgroups", False):
        handlers[op] = _sharded_grad_first(handlers[op])


_install_found_inf_fix()
