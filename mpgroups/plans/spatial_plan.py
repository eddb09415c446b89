"""``parallelize(model, group, plan="spatial")``: every layer of a convnet works on this
rank's block of rows along dim 2 (docs/design.md §8b).

The model takes this rank's rows of the input (``spatial_shard``/``scatter_spatial``) and
gives its rows of the output, or the whole where the split rows end: every module that
needs the whole image (a global pooling, ``nn.Flatten``, ``nn.Linear``) and is fed split
rows gets its input gathered from every rank (``gather_spatial``); what follows from its
output alone runs on the whole, replicated. What is split follows the forward traced with
``torch.fx`` (a forward that does not trace is refused). Parameters stay whole on every
rank; converted layers sum their grads over the group, so every rank's optimizer step is
one device's.

Converted: convs and transposed convs (1-D to 3-D), max and average pooling, adaptive
pooling to at least one row per rank along dim 2, BatchNorm (the whole image's statistics),
GroupNorm, InstanceNorm, ``nn.Upsample``, ``nn.Dropout``. Kept as they are: elementwise
activations, the channel dropouts, ``nn.Identity``, and containers (their own code, a skip
connection's ``torch.cat`` on channels or an addition, runs on the block as it would on the
whole). Any other module fed split rows is refused by name, since nothing says it may see a
block instead of the whole. A whole value brought back onto the rows (a squeeze-and-
excitation gate) has its gradient summed over the ranks where it meets them.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from mpgroups.comm.checks import check_same_call
from mpgroups.comm.collectives import broadcast_tensors_, copy_to_ranks
from mpgroups.comm.spatial_groups import SpatialSplit, resolve_spatial_split
from mpgroups.comm.spatial_transfer import gather_spatial
from mpgroups.layers import spatial_conv, spatial_norm, spatial_pool
from mpgroups.layers.channel_modules import ShardedDropout
from mpgroups.layers.conv import GroupParallelConv1d, GroupParallelConv2d, GroupParallelConv3d
from mpgroups.layers.spatial_base import SPATIAL_STATE, SpatialLayer
from mpgroups.layers.spatial_channel import SplitRowsConv, split_rows_of, whole_rows_of
from mpgroups.layers.spatial_dropout import SpatialDropout
from mpgroups.layers.spatial_upsample import SpatialUpsample
from mpgroups.plans.global_batch import _GlobalBatchNorm, sync_batch_norms
from mpgroups.plans.hooks import move_hooks
from mpgroups.plans.root_check import check_at_root
from mpgroups.plans.tree import PlanError, replace_module

__all__ = [
    "SPATIAL_TWINS",
    "convert_rows",
    "spatialize",
    "split_flow",
    "sync_state",
    "unspatialize",
]

_CONVS = {
    nn.Conv1d: spatial_conv.SpatialConv1d,
    nn.Conv2d: spatial_conv.SpatialConv2d,
    nn.Conv3d: spatial_conv.SpatialConv3d,
    nn.ConvTranspose1d: spatial_conv.SpatialConvTranspose1d,
    nn.ConvTranspose2d: spatial_conv.SpatialConvTranspose2d,
    nn.ConvTranspose3d: spatial_conv.SpatialConvTranspose3d,
}
_MODULES = {
    nn.MaxPool1d: spatial_pool.SpatialMaxPool1d,
    nn.MaxPool2d: spatial_pool.SpatialMaxPool2d,
    nn.MaxPool3d: spatial_pool.SpatialMaxPool3d,
    nn.AvgPool1d: spatial_pool.SpatialAvgPool1d,
    nn.AvgPool2d: spatial_pool.SpatialAvgPool2d,
    nn.AvgPool3d: spatial_pool.SpatialAvgPool3d,
    nn.Upsample: SpatialUpsample,
    nn.Dropout: SpatialDropout,
}
_ADAPTIVE = {
    nn.AdaptiveAvgPool1d: spatial_pool.SpatialAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: spatial_pool.SpatialAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: spatial_pool.SpatialAdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d: spatial_pool.SpatialAdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d: spatial_pool.SpatialAdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d: spatial_pool.SpatialAdaptiveMaxPool3d,
}
SPATIAL_TWINS = {**_CONVS, **_MODULES, **_ADAPTIVE}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CHANNEL_CONVS = (GroupParallelConv1d, GroupParallelConv2d, GroupParallelConv3d)
_AS_THEY_ARE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
_CHAIN_ENDS = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten, nn.Linear,
)  # fmt: skip


def _twin(module: nn.Module, process_group) -> nn.Module:
    twin_type = SPATIAL_TWINS[type(module)]
    if type(module) in _CONVS:
        twin = twin_type.from_conv(module, process_group)
    else:
        twin = twin_type.from_module(module, process_group)
    _carry_over(module, twin)
    return twin


def _carry_over(module: nn.Module, twin: nn.Module) -> None:
    """What ``twin`` keeps of the module it replaces: its mode, hooks, and the marks other
    plans left on it (a channel plan's shards of a norm, in a model split both ways)."""
    twin.train(module.training)
    move_hooks(module, twin)
    for key, value in module.__dict__.items():
        if key.startswith("_mpgroups_"):
            twin.__dict__[key] = value


def _norm_twin(module: nn.Module, process_group) -> nn.Module:
    if isinstance(module, nn.GroupNorm):
        twin = spatial_norm.SpatialGroupNorm(
            module.num_groups, module.num_channels, module.eps, module.affine,
            process_group=process_group, device="meta",
        )  # fmt: skip
    else:
        twin_type = getattr(spatial_norm, f"Spatial{type(module).__name__}")
        twin = twin_type(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, process_group=process_group, device="meta",
        )  # fmt: skip
    twin.load_state_dict(module.state_dict(), assign=True)
    _carry_over(module, twin)
    return twin


# Functions a traced forward may call on a block as on the whole: elementwise, or on channels.
_BLOCKWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.getitem,
    torch.add, torch.sub, torch.mul, torch.relu, torch.sigmoid, torch.tanh, F.relu, F.gelu,
    F.silu, F.leaky_relu, F.sigmoid, F.tanh, F.hardswish, F.elu, F.mish, getattr,
}  # fmt: skip
_BLOCKWISE_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "relu",
    "sigmoid",
    "tanh",
    "add_",
    "mul_",
    "relu_",
}


def _keeps_rows(index) -> bool:
    """Whether ``x[index]`` leaves dims 2 and up whole (indexing a tuple of outputs, or a
    slice of batch or channels); an ``Ellipsis`` may reach any dim."""
    if not isinstance(index, tuple):
        return not isinstance(index, (slice, type(Ellipsis))) or index == slice(None)
    whole = slice(None)
    if any(entry is Ellipsis for entry in index):
        return all(entry is Ellipsis or entry == whole for entry in index)
    return all(entry == whole for entry in index[2:])


def _split_flow(
    model: nn.Module, spatial: SpatialSplit | None
) -> tuple[set[int], set[int], set[int]]:
    """Which leaf modules the traced forward feeds the split rows (``ids``), which of them
    end the chain there (a global pooling, ``nn.Flatten``, ``nn.Linear``: their input is
    gathered, their output whole), which it never calls, and which make a gate's value
    (:func:`_gate_module`). The split follows every
    tensor computed from the model's inputs until a chain end: what is computed after one
    from its output alone is whole again and left as it is.

    Raises:
        PlanError: a forward ``torch.fx`` cannot trace (nothing it does could be checked); a
            function called on split rows that may not treat a block as the whole; a
            container's own parameter used on them (its gradient would be each rank's
            share); a module called both on split rows and on whole tensors; a whole value
            brought back onto the rows otherwise than a gate (:func:`_gate_module`).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # data-dependent control flow, …: nothing could be checked
        raise PlanError(
            f"plan='spatial' checks what {type(model).__name__}'s forward does to the split rows "
            f"by tracing it with torch.fx, which failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}); make the forward traceable, or split its "
            f"traceable part"
        ) from error
    split, fed, ends, whole_fed, doubtful, gates = set(), set(), set(), set(), [], set()
    gathered: dict = {}  # node: the chain end its whole value comes from
    for node in graph.nodes:
        if node.op == "placeholder":
            split.add(node)
            continue
        if not any(n in split for n in node.all_input_nodes):
            if node.op == "call_module":
                whole_fed.add(id(model.get_submodule(node.target)))
            sources = [gathered[n] for n in node.all_input_nodes if n in gathered]
            if sources:
                gathered[node] = sources[0]
            continue
        if node.op != "output":  # (returning both side by side is no merge)
            for whole in (n for n in node.all_input_nodes if n in gathered):
                gates.add(id(_gate_module(model, whole, node, gathered)))
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, _CHAIN_ENDS) and not (
                type(module) in _ADAPTIVE and _keeps_rows_split(module, spatial)
            ):
                ends.add(id(module))
                gathered[node] = node.target
                continue
            fed.add(id(module))
        elif node.op in ("call_function", "call_method"):
            for used in node.all_input_nodes:
                if used.op == "get_attr":
                    owner, _, held = used.target.rpartition(".")
                    raise PlanError(
                        f"plan='spatial' cannot sum the gradients of "
                        f"'{owner or type(model).__name__}''s own parameters ({held}): its "
                        f"forward uses them on the split rows, so each rank's gradient would be "
                        f"its rows' share. Hold them in a module of their own (e.g. a 1x1 conv) "
                        f"or gather first"
                    )
            if node.target is operator.getitem and not _keeps_rows(node.args[1]):
                doubtful.append(f"indexing {node.args[1]!r}")
            elif node.target is torch.cat:
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                if dim != 1:
                    doubtful.append(f"torch.cat(dim={dim})")
            elif node.target not in _BLOCKWISE_FUNCTIONS and node.target not in _BLOCKWISE_METHODS:
                doubtful.append(getattr(node.target, "__name__", str(node.target)))
        split.add(node)
    if doubtful:
        raise PlanError(
            f"plan='spatial': {type(model).__name__}'s forward calls {sorted(set(doubtful))} "
            f"on the split image before it is gathered; each rank would compute them on its "
            f"rows alone. Use modules (nn.Upsample, pooling) or gather first"
        )
    both = (fed | ends) & whole_fed
    ignored = {id(m) for m in model.modules()} - fed - ends - whole_fed
    if both:
        names = [n for n, m in model.named_modules() if id(m) in both]
        raise PlanError(
            f"plan='spatial': {names} are called both on split rows and on whole tensors; "
            f"a module holds one layout: use two modules"
        )
    return fed, ends, ignored, gates


def _gate_module(model: nn.Module, whole, merge, gathered: dict) -> nn.Module:
    """The module whose output sums its gradient over the ranks where ``whole`` (a value
    computed after a chain end, the same on every rank) meets the split rows at ``merge``
    (a squeeze-and-excitation gate): the last module before ``merge`` on ``whole``'s path.
    Each rank's gradient there is its rows' share; summed at that module's output, every
    module and gather before it sees the whole gradient, the same on every rank. The
    functions between it and ``merge`` compute the same values on every rank, so their
    backward is the same linear map on every rank and the sum may come before them.

    Raises:
        PlanError: a path this cannot make right (a value used elsewhere too, a module
            called more than once, a function of several whole values).
    """
    node, path = whole, []
    while node.op != "call_module":
        inputs = [n for n in node.all_input_nodes if n in gathered]
        if len(inputs) != 1:
            break
        path.append(node)
        node = inputs[0]
    refuse = node.op != "call_module"
    for step in [node, *path]:
        others = [user for user in step.users if user is not merge and user not in path]
        refuse = refuse or bool(others)
    if not refuse:
        module = model.get_submodule(node.target)
        calls = [n for n in node.graph.nodes if n.op == "call_module" and n.target == node.target]
        refuse = len(calls) > 1
    if refuse:
        raise PlanError(
            f"plan='spatial': {type(model).__name__}'s forward brings the whole value "
            f"computed after '{gathered[whole]}' (gathered from every rank's rows) back onto "
            f"the split rows at '{merge.name}'; its gradient must be summed over the ranks "
            f"where it meets them, which the plan can do only after a module that makes that "
            f"value alone, called once, through functions of it alone (a squeeze-and-"
            f"excitation gate); rewrite '{whole.name}' so, or gather the rows first"
        )
    return module


def _sum_gate_grads(module: nn.Module, args, output):
    """A gate's value, whose gradient is summed over the rows' group (see _gate_module)."""
    return copy_to_ranks(output, module._mpgroups_gate_group)


def _keeps_rows_split(pool: nn.Module, split: SpatialSplit | None) -> bool:
    """Whether an adaptive pooling gives every rank rows of its own: an output size along
    each split dim of at least the ranks along it, and no indices asked for. Otherwise (a
    global pooling, to one row) the chain ends there."""
    if split is None:
        return True
    size = pool.output_size
    sizes = size if isinstance(size, (tuple, list)) else (size,) * (len(split.dims))
    return not getattr(pool, "return_indices", False) and all(
        rows is not None and rows >= ranks
        for rows, ranks in zip(sizes, split.grid.shape, strict=False)
    )


def _gather_input(module: nn.Module, args):
    return (gather_spatial(args[0], process_group=module._mpgroups_spatial_end), *args[1:])


def spatialize(model: nn.Module, process_group, *, sync_module_states: bool = True) -> nn.Module:
    """What ``parallelize(model, process_group, plan="spatial")`` does (see the module
    docstring); returns the converted root. ``process_group``: a ``ProcessGroup`` or 1-D
    ``DeviceMesh`` (dim 2 split), or a 2-D ``DeviceMesh`` named ``("sp_h", "sp_w")`` (dims
    2 and 3 split).

    Raises:
        PlanError: a module the plan cannot let see a block of rows, before the chain ends.
    """
    group, split = resolve_spatial_split(process_group)
    if sync_module_states and split is not None:
        sync_state(model, group)
    flow = split_flow(model, split)
    return convert_rows(model, process_group, flow)


def sync_state(model: nn.Module, group) -> None:
    """Every rank's parameters and buffers from the group's rank 0 (a collective)."""
    state = [*model.parameters(), *model.buffers()]
    layout = tuple((str(t.dtype), tuple(t.shape)) for t in state)
    check_same_call(f"parallelize({type(model).__name__}, plan='spatial')", layout, group)
    broadcast_tensors_(state, group)


def split_flow(model: nn.Module, split: SpatialSplit | None) -> tuple[set[str], ...]:
    """:func:`_split_flow`'s modules by name (every name of each): ``(fed, ends, never
    called, gates)``, names that stay valid while modules are replaced in place."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return tuple(
        {name for i in ids for name in names.get(i, ())} for ids in _split_flow(model, split)
    )


def convert_rows(
    model: nn.Module, process_group, flow: tuple[set[str], ...], *, root_check: bool = True
) -> nn.Module:
    """Give every module ``flow`` names (:func:`split_flow`) a block of rows of
    ``process_group``, gather at its chain ends, and (``root_check``) check at the root once
    per forward; returns the root. Group-parallel convs (a model split both ways) get their
    rows split in place (:func:`~mpgroups.layers.spatial_channel.split_rows_of`)."""
    group, split = resolve_spatial_split(process_group)
    fed, ends, untraced, gates = flow
    convertible = (*SPATIAL_TWINS, *_BATCH_NORMS, nn.GroupNorm, nn.InstanceNorm1d,
                   nn.InstanceNorm2d, nn.InstanceNorm3d)  # fmt: skip
    made: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in made:
            model = replace_module(model, name, made[id(module)])
            continue
        if name in ends and not hasattr(module, "_mpgroups_spatial_hook"):
            module._mpgroups_spatial_end = process_group
            module._mpgroups_spatial_hook = module.register_forward_pre_hook(
                _gather_input, prepend=True
            )
        if name in gates and split is not None and not hasattr(module, "_mpgroups_gate_hook"):
            module._mpgroups_gate_group = split.group
            module._mpgroups_gate_hook = module.register_forward_hook(_sum_gate_grads)
        # A layer the traced forward never called (another path, picked at run time) is
        # converted as if it were fed the rows: fed whole tensors, its check would raise.
        untraced_layer = name in untraced and isinstance(module, convertible)
        if name not in fed and not untraced_layer:
            continue  # whole tensors only (after a chain end), or not a layer
        kind = type(module)
        made[id(module)] = module
        if kind in SPATIAL_TWINS:
            made[id(module)] = twin = _twin(module, process_group)
            model = replace_module(model, name, twin)
        elif kind in (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
            made[id(module)] = twin = _norm_twin(module, process_group)
            model = replace_module(model, name, twin)
        elif kind in _BATCH_NORMS:
            sync_batch_norms(module, group)
        elif isinstance(module, ShardedDropout):
            # A channel dropout's mask is per sample and channel: the same for any rows. An
            # elementwise one's would be drawn for this rank's rows as if they were the whole.
            if module.kind is nn.Dropout:
                raise PlanError(
                    f"plan='spatial' over ('sp', 'gp'): '{name}' (an nn.Dropout between layers "
                    f"whose channels the channel plan splits) cannot take a block of rows yet "
                    f"(its mask would be drawn for this rank's rows as if they were the whole "
                    f"image); place it where the channels are whole (after the block), or use "
                    f"nn.Dropout2d"
                )
        elif isinstance(module, _CHANNEL_CONVS):
            if split is not None and len(split.dims) > 1:
                raise PlanError("group-parallel convs take split rows, not a 2-D grid")
            split_rows_of(module, process_group)
        elif not isinstance(module, _AS_THEY_ARE):
            raise PlanError(
                f"plan='spatial' cannot give '{name}' ({kind.__name__}) a block of rows: it "
                f"converts convs, transposed convs, pooling, norms, nn.Upsample and "
                f"nn.Dropout, keeps elementwise activations, and gathers the whole image at "
                f"every global pooling, nn.Flatten or nn.Linear the split rows reach"
            )
    handles = []
    if split is not None and root_check:
        handles = check_at_root(model, group, ("rows_guard",), split.grid)
    model._mpgroups_spatial = handles
    return model


def unspatialize(model: nn.Module) -> nn.Module:
    """The inverse of :func:`spatialize`: plain ``torch.nn`` modules again, in place (no
    communication: parameters are whole on every rank); returns the root."""
    plain_types = {twin: plain for plain, twin in SPATIAL_TWINS.items()}
    restored: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in restored:
            model = replace_module(model, name, restored[id(module)])
            continue
        handle = module.__dict__.pop("_mpgroups_spatial_hook", None)
        if handle is not None:
            handle.remove()
            del module._mpgroups_spatial_end
        handle = module.__dict__.pop("_mpgroups_gate_hook", None)
        if handle is not None:
            handle.remove()
            del module._mpgroups_gate_group
        if isinstance(module, _GlobalBatchNorm):
            module.__class__ = next(c for c in _BATCH_NORMS if isinstance(module, c))
            del module._replicas
        if isinstance(module, SplitRowsConv):
            whole_rows_of(module)
            restored[id(module)] = module
        elif isinstance(module, SpatialLayer):
            plain_type = plain_types.get(type(module)) or next(
                c for c in type(module).__mro__ if c.__module__.startswith("torch.nn")
            )
            plain = plain_type.__new__(plain_type)
            plain.__dict__.update(module.__dict__)
            for attr in ("process_group", *SPATIAL_STATE):
                plain.__dict__.pop(attr, None)
            restored[id(module)] = plain
            model = replace_module(model, name, plain)
    for handle in model.__dict__.pop("_mpgroups_spatial", ()):
        handle.remove()
    return model
