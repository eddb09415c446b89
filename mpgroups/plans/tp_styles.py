"""Styles for torch's ``parallelize_module``: a grouped conv and a norm on channel shards.

The depthwise ``Conv1d`` and the ``GroupNorm`` of a Mamba, xLSTM or GatedDeltaNet block sit
between a ``ColwiseParallel`` and a ``RowwiseParallel`` linear, their channels sharded like
the DTensor ``Shard(1)`` around them. torch's own DTensor conv gives wrong numbers or raises
there (torch 2.13); these two styles run mpgroups' layers instead::

    from torch.distributed.tensor.parallel import (
        ColwiseParallel, RowwiseParallel, parallelize_module)
    from mpgroups.plans.tp_styles import ChannelwiseNorm, GroupwiseParallel

    parallelize_module(block, tp_mesh, {
        "in_proj": ColwiseParallel(),   # [B, L, d] -> local [B, L, 2e/P]
        "conv": GroupwiseParallel(),    # local [B, e/P, L] -> local [B, e/P, L'], no collective
        "norm": ChannelwiseNorm(),      # local [B, e/P, L] -> local [B, e/P, L], no collective
        "out_proj": RowwiseParallel(),  # [B, L, e/P] -> [B, L, d]: one all-reduce
    })

(A fused ``in_proj`` whose output the model splits into ``x`` and ``z`` needs its rows laid
out rank-major, ``[x_0; z_0; x_1; z_1; ...]``, as mamba_ssm's tensor-parallel code does, so
that each rank's contiguous chunk holds its own ``x`` and ``z``; or use two Linears. Both
are in ``tests/test_tp_styles.py``.)

Shapes on rank ``r`` of ``P`` (a 1-D ``DeviceMesh``; ``c_r`` the channels of rank ``r``)::

    layout      local tensor (use_local_output=True)   DTensor (global shape, placement)
    Shard(1)    x_shard [N, c_r, *spatial]              [N, C, *spatial], (Shard(1),)
    Replicate() x [N, C, *spatial]                      [N, C, *spatial], (Replicate(),)

Which channels a rank holds: the DTensor convention is ``torch.chunk``'s (rank ``r`` holds
channels ``r * ceil(C/P)`` onwards), mpgroups' is its placement rule
(:mod:`mpgroups.sharding.placement`: whole conv groups per rank when ``G >= P``, a share of one
group when ``G < P``). They agree whenever ``P`` divides the conv's channels and groups evenly
(``G >= P`` with ``P | G``, or ``G < P`` with ``P | C``): every usual TP size. Where
they differ (``Conv1d(6, 6, groups=6)`` on 4 ranks: torch 2, 2, 2, 0 channels, mpgroups 2, 2,
1, 1) the style raises ``ValueError`` when applied, naming both splits, instead of computing
on channels that are not the ones the neighbouring DTensors hold.

What the module becomes, and its parameters:

* ``GroupwiseParallel`` turns ``nn.Conv1d/2d/3d`` into :class:`mpgroups.GroupParallelConv1d`
  (``2d``, ``3d``) **in place**: ``parallelize_module`` ignores what a style returns for a
  submodule, so the object stays the one its parent holds and its class becomes the
  mpgroups layer (``block.conv`` prints as one; hooks registered on the conv are kept).
  Its layout is ``sharded -> sharded`` for the default ``Shard(1)`` in and out: with
  ``G >= P`` each rank convolves its own groups and nothing is communicated, forward or
  backward; with ``G < P`` the team of ranks sharing a group gathers that group's input
  channels (one all-gather in the team, counted by :class:`mpgroups.CommCounter`).
* ``ChannelwiseNorm`` keeps the ``nn.GroupNorm``/``BatchNorm``/``InstanceNorm`` module and
  keeps the rows of its parameters and buffers for the rank's channels
  (:func:`mpgroups.layers.channel_modules.shard_channel_module`); a GroupNorm must hold whole norm
  groups on every rank. BatchNorm statistics are per channel, so a shard computes exactly
  its channels' statistics; no collective.
* Parameters are ``DTensor`` s, as torch's own styles make theirs: the conv's ``weight`` and
  ``bias`` and the norm's ``weight`` and ``bias`` are ``Shard(0)`` on the mesh (global shapes
  those of the ``torch.nn`` module), and so are a BatchNorm's running statistics;
  ``num_batches_tracked`` stays a plain tensor, the same on every rank. The module's
  ``forward`` still computes on its local rows (:mod:`mpgroups.layers.dtensor_state`: no
  DTensor dispatch, which would route the conv through DTensor's conv rule, the path that is
  wrong here). So the loop a user writes for torch's styles works unchanged on the whole
  block: ``torch.nn.utils.clip_grad_norm_``/``get_total_norm`` return the single-device norm
  (a ``Replicate()`` DTensor) on every rank, ``torch.amp.GradScaler`` skips a step on every
  rank when any rank's rows overflow, optimizers (SGD, AdamW, foreach or not) step as on one
  device, and ``torch.distributed.checkpoint`` with ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` writes the single-device tensors, loadable at another mesh
  size or, through ``dcp_to_torch_save``, into the plain module. A weight whose rows the
  placement rule splits otherwise than ``torch.chunk`` (``Conv2d(12, 6, groups=3)`` on 2
  ranks: 4 + 2 rows against 3 + 3) is refused when the style is applied, naming both splits.
* ``state_dict()`` of the parallelized module: the keys of the ``torch.nn`` module
  (``weight``, ``bias``; ``running_mean``, ``running_var``, ``num_batches_tracked``),
  ``DTensor`` entries except the scalar. ``mpgroups.full_state_dict(model)`` makes them whole
  (collectives): the result is the single-device state dict, its entries that a rank holds
  whole being that rank's tensors themselves, as ``state_dict()``'s are. The way back,
  ``mpgroups.load_full_state_dict(model, state)``, distributes each whole entry as its
  ``DTensor`` says.

Inputs and outputs follow ``ColwiseParallel``: ``input_layouts`` annotates a local input
(``Shard(1)`` by default), a DTensor input must carry that placement on the module's mesh
(``Shard`` on the channel dim, after any transpose: ``ColwiseParallel``'s ``Shard(-1)``
output ``[B, L, D]`` becomes ``Shard(1)`` under ``.transpose(1, 2)``); the output is local
with ``use_local_output=True`` (the default), else a DTensor with ``output_layouts``.
Channels are dim 1 of a batched input, dim 0 of an unbatched conv input ``[C, *spatial]``.

PyTorch habits: ``torch.no_grad``/``inference_mode`` and non-contiguous inputs (the
transposed ``[B, e, L]`` view above) work as with ``torch.nn``; ``copy.deepcopy`` of the
parallelized model works and the copy shares the mesh and process groups; pickling raises
(a process group cannot travel), as for every mpgroups layer. Build the optimizer after
``parallelize_module``: the module's parameters are new tensors (as with torch's styles).
``torch.compile(block, fullgraph=True)`` of the Mamba-style block gives one graph whose
forward and gradients equal the single-device block's (``aot_eager``, in
``tests/test_tp_styles.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from mpgroups.comm.checks import check_same_call
from mpgroups.comm.collectives import broadcast_tensors_
from mpgroups.layers.channel_modules import NORMS, shard_channel_module, tensor_shards
from mpgroups.layers.dtensor_state import chunk_slices, distribute_state, dtensor_stride
from mpgroups.layers.kinds import PARALLEL_CONV_OF
from mpgroups.plans.hooks import HOOK_DICTS
from mpgroups.sharding.layout import ChannelShards
from mpgroups.sharding.placement import Slice

__all__ = ["ChannelwiseNorm", "GroupwiseParallel", "dtensor_channel_slices"]

# SyncBatchNorm averages over the batch of every rank of its own group: not per shard.
_NORMS = tuple(norm for norm in NORMS if norm is not nn.SyncBatchNorm)
_LAYOUT_OF_PLACEMENT = {Shard(1): "sharded", Replicate(): "replicated"}
_PLACEMENT_OF = {"sharded": Shard(1), "replicated": Replicate()}


def dtensor_channel_slices(channels: int, world_size: int) -> tuple[Slice, ...]:
    """``(start, stop)`` of the channels each rank holds in a DTensor ``Shard`` of
    ``channels`` over ``world_size`` ranks (``torch.chunk``'s split: ``ceil(C/P)`` per rank,
    the last ranks fewer or none), as torch itself computes it."""
    return chunk_slices(channels, world_size)


def _layout(style: str, which: str, placement: Placement | None, supported: tuple) -> str:
    """mpgroups' layout name for a style's ``input_layouts``/``output_layouts`` argument."""
    placement = Shard(1) if placement is None else placement
    layout = _LAYOUT_OF_PLACEMENT.get(placement) if isinstance(placement, Placement) else None
    if layout not in supported:
        names = " or ".join(_placement_name(layout) for layout in supported)
        raise ValueError(
            f"{style}: {which} must be {names}, got {placement!r}. Shard(1) is the channel dim "
            f"of [N, C, *spatial]; a sequence [B, L, D] from ColwiseParallel (Shard(-1)) "
            f"becomes Shard(1) after .transpose(1, 2)"
        )
    return layout


def _placement_name(layout: str) -> str:
    return "Shard(1)" if layout == "sharded" else "Replicate()"


def _mesh_group(style: str, device_mesh: DeviceMesh):
    if not isinstance(device_mesh, DeviceMesh):
        raise ValueError(f"{style} needs a DeviceMesh, got {type(device_mesh).__name__}")
    if device_mesh.ndim != 1:
        raise ValueError(
            f"{style} needs a 1-D DeviceMesh, got one with {device_mesh.ndim} dimensions "
            f"{tuple(device_mesh.shape)}; pass mesh[dim_name] for the tensor-parallel axis"
        )
    return device_mesh.get_group()


def _take_source_values(module: nn.Module, process_group, src: int | None, site: str) -> None:
    """Replace ``module``'s own parameters and buffers by group rank ``src``'s values, as
    torch's styles do with ``src_data_rank`` (one broadcast per dtype; ``None``: keep the
    local values). New tensors: tensors shared with other modules are left alone."""
    params = [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None]
    buffers = [(n, b) for n, b in module.named_buffers(recurse=False) if b is not None]
    for name, tensor in params + buffers:
        if isinstance(tensor, DTensor):
            raise ValueError(
                f"{site}: {name} is already a DTensor; apply the style to the plain module"
            )
    if src is None or process_group.size() == 1:
        return
    layout = tuple((n, str(t.dtype), tuple(t.shape)) for n, t in params + buffers)
    check_same_call(f"{site} taking rank {src}'s values", layout, process_group)
    copies = [t.detach().clone() for _, t in params + buffers]
    broadcast_tensors_(copies, process_group, src)
    for (name, param), copy in zip(params, copies, strict=False):
        setattr(module, name, nn.Parameter(copy, requires_grad=param.requires_grad))
    for (name, _), copy in zip(buffers, copies[len(params) :], strict=True):
        setattr(module, name, copy)


def _check_same_split(site: str, what: str, mpgroups_slices, channels: int, world_size: int):
    torch_slices = dtensor_channel_slices(channels, world_size)
    if tuple(mpgroups_slices) != torch_slices:
        raise ValueError(
            f"{site}: the {channels} {what} channels split as {list(mpgroups_slices)} under "
            f"mpgroups' placement but as {list(torch_slices)} in a DTensor Shard(1) over "
            f"{world_size} ranks (torch.chunk); the two agree when groups >= {world_size} "
            f"with {world_size} dividing groups, or groups < {world_size} with {world_size} "
            f"dividing the channels. Use such sizes, or Replicate() on this side"
        )


class _ChannelStyle(ParallelStyle):
    """What the two styles share: layout arguments, the mesh, DTensor in and out."""

    _supported_inputs: tuple[str, ...]
    _supported_outputs: tuple[str, ...]

    def __init__(
        self,
        *,
        input_layouts: Placement | None = None,
        output_layouts: Placement | None = None,
        use_local_output: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.input_layout = _layout(name, "input_layouts", input_layouts, self._supported_inputs)
        self.output_layout = _layout(
            name, "output_layouts", output_layouts, self._supported_outputs
        )
        self.input_layouts = (_PLACEMENT_OF[self.input_layout],)
        self.output_layouts = (_PLACEMENT_OF[self.output_layout],)
        self.use_local_output = use_local_output

    def _install_hooks(
        self, module: nn.Module, device_mesh: DeviceMesh, site: str, channel_dim, out_slices
    ) -> None:
        """DTensor in → local tensor before ``forward``; local → DTensor after, unless
        ``use_local_output``. ``channel_dim(ndim)`` is the channel dim of an ``ndim``-D input;
        ``out_slices`` the output channels of every rank (sharded output)."""
        expected = self.input_layouts[0]
        input_layout = self.input_layout
        output_placement = self.output_layouts[0]
        use_local_output = self.use_local_output

        def to_local(mod, args):
            if not args or not isinstance(args[0], DTensor):
                return None
            x = args[0]
            if x.device_mesh != device_mesh:
                raise ValueError(
                    f"{site}: the input DTensor lives on {x.device_mesh}, the module on "
                    f"{device_mesh}"
                )
            want = Shard(channel_dim(x.dim())) if input_layout == "sharded" else expected
            if tuple(x.placements) != (want,):
                raise ValueError(
                    f"{site} was given input_layouts={_placement_name(input_layout)}: it "
                    f"expects a DTensor with placements {(want,)!r} (this {x.dim()}-D input "
                    f"has its channels in dim {channel_dim(x.dim())}), got shape "
                    f"{tuple(x.shape)} with placements {tuple(x.placements)!r}; redistribute "
                    f"it first, or give the style the input_layouts of what arrives"
                )
            return (x.to_local(), *args[1:])

        def to_dtensor(mod, args, y):
            if use_local_output or not isinstance(y, Tensor) or isinstance(y, DTensor):
                return None
            if output_placement == Replicate():
                return DTensor.from_local(y, device_mesh, (Replicate(),), run_check=False)
            dim = channel_dim(y.dim())
            shape = list(y.shape)
            shape[dim] = out_slices[-1][1]
            return DTensor.from_local(
                y,
                device_mesh,
                (Shard(dim),),
                run_check=False,
                shape=torch.Size(shape),
                stride=dtensor_stride(y, tuple(shape)),
            )

        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(to_dtensor)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_layouts={self.input_layouts[0]!r}, "
            f"output_layouts={self.output_layouts[0]!r}, "
            f"use_local_output={self.use_local_output})"
        )


class GroupwiseParallel(_ChannelStyle):
    """Run an ``nn.Conv1d/2d/3d`` (any ``groups``) on the channel shards of its ranks.

    The module becomes, in place, the matching :class:`mpgroups.GroupParallelConv1d`
    (``2d``, ``3d``) over ``device_mesh.get_group()``, holding this rank's rows of the weight
    and bias (see the module docstring for what that means for parameters and state dicts).
    With the default ``Shard(1)`` in and out it computes alone when ``G >= P``.

    Keyword Args:
        input_layouts: ``Shard(1)`` (default: the input's channels are sharded, as
            ``ColwiseParallel`` leaves them) or ``Replicate()`` (every rank holds the whole
            input; each convolves its slice, the input grad is all-gathered backward).
        output_layouts: ``Shard(1)`` (default) or ``Replicate()`` (the output is all-gathered).
        use_local_output: return a local tensor (default) instead of a DTensor.
        checks: mpgroups' input checks for layers that communicate (see
            ``GroupParallelConv2d``); ``None``: ``MPGROUPS_CHECKS``.

    Raises:
        ValueError: an unsupported layout (here), a mesh that is not 1-D, groups the
            placement rule cannot put on the mesh (``PlacementError``) or a channel split that
            differs from DTensor's (when applied), a DTensor input with another placement or
            mesh (when called).
        TypeError: a module that is not an ``nn.Conv1d/2d/3d``.
    """

    _supported_inputs = ("sharded", "replicated")
    _supported_outputs = ("sharded", "replicated")

    def __init__(
        self,
        *,
        input_layouts: Placement | None = None,
        output_layouts: Placement | None = None,
        use_local_output: bool = True,
        checks: bool | None = None,
    ) -> None:
        super().__init__(
            input_layouts=input_layouts,
            output_layouts=output_layouts,
            use_local_output=use_local_output,
        )
        self.checks = checks

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        name = type(self).__name__
        parallel_type = PARALLEL_CONV_OF.get(type(module))
        if parallel_type is None:
            already = " (already parallelized?)" if hasattr(module, "shards") else ""
            raise TypeError(
                f"{name} applies to nn.Conv1d, nn.Conv2d and nn.Conv3d, got "
                f"{type(module).__name__}{already}; linears take ColwiseParallel/RowwiseParallel"
            )
        pg = _mesh_group(name, device_mesh)
        site = (
            f"{name} on {type(module).__name__}({module.in_channels}, {module.out_channels}, "
            f"groups={module.groups})"
        )
        _take_source_values(module, pg, self.src_data_rank, site)
        layer = parallel_type.from_conv(
            module,
            pg,
            input_layout=self.input_layout,
            output_layout=self.output_layout,
            checks=self.checks,
        )
        world_size = pg.size()
        if self.input_layout == "sharded":
            _check_same_split(
                site, "input", layer.shards.inputs.slices, module.in_channels, world_size
            )
        weight_shards, _ = layer.shards.weight
        _check_same_split(site, "output", weight_shards.slices, module.out_channels, world_size)
        _become(module, layer)
        _hold_as_dtensors(module, device_mesh)
        dims = len(module.kernel_size)
        self._install_hooks(
            module,
            device_mesh,
            f"{site} on rank {layer.rank}",
            lambda ndim: ndim - dims - 1,
            layer.shards.outputs.slices,
        )
        return module


class ChannelwiseNorm(_ChannelStyle):
    """Run an ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` or ``nn.InstanceNorm1d/2d/3d`` on the
    channel shards of its ranks, in place (no collective).

    Each rank keeps the rows of the module's parameters and buffers for its channels, split
    as a DTensor ``Shard(1)`` splits them (``torch.chunk``); a GroupNorm's norm groups must
    fall whole on every rank.

    Keyword Args:
        input_layouts, output_layouts: ``Shard(1)`` only (the default), accepted for the
            signature of ``ColwiseParallel``.
        use_local_output: return a local tensor (default) instead of a DTensor ``Shard(1)``.

    Raises:
        ValueError: another layout; a GroupNorm whose norm groups a rank's shard would cut; a
            rank left without channels (more ranks than channels on this split).
        TypeError: a module that is not one of the norms above (``SyncBatchNorm`` averages
            over the batch of every rank: not a per-shard module).
    """

    _supported_inputs = ("sharded",)
    _supported_outputs = ("sharded",)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        name = type(self).__name__
        if type(module) not in _NORMS:
            raise TypeError(
                f"{name} applies to {', '.join(t.__name__ for t in _NORMS)}, got "
                f"{type(module).__name__}"
            )
        pg = _mesh_group(name, device_mesh)
        channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
        site = f"{name} on {module!r}"
        world_size, rank = pg.size(), pg.rank()
        slices = dtensor_channel_slices(channels, world_size)
        empty = [r for r, (a, b) in enumerate(slices) if a == b]
        if empty:
            raise ValueError(
                f"{site}: a DTensor Shard(1) of {channels} channels over {world_size} ranks "
                f"({list(slices)}) leaves ranks {empty} without channels"
            )
        _take_source_values(module, pg, self.src_data_rank, site)
        shard_channel_module(module, ChannelShards(pg, slices, rank))
        _hold_as_dtensors(module, device_mesh)
        self._install_hooks(
            module, device_mesh, f"{site} on rank {rank}", _norm_channel_dim(module), slices
        )
        return module


def _hold_as_dtensors(module: nn.Module, device_mesh: DeviceMesh) -> None:
    """The module's split parameters and buffers become ``DTensor`` s ``Shard(dim)`` on the
    mesh, as torch's own styles make theirs (its ``forward`` still runs on the rows)."""
    placements = {}
    for name, (shards, dim) in tensor_shards(module).items():
        shape = list(getattr(module, name).shape)
        shape[dim] = shards.total
        placements[name] = (Shard(dim), tuple(shape))
    distribute_state(module, device_mesh, placements)


def _norm_channel_dim(module: nn.Module):
    """``ndim -> channel dim`` of a norm's input: dim 1, or dim 0 of an unbatched input to an
    InstanceNorm (``[C, *spatial]``, which the others do not accept)."""
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        batched = module._get_no_batch_dim() + 1
        return lambda ndim: 1 if ndim == batched else 0
    return lambda ndim: 1


def _become(module: nn.Module, layer: nn.Module) -> None:
    """Turn ``module`` (an ``nn.ConvNd``) into ``layer`` in place, keeping its hooks.

    ``parallelize_module`` keeps the object its parent holds (it ignores what a style returns
    for a submodule), so the object itself changes class, as FSDP2's ``fully_shard`` does.
    """
    kept = {attr: module.__dict__[attr] for attr in HOOK_DICTS if attr in module.__dict__}
    state = dict(layer.__dict__)
    state.update(kept)
    module.__class__ = type(layer)
    module.__dict__.clear()
    module.__dict__.update(state)
