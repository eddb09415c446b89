"""What a group-parallel layer or model communicates, from the placement rule alone, and what
it costs.

:func:`shard_collectives` lists the data collectives of one forward + backward of a layer from
its :class:`~mpgroups.sharding.layout.LayerShards` (docs/design.md §3, §3b; the table in
``mpgroups/layers/layer_comm.py``), with the byte counts
:class:`~mpgroups.comm.counter.CommCounter` records (padding of uneven shards included).
:func:`layer_collectives` does it for a conv or a Linear given
by its sizes, through :func:`mpgroups.sharding.layout.layer_shards`, the one
function that places every layer; :func:`model_collectives` for a whole model and a plan, as
:func:`mpgroups.parallelize` applies it. :func:`collective_seconds` prices one collective with
an α–β model in the bus-bandwidth convention of nccl-tests. ``cases.py`` lists a benchmark
case's collectives with these; ``projection.py`` prices them.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import nn

from mpgroups.layers.dtensor_state import chunk_slices
from mpgroups.plans.styles import ChannelLocal, ParallelLayer
from mpgroups.sharding.layout import LayerShards, layer_shards, layout_shards

__all__ = [
    "INTER_NODE_400G",
    "LINKS",
    "Collective",
    "Link",
    "collective_seconds",
    "layer_collectives",
    "model_collectives",
    "ring_bytes_factor",
    "ring_steps",
    "shard_collectives",
    "spatial_out",
]


@dataclass(frozen=True)
class Collective:
    """One collective: ``op``, the ranks taking part, bytes (CommCounter's convention),
    whether it runs in the forward or the backward pass, and the layer that issues it."""

    op: str
    group_size: int
    nbytes: int
    phase: str
    layer: str = ""


@dataclass(frozen=True)
class Link:
    """α–β parameters of an interconnect: latency per step (s), bus bandwidth (bytes/s)."""

    name: str
    latency_s: float
    busbw_bytes_per_s: float


# Typical nccl-tests bus bandwidths for all-gather at large sizes, and per-step latencies.
LINKS = {
    "nvlink4": Link("NVLink 4 (H100 SXM)", 5e-6, 360e9),
    "pcie5": Link("PCIe 5.0 x16", 10e-6, 40e9),
}

# Between nodes: one 400 Gb/s NIC (InfiniBand NDR / RoCE), 50 GB/s of bus bandwidth at most,
# ~10 µs per step (a network hop and the NIC's own latency, against NVLink's ~5). Not in
# LINKS: ``projection.py --link`` prices every collective on one link, and no group of a
# one-node projection crosses this one (``mesh.py`` uses it for the groups that span nodes).
INTER_NODE_400G = Link("400 Gb/s between nodes (one NDR NIC)", 10e-6, 50e9)


def shard_collectives(
    shards: LayerShards,
    input_layout: str,
    output_layout: str,
    in_rows: int,
    out_rows: int,
    element_size: int,
    input_requires_grad: bool = True,
    layer: str = "",
) -> list[Collective]:
    """The data collectives of one forward + backward of a layer on ``shards.placement.rank``.

    ``in_rows``/``out_rows``: elements per channel (feature) of the input and the output
    (``N·H·W`` for a conv, the leading dims for a Linear). Backward collectives of the input
    side run only when the input requires grad; for a forward alone (inference) keep the
    ``"forward"`` ones. As ``mpgroups/layers/layer_comm.py``:

    ========  ==========  =========================================  ============================
    split     input       before the local op                        output layout
    ========  ==========  =========================================  ============================
    "out"     replicated  G >= P: own slice, bwd all-gather          replicated: fwd all-gather
                          one team (G=1): bwd all-reduce             sharded: none
                          teams: bwd reduce-scatter + all-gather
              sharded     G >= P: none; teams: fwd all-gather,
                          bwd reduce-scatter (team)
    "in"      sharded     none                                       replicated: fwd all-reduce
                                                                     sharded: fwd reduce-scatter,
                                                                     bwd all-gather
    ========  ==========  =========================================  ============================
    """
    pl = shards.placement
    world = pl.world_size
    if world == 1:
        return []
    out: list[Collective] = []

    def add(op: str, group_size: int, nbytes: int, phase: str) -> None:
        out.append(Collective(op, group_size, nbytes, phase, layer))

    inputs, outputs = shards.inputs, shards.outputs
    gathered_in = world * max(inputs.widths) * in_rows * element_size
    if input_layout == "replicated":
        if not pl.filter_split:
            if input_requires_grad:
                add("all_gather", world, gathered_in, "backward")
        elif pl.team_size == world:
            # One team reads every channel: the ranks' partial input grads are summed.
            if input_requires_grad:
                add("all_reduce", world, inputs.total * in_rows * element_size, "backward")
        elif input_requires_grad:
            team = pl.team_size * max(b - a for a, b in shards.team_slices)
            add("reduce_scatter", pl.team_size, team * in_rows * element_size, "backward")
            add("all_gather", world, gathered_in, "backward")
    elif pl.filter_split and shards.split == "colwise":
        team = pl.team_size * max(b - a for a, b in shards.team_slices)
        add("all_gather", pl.team_size, team * in_rows * element_size, "forward")
        if input_requires_grad:
            add("reduce_scatter", pl.team_size, team * in_rows * element_size, "backward")
    gathered_out = world * max(outputs.widths) * out_rows * element_size
    if shards.split == "rowwise":
        if output_layout == "replicated":
            add("all_reduce", world, outputs.total * out_rows * element_size, "forward")
        else:
            add("reduce_scatter", world, gathered_out, "forward")
            add("all_gather", world, gathered_out, "backward")
    elif output_layout == "replicated":
        add("all_gather", world, gathered_out, "forward")
    return out


def layer_collectives(
    in_channels: int,
    out_channels: int,
    groups: int,
    world_size: int,
    rank: int,
    layouts: tuple[str, str],
    batch: int,
    in_spatial: int,
    out_spatial: int,
    element_size: int,
    input_requires_grad: bool = True,
    *,
    split: str = "colwise",
    shard_groups: int | None = None,
    layer: str = "",
) -> list[Collective]:
    """The data collectives of one forward + backward of a group-parallel conv on ``rank``.

    ``in_spatial``/``out_spatial`` are the numbers of spatial positions (H·W); for a
    ``ParallelLinear`` (``groups=1``) pass ``batch`` = the leading dims' elements and 1.
    ``split``/``shard_groups`` as on the layer.
    """
    shards = layer_shards(
        in_channels, out_channels, groups, world_size, rank,
        split=split, shard_groups=shard_groups,
        input_layout=layouts[0], output_layout=layouts[1],
    )  # fmt: skip
    return shard_collectives(
        shards, *layouts, batch * in_spatial, batch * out_spatial, element_size,
        input_requires_grad, layer,
    )  # fmt: skip


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _style(name: str, module: nn.Module, plan: dict):
    """The plan's style for ``name`` as :func:`mpgroups.parallelize` reads it: the entry of
    that name, else the first matching ``fnmatch`` pattern, else the drop-in for a grouped
    conv (``ParallelLayer()``)."""
    if name in plan:
        return plan[name]
    for pattern, style in plan.items():
        if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return style
    if type(module) in _CONVS and module.groups > 1:
        return ParallelLayer()
    return None


def trace_shapes(
    model: nn.Module, input_shape: tuple[int, ...], *, training: bool, input_requires_grad: bool
) -> dict[str, tuple]:
    """``{module name: (input shape, output shape, input requires grad, dtype)}`` of each
    module's first call, from a forward of a copy of ``model`` on the meta device (no
    memory, no arithmetic)."""
    traced = copy.deepcopy(model).to("meta").train(training)
    seen: dict[str, tuple] = {}
    handles = []
    for name, module in traced.named_modules():

        def hook(module, args, output, name=name):
            if name not in seen and args and torch.is_tensor(args[0]):
                x = args[0]
                seen[name] = (tuple(x.shape), tuple(output.shape), x.requires_grad, x.dtype)

        handles.append(module.register_forward_hook(hook))
    with torch.set_grad_enabled(training):
        x = torch.empty(input_shape, device="meta", requires_grad=training and input_requires_grad)
        traced(x)
    for handle in handles:
        handle.remove()
    return seen


def _rows(shape: tuple[int, ...], channel_dim: int) -> int:
    return math.prod(shape) // shape[channel_dim]


def model_collectives(
    model: nn.Module,
    plan: dict,
    input_shape: tuple[int, ...],
    world_size: int,
    rank: int,
    *,
    training: bool = True,
    input_requires_grad: bool = False,
) -> list[Collective]:
    """The data collectives of one forward (+ backward when ``training``) of ``model``
    (plain ``torch.nn``) after ``parallelize(model, plan=plan)`` on ``world_size`` ranks.

    Walks the modules in ``named_modules()`` order as :func:`mpgroups.parallelize` does: each
    ``ParallelLayer`` layer (a planned conv or Linear, or a grouped conv outside the plan)
    is placed by :func:`~mpgroups.sharding.layout.layer_shards` with its style; a
    ``ChannelLocal(output_layout="replicated")`` gathers its output in the layout of the
    nearest sharded-output layer before it (or its own ``channels``/``groups``). Activation
    shapes, and whether a layer's input requires grad, come from a forward on the meta
    device (:func:`trace_shapes`). Without ``training`` (a forward under ``torch.no_grad``)
    only forward collectives remain.
    """
    if world_size == 1:
        return []
    shapes = trace_shapes(
        model, input_shape, training=training, input_requires_grad=input_requires_grad
    )
    out: list[Collective] = []
    producer = None  # the ChannelShards of the last sharded output, in module order
    for name, module in model.named_modules():
        style = _style(name, module, plan)
        if name not in shapes or not isinstance(style, ParallelLayer | ChannelLocal):
            continue
        in_shape, out_shape, requires_grad, dtype = shapes[name]
        element_size = torch.empty(0, dtype=dtype).element_size()
        if isinstance(style, ParallelLayer):
            linear = isinstance(module, nn.Linear)
            if linear:
                cin, cout, groups, dim = module.in_features, module.out_features, 1, -1
            else:
                cin, cout, groups, dim = module.in_channels, module.out_channels, module.groups, 1
            shards = layer_shards(
                cin, cout, groups, world_size, rank, split=style.split,
                shard_groups=style.shard_groups, input_layout=style.input_layout,
                output_layout=style.output_layout,
            )  # fmt: skip
            # The traced shapes are the plain model's: whole tensors, whatever the layout.
            out += shard_collectives(
                shards, style.input_layout, style.output_layout, _rows(in_shape, dim),
                _rows(out_shape, dim), element_size, requires_grad and training, name,
            )  # fmt: skip
            split = {"weight": shards.weight}
            if getattr(module, "bias", None) is not None:
                split["bias"] = (shards.outputs, 0)
            out += held_whole_collectives(module, split, training, name)
            if style.output_layout == "sharded":
                producer = shards.outputs
            continue
        if style.groups is not None:
            channels = style.channels or getattr(module, "num_features", None)
            channels = channels or module.num_channels
            shards = layout_shards(channels, style.groups, world_size, rank)
        else:
            shards = producer
        state = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        split = {n: (shards, 0) for n, t in state if t is not None and t.dim() >= 1}
        out += held_whole_collectives(module, split, training, name)
        if style.output_layout == "replicated":
            rows = math.prod(out_shape) // shards.total
            nbytes = world_size * max(shards.widths) * rows * element_size
            out.append(Collective("all_gather", world_size, nbytes, "forward", name))
    if not training:
        out = [c for c in out if c.phase == "forward"]
    return out


def held_whole_collectives(
    module: nn.Module, split: dict, training: bool, name: str = ""
) -> list[Collective]:
    """What keeps the entries of ``module`` (plain ``torch.nn``) that the ranks split unlike
    ``torch.chunk`` (``split``: ``{name: (shards, dim)}``) one tensor on every rank
    (``mpgroups.layers.dtensor_state``): a parameter gathers its rows' grads in backward, a
    buffer (running statistics) its rows after a training forward."""
    out = []
    for entry, (shards, _) in split.items():
        tensor = getattr(module, entry)
        p = shards.world_size
        if p == 1 or tuple(shards.slices) == chunk_slices(shards.total, p):
            continue
        nbytes = p * max(shards.widths) * (tensor.numel() // shards.total) * tensor.element_size()
        if isinstance(tensor, nn.Parameter):
            if training and tensor.requires_grad:
                out.append(Collective("all_gather", p, nbytes, "backward", name))
        elif training and module.training:
            out.append(Collective("all_gather", p, nbytes, "forward", name))
    return out


def collective_seconds(op: str, group_size: int, nbytes: int, link: Link) -> float:
    """α–β time of one ring collective: its latency steps plus the bus traffic.

    nccl-tests: bus bandwidth = algorithm bandwidth × (P-1)/P for all-gather, reduce-scatter,
    gather and scatter, × 2(P-1)/P for all-reduce; ``nbytes`` is their "size".
    """
    if group_size <= 1:
        return 0.0
    steps = ring_steps(op, group_size)
    return (
        steps * link.latency_s + nbytes * ring_bytes_factor(op, group_size) / link.busbw_bytes_per_s
    )


def ring_steps(op: str, group_size: int) -> int:
    """Latency steps of a ring collective: ``P-1``, or ``2(P-1)`` for all-reduce."""
    p = group_size
    return 2 * (p - 1) if op == "all_reduce" else p - 1


def ring_bytes_factor(op: str, group_size: int) -> float:
    """Bus bytes per byte of ``nbytes`` (nccl-tests' correction factor)."""
    p = group_size
    return 2 * (p - 1) / p if op == "all_reduce" else (p - 1) / p


def spatial_out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a convolution along one dimension, as ``nn.Conv2d`` computes it."""
    return math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1)
