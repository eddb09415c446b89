"""Convert a model's grouped convolutions to group-parallel layers, and back.

``parallelize`` works like ``nn.SyncBatchNorm.convert_sync_batchnorm``: it walks the module
tree, replaces modules under the same names, and returns the (possibly new) root. Build the
optimizer after converting: the parallel layers hold new, smaller parameters.
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mpgroups.comm.checks import check_same_call
from mpgroups.comm.collectives import broadcast_tensors_
from mpgroups.comm.process_groups import resolve_process_group
from mpgroups.comm.spatial_groups import is_space_and_groups
from mpgroups.layers.channel_modules import (
    DROPOUTS,
    GatherChannels,
    ShardedDropout,
    channel_shards,
    is_channel_agnostic,
    row_shards,
    shard_channel_module,
    unshard_channel_module,
)
from mpgroups.layers.kinds import PARALLEL_LAYERS, PARALLEL_OF
from mpgroups.layers.linear import ParallelLinear
from mpgroups.plans.auto_plan import auto_plan
from mpgroups.plans.dtensor_model import distribute_model_state, undistribute_model_state
from mpgroups.plans.hooks import move_hooks
from mpgroups.plans.root_check import check_at_root
from mpgroups.plans.space_and_groups import parallelize_space_and_groups
from mpgroups.plans.spatial_plan import spatialize, unspatialize
from mpgroups.plans.styles import ChannelLocal, NoParallel, ParallelLayer
from mpgroups.plans.tree import PlanError, replace_module
from mpgroups.sharding.layout import NOT_PICKLABLE, ChannelShards
from mpgroups.sharding.placement import PlacementError

__all__ = ["PlanError", "parallelize", "unparallelize"]


@dataclass
class _Sharded:
    shards: ChannelShards
    producer: str


@dataclass
class _Tracker:
    """Which live tensors are channel shards, and who produced them (weakly held).

    A check of the plan in eager mode: under ``torch.compile`` it steps aside (tensors have
    no stable identity while traced), so the compiled graph holds only the model's own ops.
    """

    live: dict[int, tuple[weakref.ref, _Sharded]] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def mark(self, tensor, info: _Sharded) -> None:
        if isinstance(tensor, Tensor) and not torch.compiler.is_compiling():
            key = id(tensor)
            self.live[key] = (weakref.ref(tensor, lambda _, k=key: self.live.pop(k, None)), info)

    def forget(self, tensor) -> None:
        if not torch.compiler.is_compiling():
            self.live.pop(id(tensor), None)

    def lookup(self, tensor) -> _Sharded | None:
        if torch.compiler.is_compiling() or not isinstance(tensor, Tensor):
            return None
        entry = self.live.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def first_sharded(self, args) -> _Sharded | None:
        for a in args:
            info = self.lookup(a)
            if info is not None:
                return info
        return None


def _describe(info: _Sharded) -> str:
    s = info.shards
    return (
        f"an activation sharded by channel (channels {s.own[0]}..{s.own[1]} of {s.total} on "
        f"rank {s.rank} of {s.world_size}, from '{info.producer}')"
    )


class _PlanHook:
    """A hook ``parallelize`` registers. Deep copies of the model share it (as they share
    plain function hooks); pickling it raises the error that says how to save the model."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __deepcopy__(self, memo) -> _PlanHook:
        return self

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_PICKLABLE)


def _needs_whole(tracker: _Tracker, name: str):
    def hook(module, args):
        info = tracker.first_sharded(args)
        if info is not None:
            raise PlanError(
                f"module '{name}' ({type(module).__name__}) received {_describe(info)}, but it "
                f"needs the whole tensor: end the chain before it (output_layout='replicated' "
                f"on '{info.producer}' or a ChannelLocal(output_layout='replicated') entry), "
                f"or add '{name}' to the plan"
            )

    return _PlanHook(hook)


def same_layout(a: ChannelShards, b: ChannelShards) -> bool:
    """Whether two shardings split alike: equal slices, or one the other's slices scaled
    (the flattened features of channel shards: each channel ``k`` features)."""
    small, large = sorted((a, b), key=lambda s: s.total)
    if small.total == 0 or large.total % small.total:
        return False
    k = large.total // small.total
    return large.slices == tuple((start * k, stop * k) for start, stop in small.slices)


def _expects_shards(tracker: _Tracker, name: str, shards: ChannelShards):
    def hook(module, args):
        info = tracker.first_sharded(args)
        if info is not None and not same_layout(info.shards, shards):
            raise PlanError(
                f"module '{name}' ({type(module).__name__}) expects channel shards "
                f"{list(shards.slices)} but received {_describe(info)} with shards "
                f"{list(info.shards.slices)}"
            )

    return _PlanHook(hook)


def _marks_output(tracker: _Tracker, name: str, shards: ChannelShards | None):
    def hook(module, args, output):
        info = _Sharded(shards, name) if shards is not None else tracker.first_sharded(args)
        if info is not None:
            tracker.mark(output, info)

    return _PlanHook(hook)


def _gathers_output(tracker: _Tracker, shards: ChannelShards):
    gather = GatherChannels.from_shards(shards)  # checked like any collective path

    def hook(module, args, output):
        whole = gather(output)
        tracker.forget(whole)  # on one rank the gather hands back ``output`` itself
        return whole

    return _PlanHook(hook)


def _planned_style(name: str, plan: dict) -> object | None:
    if name in plan:
        return plan[name]
    for pattern, style in plan.items():
        if any(ch in pattern for ch in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def _styles(modules: list[tuple[str, nn.Module]], plan: dict) -> dict[int, object | None]:
    """``{id(module): its style}``: the plan's entry for any of the module's names (entries
    for one module under several names must agree), else the drop-in for a grouped conv."""
    styles: dict[int, object | None] = {}
    named: dict[int, str] = {}
    for name, module in modules:
        style = _planned_style(name, plan)
        key = id(module)
        if style is not None and styles.get(key) not in (None, style):
            raise PlanError(
                f"'{name}' and '{named[key]}' are one module, but the plan gives them "
                f"different styles ({style} and {styles[key]})"
            )
        if style is not None or key not in styles:
            styles[key], named[key] = style, name
    for _, module in modules:
        grouped = getattr(module, "groups", 1) > 1
        if styles[id(module)] is None and type(module) in PARALLEL_OF and grouped:
            styles[id(module)] = ParallelLayer()
    return styles


def parallelize(
    model: nn.Module,
    process_group=None,
    *,
    plan: dict | str | None = None,
    sync_module_states: bool = True,
) -> nn.Module:
    """Replace ``model``'s grouped convolutions by group-parallel layers, in place.

    Every ``nn.Conv1d/2d/3d`` with ``groups > 1`` becomes the matching
    ``GroupParallelConvNd`` with its weights (replicated → replicated: same inputs and outputs
    as before); ``training``, device, dtype, ``requires_grad`` and registered hooks are kept.
    ``plan`` maps module names (or ``fnmatch`` patterns) to
    :class:`~mpgroups.plans.styles.ParallelLayer` or
    :class:`~mpgroups.plans.styles.ChannelLocal` to keep activations sharded along a chain.
    While a plan keeps anything sharded, a module outside the plan that receives a sharded
    activation raises :class:`PlanError` naming itself (channel-agnostic modules such as
    ``nn.ReLU`` or ``nn.MaxPool2d`` pass it on). Tensors that leave modules through
    functional code (``torch.flatten``, ``x + y``) are not followed.

    Args:
        model: the module tree to convert.
        process_group: ``ProcessGroup``, 1-D ``DeviceMesh`` or ``None`` (default group, or a
            single-device layer when ``torch.distributed`` is not initialised).
        plan: ``{module name or pattern: style}``; a :class:`~mpgroups.plans.styles.Plan`
            (what ``auto_plan`` returns) only over a group of the size it was made for;
            ``"auto"`` makes one for this group; ``"spatial"`` splits every layer's rows
            instead of its channels (:mod:`mpgroups.plans.spatial_plan`: the model then takes
            and gives this rank's rows along dim 2; over a ``("sp_h", "sp_w")`` mesh its
            block of dims 2 and 3; over an ``("sp", "gp")`` mesh its rows with the channel
            groups split over ``gp`` as ``"auto"`` splits them,
            :mod:`mpgroups.plans.space_and_groups`).
        sync_module_states: first copy every parameter and buffer from rank 0 of the group
            (one broadcast per dtype), as DDP does, so ranks that initialised differently
            still hold one model. ``False`` trusts that every rank holds the same values.

    Returns:
        The converted root (a new module only when ``model`` itself is a grouped conv).

    Raises:
        PlanError: a plan made for another group size, a plan entry that names no module,
            a style on a module it cannot apply to, neighbouring sharded layers whose
            channel shards disagree.
        PlacementError: a grouped conv whose groups cannot be placed on the group's size
            (naming the module).
    """
    if getattr(model, "_mpgroups_tracker", None) is not None or "_mpgroups_spatial" in vars(model):
        raise PlanError("model is already parallelized; call unparallelize(model) first")
    if plan == "spatial":
        if is_space_and_groups(process_group):
            return parallelize_space_and_groups(
                model, process_group, sync_module_states, convert_channels
            )
        return spatialize(model, process_group, sync_module_states=sync_module_states)
    return convert_channels(model, process_group, plan, sync_module_states)


def convert_channels(
    model: nn.Module,
    process_group,
    plan: dict | str | None,
    sync_module_states: bool,
    *,
    finish: bool = True,
) -> nn.Module:
    """:func:`parallelize` with a channel plan; ``finish=False`` leaves out the root check
    and the parameters' DTensors (a composed plan converts more layers first, then checks
    over all its ranks and distributes)."""
    pg = resolve_process_group(process_group)
    if isinstance(plan, str):
        if plan != "auto":
            raise PlanError(f"plan must be a dict, 'auto' or 'spatial', got {plan!r}")
        plan = auto_plan(model, pg)
    size = 1 if pg is None else pg.size()
    made_for = getattr(plan, "world_size", size)
    if made_for != size:
        raise PlanError(
            f"this plan was made for {made_for} ranks and the process group has {size}: a "
            f"grouped conv splits differently (or not at all) at another size; make the plan "
            f"for this group, auto_plan(model, process_group) or plan='auto'"
        )
    plan = dict(plan or {})
    # Every name of a module held under several names (weight sharing): each name gets the
    # one converted module, so the weights stay tied.
    modules = list(model.named_modules(remove_duplicate=False))
    names = {name for name, _ in modules}
    for key, style in plan.items():
        if not isinstance(style, ParallelLayer | ChannelLocal | NoParallel):
            raise PlanError(
                f"plan['{key}'] must be ParallelLayer, ChannelLocal or NoParallel, got "
                f"{type(style).__name__}"
            )
        if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names):
            raise PlanError(f"plan entry '{key}' matches no module of {type(model).__name__}")

    if sync_module_states:
        state = [*model.parameters(), *model.buffers()]
        layout = tuple((str(t.dtype), tuple(t.shape)) for t in state)
        check_same_call(f"parallelize({type(model).__name__})", layout, pg)
        broadcast_tensors_(state, pg)

    tracker = _Tracker()
    producer: tuple[str, ChannelShards] | None = None  # last sharded output, in module order
    styled: dict[str, object] = {}
    styles = _styles(modules, plan)
    converted: dict[int, nn.Module] = {}  # id(original module) -> the module now in its place
    for name, module in modules:
        style = styles[id(module)]
        if id(module) in converted:
            model = replace_module(model, name, converted[id(module)])
            if style is not None:
                styled[name] = style
            continue
        converted[id(module)] = module
        if isinstance(module, PARALLEL_LAYERS):
            raise PlanError(f"module '{name}' is already a {type(module).__name__}")
        if isinstance(style, ParallelLayer):
            layer = _parallel_layer(name, module, style, pg)
            move_hooks(module, layer)
            if style.input_layout == "sharded":
                # The module before it may not be its source (a shortcut registered before
                # the branch, as RegNet's proj): a total that is not a multiple of the one
                # before (flattened channels are) is left to the check each call makes.
                inputs = layer.shards.inputs
                if (
                    producer is not None
                    and inputs.total % max(producer[1].total, 1) == 0
                    and not same_layout(producer[1], inputs)
                ):
                    raise PlanError(
                        f"'{name}' takes a sharded input with channel shards "
                        f"{list(layer.shards.inputs.slices)}, but '{producer[0]}' before it "
                        f"produces {list(producer[1].slices)}"
                    )
                layer.register_forward_pre_hook(_expects_shards(tracker, name, layer.shards.inputs))
            else:
                layer.register_forward_pre_hook(_needs_whole(tracker, name))
            if style.output_layout == "sharded":
                producer = (name, layer.shards.outputs)
                layer.register_forward_hook(_marks_output(tracker, name, layer.shards.outputs))
            model = replace_module(model, name, layer)
            converted[id(module)] = layer
            styled[name] = style
        elif isinstance(style, ChannelLocal):
            shards = _channel_local_shards(name, module, style, producer, pg)
            try:
                if isinstance(module, DROPOUTS):
                    dropout = ShardedDropout(module, shards)
                    move_hooks(module, dropout)
                    model = replace_module(model, name, dropout)
                    converted[id(module)] = module = dropout
                else:
                    shard_channel_module(module, shards)
            except (TypeError, ValueError) as err:
                raise PlanError(f"plan entry for '{name}': {err}") from err
            module.register_forward_pre_hook(_expects_shards(tracker, name, shards))
            if style.output_layout == "replicated":
                module.register_forward_hook(_gathers_output(tracker, shards))
            else:
                module.register_forward_hook(_marks_output(tracker, name, shards))
            styled[name] = style
    # Guards on the modules outside the plan, only when something is kept sharded.
    if any(getattr(s, "output_layout", None) == "sharded" for s in styled.values()):
        for name, module in model.named_modules():
            if name in styled or next(module.children(), None) is not None:
                continue
            if is_channel_agnostic(module):
                handle = module.register_forward_hook(_marks_output(tracker, name, None))
            else:
                handle = module.register_forward_pre_hook(_needs_whole(tracker, name))
            tracker.handles.append(handle)
    if size > 1 and finish:
        tracker.handles.extend(check_at_root(model, pg, ("input_guard",)))
        distribute_model_state(model, pg, process_group)
    model._mpgroups_tracker = tracker
    model._mpgroups_styled = styled
    return model


def _parallel_layer(name: str, module: nn.Module, style: ParallelLayer, pg) -> nn.Module:
    """The parallel layer for ``module`` (an ``nn.ConvNd`` or ``nn.Linear``) in ``style``."""
    kind = PARALLEL_OF.get(type(module))
    if kind is None:
        raise PlanError(
            f"plan gives ParallelLayer to '{name}', a {type(module).__name__}; it applies to "
            f"nn.Conv1d/2d/3d and nn.Linear"
        )
    try:
        if kind is ParallelLinear:
            return ParallelLinear.from_linear(module, pg, **style.layer_kwargs())
        return kind.from_conv(module, pg, **style.layer_kwargs())
    except PlacementError as err:
        raise PlacementError(
            f"'{name}' ({type(module).__name__} with groups={getattr(module, 'groups', 1)})"
            f": {err}. To keep this layer whole, give it NoParallel() in the plan"
        ) from err
    except ValueError as err:
        raise PlanError(f"plan entry for '{name}' ({style}): {err}") from err


def _channel_local_shards(name, module, style: ChannelLocal, producer, pg) -> ChannelShards:
    if style.groups is not None:
        channels = style.channels
        if channels is None:
            channels = getattr(module, "num_features", None) or getattr(
                module, "num_channels", None
            )
        if channels is None:
            raise PlanError(
                f"ChannelLocal on '{name}' ({type(module).__name__}) has groups but no channel "
                f"count; give ChannelLocal(channels=..., groups=...)"
            )
        return channel_shards(channels, style.groups, pg)
    if producer is None:
        raise PlanError(
            f"ChannelLocal on '{name}' has no sharded-output conv before it to take the "
            f"channel layout from; give ChannelLocal(channels=..., groups=...)"
        )
    if style.channels is not None and style.channels != producer[1].total:
        raise PlanError(
            f"ChannelLocal on '{name}' says channels={style.channels}, but '{producer[0]}' "
            f"before it produces {producer[1].total}"
        )
    return producer[1]


def unparallelize(model: nn.Module) -> nn.Module:
    """Gather every group-parallel layer back into plain ``torch.nn`` modules (a collective).

    Returns the root with full weights on every rank: ``unparallelize(parallelize(m))`` has
    ``m``'s ``state_dict``, bit for bit.
    """
    if "_mpgroups_spatial" in vars(model):
        model = unspatialize(model)
        if getattr(model, "_mpgroups_tracker", None) is None:
            return model  # rows split alone (channel groups too: go on)
    tracker = getattr(model, "_mpgroups_tracker", None)
    if tracker is not None:
        for handle in tracker.handles:
            handle.remove()
    styled = getattr(model, "_mpgroups_styled", {})
    restored: dict[int, nn.Module] = {}  # id(parallel module) -> its torch.nn module
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in restored:
            model = replace_module(model, name, restored[id(module)])
        elif isinstance(module, (*PARALLEL_LAYERS, ShardedDropout)):
            _drop_plan_hooks(module)
            if isinstance(module, ParallelLinear):
                plain = module.to_linear()
            elif isinstance(module, ShardedDropout):
                plain = module.to_dropout()
            else:
                plain = module.to_conv()
            move_hooks(module, plain)
            restored[id(module)] = plain
            model = replace_module(model, name, plain)
        elif row_shards(module) is not None or name in styled:
            _drop_plan_hooks(module)
            unshard_channel_module(module)
            restored[id(module)] = module
    undistribute_model_state(model)
    for attr in ("_mpgroups_tracker", "_mpgroups_styled"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def _drop_plan_hooks(module: nn.Module) -> None:
    """Remove the hooks ``parallelize`` added."""
    for attr in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = getattr(module, attr)
        for key in [k for k, fn in hooks.items() if isinstance(fn, _PlanHook)]:
            del hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra).pop(key, None)
