"""What experienced PyTorch users do that parity alone does not cover: gradient penalties
(higher-order grads), process groups of their own made before the layer, weights shared under
two names, ``copy.deepcopy`` for an EMA, pickling. (channels_last is asserted in every parity
case, see ``parity.check_layer``.)"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_in_one_rank_world
from parity import LAYOUT_PAIRS, assert_close
from torch import nn
from torch.func import functional_call

import mpgroups
from mpgroups.comm.collectives import all_gather_channels, slice_channels

# (in, out, groups): whole groups per rank at P = 2, and a filter split (G = 1 < P).
HIGHER_ORDER_CASES = [(4, 4, 2), (4, 4, 1)]


def _as_full_function(layer):
    """``f(x, weight, bias) -> y``: the layer as a function of the full tensors, replicated on
    every rank, so each rank computes exactly the single-device function (and gradcheck's
    perturbations happen in step on every rank). Each rank takes its rows of the weight and
    bias and, for a sharded input, its input channels; a sharded output is gathered."""
    in_shards, out_shards = layer.shards.inputs, layer.shards.outputs

    def f(x, weight, bias):
        x_in = slice_channels(x, in_shards) if layer.input_layout == "sharded" else x
        local = {
            "weight": slice_channels(weight, out_shards, dim=0),
            "bias": slice_channels(bias, out_shards, dim=0),
        }
        y = functional_call(layer, local, (x_in,))
        return all_gather_channels(y, out_shards) if layer.output_layout == "sharded" else y

    return f


def _gradgradcheck(ctx, cin, cout, groups, layouts) -> bool:
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, dtype=torch.float64)
    layer = mpgroups.GroupParallelConv2d.from_conv(
        ref, ctx.process_group, input_layout=layouts[0], output_layout=layouts[1]
    )
    assert layer.placement.filter_split == (groups < ctx.world_size)
    f = _as_full_function(layer)
    x = torch.randn(1, cin, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = ref.weight.detach().clone().requires_grad_()
    bias = ref.bias.detach().clone().requires_grad_()
    assert_close(f(x, weight, bias), ref(x), 1e-12, "forward")
    inputs = (x, weight, bias)
    # Fast mode compares the analytical and numerical grads along random directions (a wrong
    # entry shows in all of them), not entry by entry: each entry costs a step with collectives.
    return torch.autograd.gradcheck(f, inputs, fast_mode=True) and torch.autograd.gradgradcheck(
        f, inputs, fast_mode=True
    )


@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="->".join)
@pytest.mark.parametrize("cin, cout, groups", HIGHER_ORDER_CASES, ids=["G>=P", "G<P"])
def test_gradgradcheck_in_every_layout(pool, cin, cout, groups, layouts):
    assert pool.run(_gradgradcheck, 2, cin, cout, groups, layouts) == [True, True]


def _gradient_penalty(ctx, layouts, groups: int) -> None:
    """An R1-style penalty |d(v.y)/dx|^2 through the layer: every grad as nn.Conv2d's."""
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    layer = mpgroups.GroupParallelConv2d.from_conv(
        ref, ctx.process_group, input_layout=layouts[0], output_layout=layouts[1]
    )
    x, v = torch.randn(2, 8, 5, 5), torch.randn(2, 8, 5, 5)

    def penalty_grads(fn) -> tuple:
        xi = x.clone().requires_grad_()
        weight = ref.weight.detach().clone().requires_grad_()
        bias = ref.bias.detach().clone().requires_grad_()
        y = fn(xi, weight, bias)
        (grad_x,) = torch.autograd.grad((y * v).sum(), xi, create_graph=True)
        (grad_x.square().sum() + y.square().mean()).backward()
        return xi.grad, weight.grad, bias.grad

    got = penalty_grads(_as_full_function(layer))
    want = penalty_grads(lambda xi, w, b: F.conv2d(xi, w, b, padding=1, groups=groups))
    for name, g, w in zip(("input", "weight", "bias"), got, want, strict=True):
        assert_close(g, w, 1e-5, f"rank {ctx.rank} {layouts} penalty {name} grad")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("layouts", LAYOUT_PAIRS, ids="->".join)
def test_gradient_penalty_equals_nn_conv2d(pool, world_size, layouts):
    pool.run(_gradient_penalty, world_size, layouts, 2)  # P = 4: teams of two


def _drop_in_penalty(ctx) -> None:
    """The drop-in layer itself (no wrapper): the weight grads of a penalty equal the rows of
    nn.Conv2d's."""
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 8, 3, padding=1, groups=2)
    layer = mpgroups.GroupParallelConv2d.from_conv(ref, ctx.process_group)
    x = torch.randn(2, 8, 5, 5)
    for module in (ref, layer):
        xi = x.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(module(xi).square().sum(), xi, create_graph=True)
        grad_x.square().sum().backward()
    start, stop = layer.out_slice
    assert_close(layer.weight.grad, ref.weight.grad[start:stop], 1e-5, "weight grad")
    assert_close(layer.bias.grad, ref.bias.grad[start:stop], 1e-5, "bias grad")


@pytest.mark.parametrize("world_size", [2, 4])
def test_drop_in_layer_under_a_gradient_penalty(pool, world_size):
    pool.run(_drop_in_penalty, world_size)


def _own_group_first(ctx) -> None:
    """A data-parallel group of ranks 0 and 2, made the ordinary way before the layer: only
    its members register it, so the ranks no longer agree on how many groups they hold."""
    data_parallel = dist.new_group([0, 2])
    if ctx.rank in (0, 2):
        dist.all_reduce(torch.ones(1), group=data_parallel)
    # A new parent group, so that no team of it exists yet in any process.
    model_parallel = dist.new_group([0, 1, 2, 3])
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    layer = mpgroups.GroupParallelConv2d.from_conv(ref, model_parallel)  # teams {0, 1}, {2, 3}
    assert layer.placement.filter_split
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert_close(y, ref(x), 1e-5, "output")


def test_team_groups_agree_whatever_groups_ranks_made_before(scratch_pool):
    # In the scratch pool, discarded after: its ranks then hold different numbers of groups,
    # which would break later groups made with use_local_synchronization.
    try:
        scratch_pool.run(_own_group_first, 4)
    finally:
        scratch_pool.discard()


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.a = conv
        self.b = conv  # the same module under a second name: tied weights

    def forward(self, x):
        return self.b(torch.relu(self.a(self.stem(x))))


def _train_shared(model, x, steps: int = 3) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _shared_module(ctx) -> None:
    torch.manual_seed(0)
    reference = _Shared()
    model = copy.deepcopy(reference)
    model = mpgroups.parallelize(model, ctx.process_group)
    assert isinstance(model.a, mpgroups.GroupParallelConv2d)
    assert model.a is model.b
    x = torch.randn(2, 3, 6, 6)
    losses, want = _train_shared(model, x), _train_shared(reference, x)
    for got, expected in zip(losses, want, strict=True):
        assert abs(got - expected) <= 1e-5 * max(1.0, abs(expected))
    full = mpgroups.full_state_dict(model)
    for key, value in reference.state_dict().items():
        assert_close(full[key], value, 1e-5, key)
    mpgroups.unparallelize(model)
    assert type(model.a) is nn.Conv2d and model.a is model.b


def test_parallelize_keeps_a_shared_module_shared(pool):
    pool.run(_shared_module, 2)


def _copies(ctx) -> None:
    torch.manual_seed(0)
    model = mpgroups.models.AlexNet(
        10, channels=(16, 32, 48, 48, 32), hidden=64, dropout=0.0, process_group=ctx.process_group
    )
    x = torch.randn(2, 3, 32, 32)
    twin = copy.deepcopy(model)
    assert twin.features.conv2.process_group is model.features.conv2.process_group
    assert twin.features.conv2.weight is not model.features.conv2.weight
    assert torch.equal(twin(x), model(x))
    ema = torch.optim.swa_utils.AveragedModel(model)
    ema.update_parameters(model)
    assert torch.equal(ema(x), model(x))
    with pytest.raises(TypeError, match="full_state_dict"):
        pickle.dumps(model)


def _copies_of_a_planned_model(ctx) -> None:
    """A plan puts guards on the modules outside it; the first module here is one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU())
    plan = {"1": mpgroups.ParallelLayer(output_layout="sharded"), "2": mpgroups.ChannelLocal()}
    model = mpgroups.parallelize(model, ctx.process_group, plan=plan)
    shallow = copy.copy(model[1])
    assert shallow.weight is model[1].weight and shallow.process_group is model[1].process_group
    twin = copy.deepcopy(model)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(twin(x), model(x))
    with pytest.raises(TypeError, match="full_state_dict"):
        pickle.dumps(model)


def test_copies_of_a_planned_model(pool):
    pool.run(_copies_of_a_planned_model, 2)


def test_deepcopy_shares_process_groups_and_pickle_says_what_to_do(pool):
    pool.run(_copies, 2)


def test_deepcopy_in_a_one_rank_world():
    run_in_one_rank_world(_copies)


def _channels_last_views(ctx) -> None:
    """A channel slice of a channels_last tensor (a view with gaps, as from torch.chunk) and
    the one-rank entry and exit points keep channels_last, as nn.Conv2d does."""
    torch.manual_seed(0)
    big = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    x = big[:, :8]
    assert not x.is_contiguous(memory_format=torch.channels_last)
    for groups in (4, 1):  # whole groups, and a filter split (G < P)
        ref = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        layer = mpgroups.GroupParallelConv2d.from_conv(ref, ctx.process_group)
        y, y_ref = layer(x), ref(x)
        assert y_ref.is_contiguous(memory_format=torch.channels_last)
        assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
        assert_close(y, y_ref, 1e-5, f"groups={groups} output")
    shard = mpgroups.scatter_channels(
        big if ctx.rank == 0 else None, 0, groups=4, process_group=ctx.process_group
    )
    assert shard.is_contiguous(memory_format=torch.channels_last), shard.stride()
    whole = mpgroups.gather_channels(shard, 0, groups=4, process_group=ctx.process_group)
    if ctx.rank == 0:
        assert whole.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(whole, big)


def test_channels_last_views_and_the_scatter_and_gather_keep_their_layout(pool):
    pool.run(_channels_last_views, 2)


def _modes_and_precisions(ctx) -> None:
    torch.manual_seed(0)
    ref = nn.Conv2d(8, 8, 3, padding=1, groups=4)
    layer = mpgroups.GroupParallelConv2d.from_conv(ref, ctx.process_group)
    x = torch.randn(2, 8, 5, 5)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert_close(layer(x), ref(x), 1e-5, mode.__name__)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x), ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y, y_ref, 1e-2, "autocast")
    for dtype in (torch.float16, torch.bfloat16):
        low = copy.deepcopy(ref).to(dtype)
        y = mpgroups.GroupParallelConv2d.from_conv(low, ctx.process_group)(x.to(dtype))
        assert y.dtype == dtype
        assert_close(y, low(x.to(dtype)), 1e-2, str(dtype))


def test_grad_modes_autocast_and_half_precision(pool):
    pool.run(_modes_and_precisions, 2)


def _row_and_linear_habits(ctx) -> None:
    """The row-parallel conv and ParallelLinear under what users do with nn.Conv2d/nn.Linear:
    channels_last and non-contiguous inputs, grad modes, autocast, half precision, deepcopy,
    and keyword ``input=`` as torch.nn's forward names it."""
    torch.manual_seed(0)
    conv_ref = nn.Conv2d(8, 6, 3, padding=1)
    row = mpgroups.GroupParallelConv2d.from_conv(
        conv_ref, ctx.process_group, split="rowwise", input_layout="sharded"
    )
    lin_ref = nn.Linear(8, 6)
    col = mpgroups.ParallelLinear.from_linear(lin_ref, ctx.process_group)
    lin_row = mpgroups.ParallelLinear.from_linear(
        lin_ref, ctx.process_group, split="rowwise", input_layout="sharded"
    )
    start, stop = row.input_shard
    big = torch.randn(2, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    x = big[:, :8]  # a channels_last view with gaps
    y = row(x[:, start:stop])
    assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    assert_close(y, conv_ref(x), 1e-5, "row conv, channels_last view")
    feats = torch.randn(8, 3).t()  # [3, 8], non-contiguous
    f0, f1 = lin_row.shards.inputs.own
    assert_close(lin_row(feats[:, f0:f1]), lin_ref(feats), 1e-5, "row linear, strided")
    assert_close(col(input=feats), lin_ref(feats), 1e-5, "column linear, input=")
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert_close(row(x[:, start:stop]), conv_ref(x), 1e-5, f"row {mode.__name__}")
            assert_close(col(feats), lin_ref(feats), 1e-5, f"column {mode.__name__}")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = lin_row(feats[:, f0:f1]), lin_ref(feats)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want, 2e-2, "row linear, autocast")
    half = mpgroups.ParallelLinear.from_linear(
        copy.deepcopy(lin_ref).to(torch.bfloat16), ctx.process_group, split="rowwise",
        input_layout="sharded",
    )  # fmt: skip
    got = half(feats[:, f0:f1].to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert_close(got, lin_ref.to(torch.bfloat16)(feats.to(torch.bfloat16)), 2e-2, "bf16")
    twin = copy.deepcopy(lin_row)
    assert twin.process_group is lin_row.process_group and twin.weight is not lin_row.weight
    assert torch.equal(twin(feats[:, f0:f1]), lin_row(feats[:, f0:f1]))
    with pytest.raises(TypeError, match="full_state_dict"):
        pickle.dumps(lin_row)


def test_row_parallel_and_linear_layers_under_user_habits(pool):
    pool.run(_row_and_linear_habits, 2)


class _Aliased(nn.Module):
    """Holds ``block`` under two names (as weight-tying code does), calls it once."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.alias = block

    def forward(self, x):
        return self.block(x)


def _planned_block_habits(ctx) -> None:
    """A column → grouped → row block built by the auto plan, held under two names and
    deep-copied for an EMA: one module stays one module, the copy computes the same."""
    torch.manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 8, 1, bias=False),
    )  # fmt: skip
    model = _Aliased(block)
    reference = copy.deepcopy(model)
    model = mpgroups.parallelize(model, ctx.process_group, plan="auto")
    assert model.block is model.alias
    assert model.block[6].split == "rowwise" and model.block[0].output_layout == "sharded"
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    assert_close(model(x), reference(x), 1e-5, "planned block")
    ema = torch.optim.swa_utils.AveragedModel(model)
    assert_close(ema(x), reference(x), 1e-5, "deep copy of the planned block")


def test_auto_planned_block_under_user_habits(pool):
    pool.run(_planned_block_habits, 2)
