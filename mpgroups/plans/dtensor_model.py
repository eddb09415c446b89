"""Every parameter of a parallelized model as a ``DTensor`` on its process group's mesh.

``parallelize`` (and so the 2012 AlexNet) ends with :func:`distribute_model_state`: the
parameters torch's tools reduce over (``clip_grad_norm_``, ``GradScaler``, DCP, FSDP2) then
say what they are, a split ``Shard(dim)`` or a copy ``Replicate()``, while every module keeps
computing on local tensors (:mod:`mpgroups.layers.dtensor_state`). ``unparallelize`` ends
with :func:`undistribute_model_state`.
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from mpgroups.comm.collectives import gather_rows
from mpgroups.comm.process_groups import group_mesh, resolve_process_group
from mpgroups.layers.channel_modules import tensor_shards
from mpgroups.layers.dtensor_state import LOCAL_FORWARD_HOOKS, chunk_slices, distribute_state

__all__ = [
    "DDP_REFUSED",
    "distribute_model_state",
    "distribute_parameters",
    "undistribute_model_state",
]

DDP_REFUSED = (
    "DistributedDataParallel cannot hold this model: mpgroups holds a parallelized model's "
    "parameters as DTensors (so clip_grad_norm_, GradScaler, DCP and optimizers see the "
    "single-device model), and DDP takes plain tensors only (torch's own tensor-parallel "
    "styles neither compose with it). Replicate it over the data-parallel ranks with FSDP2: "
    "torch.distributed.fsdp.fully_shard(model, mesh=mesh['dp']) (reshard_after_forward=False "
    "keeps whole parameters between forward and backward, as DDP does)"
)


class _RefuseDDP:
    """Stands, in every module of a parallelized model, where DDP looks for the names of
    parameters to ignore: the first thing its constructor reads from the module it wraps.
    Reading it raises :data:`DDP_REFUSED`, before DDP fails deeper down with torch's "mixed
    torch.Tensor and DTensor"."""

    def __iter__(self):
        raise TypeError(DDP_REFUSED)


def _refused_first(transform):
    """``transform`` (torch's DDP + tensor-parallel hook-up, which DDP given a sub-mesh runs
    before anything else) refusing a parallelized model first: run, it would have turned the
    model's DTensor parameters into plain ones, leaving a caught refusal a model whose
    ``clip_grad_norm_`` and checkpoints see each rank's shards only."""

    @functools.wraps(transform)
    def refused_first(module: nn.Module):
        if isinstance(module.__dict__.get("_ddp_params_and_buffers_to_ignore"), _RefuseDDP):
            raise TypeError(DDP_REFUSED)
        return transform(module)

    refused_first._mpgroups = True
    return refused_first


def _install_ddp_refusal() -> None:
    try:
        from torch.distributed.tensor.parallel import ddp as tensor_parallel_ddp
    except ImportError:  # no such hook-up in this torch: DDP reads the marker first
        return
    transform = getattr(tensor_parallel_ddp, "_pre_dp_module_transform", None)
    if transform is not None and not getattr(transform, "_mpgroups", False):
        tensor_parallel_ddp._pre_dp_module_transform = _refused_first(transform)


_install_ddp_refusal()


def distribute_model_state(model: nn.Module, process_group, given_mesh=None) -> None:
    """Hold every parameter of ``model`` as a ``DTensor`` on the 1-D mesh over
    ``process_group``, in place (a collective: every rank calls it alike).

    A tensor split over the ranks as ``torch.chunk`` splits it becomes ``Shard(dim)`` of its
    rows; a tensor split otherwise is gathered and held whole (``Replicate()``), its module
    computing on its rows (module docstring); every other parameter is ``Replicate()``.
    Split buffers (a sharded BatchNorm's running statistics) are held likewise; other buffers
    stay plain (the same on every rank). ``given_mesh``: the ``DeviceMesh`` the user gave for
    the group, if any (FSDP2 over another dim of that mesh then sees one root mesh).
    """
    tensors = [*model.parameters(), *model.buffers()]
    device_type = tensors[0].device.type if tensors else "cpu"
    mesh = group_mesh(process_group, device_type, given_mesh)
    made: dict[int, tuple[Tensor, Tensor]] = {}
    for module in model.modules():
        split = tensor_shards(module)
        placements, whole_rows = {}, {}
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is None or isinstance(tensor, DTensor) or id(tensor) in made:
                # (made holds every tensor it names: an id there is this tensor's)
                placements[name] = (Replicate(), ())  # left alone or tied: see distribute_state
                continue
            shards, dim = split.get(name, (None, 0))
            if shards is None or shards.world_size == 1:
                if name in module._parameters:
                    placements[name] = (Replicate(), tuple(tensor.shape))
                continue
            if tuple(shards.slices) == chunk_slices(shards.total, shards.world_size):
                shape = list(tensor.shape)
                shape[dim] = shards.total
                placements[name] = (Shard(dim), tuple(shape))
                continue
            whole = gather_rows(tensor, shards, dim=dim)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(whole, tensor.requires_grad)
            else:
                module._buffers[name] = whole
            placements[name] = (Replicate(), tuple(whole.shape))
            whole_rows[name] = (shards, dim)
        if placements:
            distribute_state(module, mesh, placements, made, whole_rows)
    for module in model.modules():  # DDP may be handed any of them
        module._ddp_params_and_buffers_to_ignore = _RefuseDDP()


def distribute_parameters(model: nn.Module, process_group=None) -> nn.Module:
    """Hold the parameters of a model whose parallel layers you placed yourself as DTensors,
    as ``parallelize`` does for the models it converts (a collective; returns ``model``).

    For a model that holds ``GroupParallelConv2d``/``ParallelLinear`` layers built or
    converted by hand (``from_conv``) over ``process_group``: afterwards
    ``clip_grad_norm_``, ``GradScaler`` and DCP see the single-device model, as for a
    parallelized one. Without it, a rank's shards look to them like whole tensors. Every rank
    of the group calls it on the same model; a no-op on one rank.

    Raises:
        ValueError: a layer split over another process group than ``process_group``.
    """
    pg = resolve_process_group(process_group)
    if pg is None or pg.size() == 1:
        return model
    ranks = dist.get_process_group_ranks(pg)
    for name, module in model.named_modules():
        for entry, (shards, _) in tensor_shards(module).items():
            group = shards.process_group
            if shards.world_size > 1 and dist.get_process_group_ranks(group) != ranks:
                raise ValueError(
                    f"'{name}.{entry}' is split over the ranks "
                    f"{dist.get_process_group_ranks(group)}, not over the group of ranks "
                    f"{ranks} it was given; give distribute_parameters that layer's group"
                )
    distribute_model_state(model, pg, process_group)
    return model


def undistribute_model_state(model: nn.Module) -> None:
    """The inverse for what :func:`distribute_model_state` held whole or replicated: every
    ``DTensor`` parameter or buffer left in ``model`` becomes its local tensor (the whole
    tensor for ``Replicate()``), in place; ``Shard`` entries must have been gathered first
    (``unparallelize`` does); the hooks go too."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [key for key, fn in hooks.items() if fn in LOCAL_FORWARD_HOOKS]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        module.__dict__.pop("_mpgroups_local_forward", None)
        for entries in (module._parameters, module._buffers):
            for name, value in list(entries.items()):
                if isinstance(value, DTensor):
                    if not all(isinstance(p, Replicate) for p in value.placements):
                        raise ValueError(
                            f"{type(module).__name__}.{name} is still split "
                            f"({value.placements}); gather it first"
                        )
                    local = value.to_local().detach()
                    if isinstance(value, nn.Parameter):
                        local = nn.Parameter(local, requires_grad=value.requires_grad)
                    entries[name] = local
        module.__dict__.pop("_mpgroups_whole_rows", None)
        if isinstance(module.__dict__.get("_ddp_params_and_buffers_to_ignore"), _RefuseDDP):
            del module._ddp_params_and_buffers_to_ignore
