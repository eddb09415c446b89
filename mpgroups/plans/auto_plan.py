"""Plans derived from a model's graph (``torch.fx``): the longest chains that stay sharded.

:func:`auto_plan` traces the model and decides, for the process group's size ``P``, which
activations can stay sharded by channel (docs/design.md §3b):

* a grouped conv (``groups > 1``) computes its own channels: its output is sharded;
* a ``groups=1`` conv or Linear that produces, through per-channel modules alone, the input of
  a sharded consumer (a grouped conv, or an elementwise op whose other operand is sharded, as
  in a squeeze-excitation) becomes column-parallel (``split="colwise"``), laid out as that
  consumer's channels (``shard_groups``);
* a ``groups=1`` conv or Linear that reads a sharded activation becomes row-parallel
  (``split="rowwise"``), closing the chain with one all-reduce (a Linear reads channels only
  once they are flattened, or another Linear's features); so does the second of two
  ``groups=1`` layers joined by per-channel modules alone (Megatron-LM's pairing);
* per-channel modules (BatchNorm, GroupNorm with whole norm groups per shard, activations,
  pooling, dropout, ``nn.Flatten``) and elementwise functions run on the shards;
* anything else that receives a sharded activation gets it whole: the chain ends there with
  an all-gather.

For torchvision's ResNeXt, RegNet and MobileNetV2 this gives column → grouped/depthwise → row
in every block. The result is an ordinary plan dict (module name → style) to print, edit and
pass to :func:`mpgroups.parallelize`.

Two objectives (docs/design.md §5):

* ``"collectives"`` (the default): the fewest collectives. A row-parallel layer all-reduces,
  so what lies between chains (a ResNet's residual stream, its downsample convs, the stem,
  the classifier) is replicated: computed and held whole on every rank.
* ``"memory"``: every layer it can split. A row-parallel layer reduce-scatters, so its output
  stays sharded (Megatron-LM's sequence parallelism, along channels): the norms, residual
  adds and activations between chains run on shards; a dense layer reading a sharded
  activation is row-parallel again (sharded → sharded); a dense layer reading a replicated
  one is column-parallel (gathering its output where what follows needs it whole: its
  parameters split, its activations not). About 1/P of the parameters per rank; a collective
  per dense layer forward and one backward (a reduce-scatter or an all-gather, each half of
  what an all-reduce of the same tensor carries) where the default makes one per block each
  way. A ResNeXt block comes out row → grouped → row.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from mpgroups.comm.process_groups import rank_and_world_size, resolve_process_group
from mpgroups.layers.channel_modules import CHANNEL_AGNOSTIC, DROPOUTS, NORMS, is_channel_agnostic
from mpgroups.layers.kinds import CONVS
from mpgroups.plans.styles import ChannelLocal, NoParallel, ParallelLayer, Plan
from mpgroups.sharding.layout import ChannelShards, layer_shards, layout_shards
from mpgroups.sharding.placement import PlacementError

__all__ = ["OBJECTIVES", "auto_plan"]

OBJECTIVES = ("collectives", "memory")

# Elementwise modules: the only ones allowed on features sharded along the last dim.
_ELEMENTWISE = tuple(
    m for m in CHANNEL_AGNOSTIC if not m.__name__.startswith(("MaxPool", "AvgPool", "Adaptive"))
)
_CHANNEL_FUNCTIONS = {
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.sigmoid, F.tanh, torch.relu, torch.sigmoid, torch.tanh,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
}  # fmt: skip
_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous"}
_BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, operator.imul, operator.sub, operator.truediv,
    torch.add, torch.mul, torch.sub,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "mul", "mul_", "sub", "div"}


@dataclass(frozen=True)
class _Layout:
    """A sharded activation: ``channels`` laid out as a conv with ``groups`` lays them out;
    ``features`` when they lie on the last dim (a Linear's output) instead of dim 1 (``None``
    in a request that takes either)."""

    channels: int
    groups: int
    shards: ChannelShards
    features: bool | None = False
    flat: bool = False  # channels flattened into the last dim with what follows them


class _Graph:
    """The traced graph, and what has been decided about it so far."""

    def __init__(self, model: nn.Module, graph: fx.Graph, world_size: int, memory: bool) -> None:
        self.model = model
        self.world_size = world_size
        self.memory = memory  # the "memory" objective: row-parallel outputs stay sharded
        self.nodes = list(graph.nodes)
        calls: dict[str, int] = {}
        for node in self.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        # A module called at two places could need two layouts: it stays as it is.
        self.called_once = {target for target, count in calls.items() if count == 1}
        self.columns: dict[fx.Node, _Layout] = {}  # groups=1 layers made column-parallel
        self.gathered: set[fx.Node] = set()  # module nodes whose sharded output is gathered
        self.whole: set[fx.Node] = set()  # function nodes that must see whole tensors

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module ``node`` calls, when it is called at this one place."""
        if node.op != "call_module" or node.target not in self.called_once:
            return None
        return self.model.get_submodule(node.target)

    def stateless_agnostic(self, node: fx.Node) -> bool:
        """A channel-agnostic module without state (``torchvision``'s one ``self.relu``
        called three times in a Bottleneck): fine on shards wherever it is called."""
        if node.op != "call_module":
            return False
        module = self.model.get_submodule(node.target)
        stateless = next(iter(module.parameters()), None) is None
        return stateless and is_channel_agnostic(module) and isinstance(module, _ELEMENTWISE)

    def layout(self, channels: int, groups: int, features: bool | None = False) -> _Layout | None:
        try:
            shards = layout_shards(channels, groups, self.world_size, 0)
        except PlacementError:
            return None
        return _Layout(channels, groups, shards, features)

    def make_whole(self, sources) -> None:
        """The sharded outputs ``sources`` must be whole: gathered by the module that makes
        them, or (a function) computed on whole tensors."""
        for source in sources:
            if source.op == "call_module":
                self.gathered.add(source)
            else:
                self.whole.add(source)


def _dense(module: nn.Module | None) -> bool:
    """A ``groups=1`` conv or a Linear: its channels may split any way."""
    if type(module) is nn.Linear:
        return True
    return type(module) in CONVS and module.groups == 1 and module.padding_mode == "zeros"


def _grouped(module: nn.Module | None) -> bool:
    return type(module) in CONVS and module.groups > 1


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _flattens_channels(node: fx.Node) -> bool:
    """``torch.flatten(x, 1)`` or ``x.flatten(1)`` (to the last dim)."""
    is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )
    if not is_flatten:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


def _binary(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _BINARY_FUNCTIONS
    return node.op == "call_method" and node.target in _BINARY_METHODS


def _keeps_layout(g: _Graph, node: fx.Node, layout: _Layout) -> bool:
    """Whether ``node`` (one tensor input, sharded as ``layout``) computes its output shard
    from its input shard alone, sharded alike."""
    if node in g.whole or len(node.all_input_nodes) != 1:
        return False
    if node.op == "call_module":
        module = g.module(node)
        if module is None:
            return g.stateless_agnostic(node)
        if layout.features:
            return isinstance(module, _ELEMENTWISE)
        if isinstance(module, nn.GroupNorm):
            per_group = module.num_channels // module.num_groups
            fits = module.num_channels == layout.channels
            return fits and all(a % per_group == 0 for a, _ in layout.shards.slices)
        if isinstance(module, NORMS):
            return getattr(module, "num_features", None) == layout.channels
        if isinstance(module, DROPOUTS):
            return 0 not in layout.shards.widths
        return is_channel_agnostic(module)
    if node.op == "call_function" and node.target in _CHANNEL_FUNCTIONS:
        return not layout.features or "pool" not in node.target.__name__
    if node.op == "call_method" and node.target in _CHANNEL_METHODS:
        return True
    return not layout.features and _flattens_channels(node)


def _row_fits(g: _Graph, module: nn.Module, layout: _Layout) -> bool:
    """Whether a row-parallel ``module`` can read ``layout``: its channels, or for a Linear
    their flattened features, split alike."""
    cin, cout = _in_out(module)
    linear = isinstance(module, nn.Linear)
    if (layout.features and not linear) or cin % layout.channels:
        return False
    if linear and not layout.features and not layout.flat:
        return False  # a Linear over a conv's last spatial dim, not its channels
    if not linear and cin != layout.channels:
        return False
    try:
        shards = layer_shards(
            cin, cout, 1, g.world_size, 0, split="rowwise", shard_groups=layout.groups,
            input_layout="sharded",
        )  # fmt: skip
    except (PlacementError, ValueError):
        return False
    k = cin // layout.channels
    return shards.inputs.slices == tuple((a * k, b * k) for a, b in layout.shards.slices)


def _row_output(g: _Graph, module: nn.Module, layout: _Layout) -> tuple[_Layout, int] | None:
    """The sharded output of a row-parallel ``module`` reading ``layout`` (a reduce-scatter)
    and the ``shard_groups`` that lays it out: ``layout``'s groups, else 1 where the input
    splits alike under both (a dense layer after a depthwise conv of more channels than it
    outputs). ``None`` when no output split fits."""
    cin, cout = _in_out(module)
    k = cin // layout.channels
    expected = tuple((a * k, b * k) for a, b in layout.shards.slices)
    for groups in dict.fromkeys((layout.groups, 1)):
        try:
            shards = layer_shards(
                cin, cout, 1, g.world_size, 0, split="rowwise", shard_groups=groups,
                input_layout="sharded", output_layout="sharded",
            )  # fmt: skip
        except (PlacementError, ValueError):
            continue
        if shards.inputs.slices == expected and 0 not in shards.outputs.widths:
            return _Layout(cout, groups, shards.outputs, type(module) is nn.Linear), groups
    return None


def _same(a: _Layout, b: _Layout) -> bool:
    return (
        a.channels == b.channels
        and a.shards.slices == b.shards.slices
        and (a.features == b.features)
    )


def _make_self_column(g: _Graph, node: fx.Node, module: nn.Module) -> bool:
    """Under the memory objective, make the dense ``node`` (replicated input) column-parallel
    with its output sharded. False when its output channels cannot be split."""
    _, cout = _in_out(module)
    layout = g.layout(cout, 1, features=type(module) is nn.Linear)
    if layout is None or 0 in layout.shards.widths:
        return False
    g.columns[node] = layout
    return True


def _make_column(g: _Graph, node: fx.Node, layout: _Layout, sharded: dict) -> bool:
    """Make the ``groups=1`` layer whose output reaches ``node`` through per-channel nodes
    alone (each used once) column-parallel, producing ``layout``. False when there is none."""
    chain = []
    while True:
        module = g.module(node)
        if _dense(module):
            break
        if node in sharded or len(node.users) != 1 or len(node.all_input_nodes) != 1:
            return False
        if _binary(node):
            return False
        chain.append(node)
        node = node.all_input_nodes[0]
    cin, cout = _in_out(module)
    produced = _Layout(layout.channels, layout.groups, layout.shards, type(module) is nn.Linear)
    fits = (
        len(node.users) == 1
        and node not in g.columns
        and node.args[0] not in sharded
        and cout == layout.channels
        and layout.features in (None, produced.features)
        and all(_keeps_layout(g, n, produced) for n in chain)
    )
    if fits:
        try:
            layer_shards(
                cin, cout, 1, g.world_size, 0, shard_groups=layout.groups,
                output_layout="sharded",
            )  # fmt: skip
        except (PlacementError, ValueError):
            fits = False
    if not fits:
        return False
    g.columns[node] = produced
    return True


def _propagate(g: _Graph) -> tuple[bool, dict, dict]:
    """One pass in graph order: which outputs are sharded (and how) and each module's role.
    Returns ``(changed, sharded, roles)``; ``changed`` means a decision was added and the
    pass must run again."""
    sharded: dict[fx.Node, _Layout] = {}
    roles: dict[fx.Node, tuple] = {}

    def keep(node: fx.Node, layout: _Layout) -> None:
        if node not in g.gathered:
            sharded[node] = layout

    for node in g.nodes:
        inputs = [a for a in node.all_input_nodes if a in sharded]
        module = g.module(node)
        if node in g.columns:
            wanted = g.columns[node]
            if inputs and g.memory and node.args[0] in sharded:
                # The memory objective shards what this layer reads: row-parallel, its
                # reduce-scatter giving the layout the column would have made.
                layout = sharded[node.args[0]]
                out = _row_output(g, module, layout) if _row_fits(g, module, layout) else None
                if out is not None and _same(out[0], wanted):
                    roles[node] = ("row", layout, wanted, out[1])
                    keep(node, wanted)
                    continue
            if inputs:
                g.make_whole(inputs)
                return True, sharded, roles
            roles[node] = ("column", wanted)
            keep(node, wanted)
        elif _grouped(module):
            cin, cout = _in_out(module)
            own_in, own_out = g.layout(cin, module.groups), g.layout(cout, module.groups)
            source = node.args[0]
            if own_in is None or own_out is None:  # groups that cannot be placed on P ranks
                if inputs:
                    g.make_whole(inputs)
                    return True, sharded, roles
                roles[node] = ("whole",)
                continue
            if source in sharded and sharded[source].shards.slices != own_in.shards.slices:
                g.make_whole([source])
                return True, sharded, roles
            if source not in sharded and _make_column(g, source, own_in, sharded):
                return True, sharded, roles
            roles[node] = ("grouped", "sharded" if source in sharded else "replicated")
            keep(node, own_out)
        elif _dense(module):
            source = node.args[0]
            if source in sharded and _row_fits(g, module, sharded[source]):
                out = _row_output(g, module, sharded[source]) if g.memory else None
                if out is None:
                    roles[node] = ("row", sharded[source], None, sharded[source].groups)
                else:
                    roles[node] = ("row", sharded[source], *out)
                    keep(node, out[0])
                continue
            if inputs:
                g.make_whole(inputs)
                return True, sharded, roles
            cin, _ = _in_out(module)
            # A Linear reads a Linear's features or (flattened) channels; a conv channels.
            wanted = g.layout(cin, 1, features=None if type(module) is nn.Linear else False)
            if wanted is not None and _make_column(g, source, wanted, sharded):
                return True, sharded, roles  # Megatron's pair: this one becomes row-parallel
            if g.memory and not inputs and _make_self_column(g, node, module):
                return True, sharded, roles
        elif inputs and _keeps_layout(g, node, sharded[inputs[0]]):
            if node.op == "call_module" and node.target in g.called_once:
                roles[node] = ("local", sharded[inputs[0]])
            layout = sharded[inputs[0]]
            flattens = isinstance(module, nn.Flatten) and module.start_dim == 1
            if (flattens and module.end_dim == -1) or _flattens_channels(node):
                layout = replace(layout, flat=True)
            keep(node, layout)
        elif inputs and _binary(node) and node not in g.whole:
            layout = sharded[inputs[0]]
            others = [a for a in node.all_input_nodes if a not in sharded]
            alike = all(sharded[a].shards.slices == layout.shards.slices for a in inputs)
            if alike and not others:
                sharded[node] = layout
                continue
            if alike and len(others) == 1 and _make_column(g, others[0], layout, sharded):
                return True, sharded, roles
            g.make_whole(inputs)
            return True, sharded, roles
        elif inputs:
            g.make_whole(inputs)
            return True, sharded, roles
    return False, sharded, roles


def _styles(g: _Graph, roles: dict) -> dict[str, object]:
    plan: dict[str, object] = {}
    for node, role in roles.items():
        out = "replicated" if node in g.gathered else "sharded"
        kind = role[0]
        if kind == "whole":
            plan[node.target] = NoParallel()
            continue
        if kind == "grouped":
            plan[node.target] = ParallelLayer(input_layout=role[1], output_layout=out)
            continue
        layout = role[1]
        groups = None if layout.groups == 1 else layout.groups
        if kind == "column":
            plan[node.target] = ParallelLayer(output_layout=out, shard_groups=groups)
        elif kind == "row":
            sharded_out = role[2] is not None and node not in g.gathered
            plan[node.target] = ParallelLayer(
                split="rowwise",
                input_layout="sharded",
                output_layout="sharded" if sharded_out else "replicated",
                shard_groups=None if role[3] == 1 else role[3],
            )
        else:
            plan[node.target] = ChannelLocal(
                output_layout=out, channels=layout.channels, groups=layout.groups
            )
    return plan


def auto_plan(
    model: nn.Module,
    process_group=None,
    *,
    world_size: int | None = None,
    objective: str = "collectives",
) -> Plan:
    """A plan for :func:`mpgroups.parallelize` derived from ``model``'s graph.

    Args:
        model: the plain ``torch.nn`` model (before ``parallelize``).
        process_group: the group it will run over (``ProcessGroup``, 1-D ``DeviceMesh`` or
            ``None`` for the default group, else one rank): the plan is made for its size.
        world_size: make the plan for this many ranks instead (to print or edit a plan on
            a machine without the job's process group).
        objective: ``"collectives"`` (the default: the fewest collectives; what lies between
            chains stays replicated) or ``"memory"`` (every layer it can split; activations
            between chains stay sharded, at twice the collectives or more; see the module
            docstring).

    Returns:
        A :class:`~mpgroups.plans.styles.Plan` (a ``dict`` ``{module name: style}`` in graph
        order, see the module docstring) for ``world_size`` ranks. A model that ``torch.fx``
        cannot trace gets an empty plan, the drop-in, with a warning saying why.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if world_size is None:
        _, world_size = rank_and_world_size(resolve_process_group(process_group))
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many kinds: any of them means "cannot trace"
        warnings.warn(
            f"mpgroups.auto_plan: torch.fx cannot trace {type(model).__name__} "
            f"({type(err).__name__}: {err}); using the drop-in plan instead (each grouped "
            f"conv replicated -> replicated)",
            stacklevel=2,
        )
        return Plan(world_size=world_size)
    g = _Graph(model, graph, world_size, objective == "memory")
    for _ in range(8 * len(g.nodes) + 8):  # each rerun adds a decision; there are few
        changed, _, roles = _propagate(g)
        if not changed:
            return Plan(_styles(g, roles), world_size=world_size)
    raise RuntimeError(f"auto_plan found no stable plan for {type(model).__name__}")
