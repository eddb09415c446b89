"""Row-parallel convs (``split="rowwise"``) and ``ParallelLinear`` against ``nn.Conv2d`` /
``nn.Linear``: forward, input grad, weight and bias grads, the collectives issued, and
gradgradcheck (docs/design.md §3b)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from parity import assert_close
from torch import nn
from torch.func import functional_call

import mpgroups
from mpgroups.comm.collectives import all_gather_channels, slice_channels

CONV_CASES = [(8, 6, 1), (7, 5, 1), (8, 8, 4)]  # dense (even and uneven), whole groups per rank
LINEAR_LAYOUTS = [
    ("colwise", "replicated", "replicated"),
    ("colwise", "replicated", "sharded"),
    ("colwise", "sharded", "sharded"),
    ("colwise", "sharded", "replicated"),
    ("rowwise", "sharded", "replicated"),
    ("rowwise", "sharded", "sharded"),
]


def _conv_pair(cin, cout, groups, output_layout, process_group, dtype=torch.float32):
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, dtype=dtype)
    layer = mpgroups.GroupParallelConv2d.from_conv(
        ref, process_group, split="rowwise", input_layout="sharded", output_layout=output_layout
    )
    return ref, layer, torch.randn(3, cin, 6, 5, dtype=dtype), 1


def _linear_pair(split, input_layout, output_layout, process_group, dtype=torch.float32):
    torch.manual_seed(0)
    ref = nn.Linear(9, 6, dtype=dtype)
    layer = mpgroups.ParallelLinear.from_linear(
        ref,
        process_group,
        split=split,
        input_layout=input_layout,
        output_layout=output_layout,
    )
    return ref, layer, torch.randn(2, 3, 9, dtype=dtype), 2


def _keep(layer, layout: str, side: str, dim: int):
    shards = layer.shards.inputs if side == "in" else layer.shards.outputs
    index = [slice(None)] * (dim + 1)
    if layout == "sharded":
        index[dim] = slice(*shards.own)
    return tuple(index)


def _check_parity(ref, layer, x, dim: int, rank: int) -> Counter:
    """Compare every result with ``ref``'s on the full tensors; return the data collectives."""
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    torch.manual_seed(1)
    grad_y = torch.randn_like(y_ref)
    y_ref.backward(grad_y)
    in_keep = _keep(layer, layer.input_layout, "in", dim)
    out_keep = _keep(layer, layer.output_layout, "out", dim)
    x_in = x[in_keep].clone().requires_grad_()
    with mpgroups.CommCounter() as comm:
        y = layer(x_in)
        y.backward(grad_y[out_keep])
    what = f"rank {rank} {layer.extra_repr()}"
    assert_close(y, y_ref[out_keep], 1e-5, f"{what} output")
    assert_close(x_in.grad, x_ref.grad[in_keep], 1e-5, f"{what} input grad")
    for name, (shards, split_dim) in layer._mpgroups_tensor_shards.items():
        start, stop = shards.own
        want = getattr(ref, name).grad.narrow(split_dim, start, stop - start)
        assert_close(getattr(layer, name).grad, want, 1e-5, f"{what} {name} grad")
    return Counter((r.op, r.nbytes) for r in comm.records if r.kind == "data")


def _row_conv(ctx, cin, cout, groups, output_layout) -> int:
    ref, layer, x, dim = _conv_pair(cin, cout, groups, output_layout, ctx.process_group)
    got = _check_parity(ref, layer, x, dim, ctx.rank)
    y_bytes = 3 * cout * 6 * 5 * 4
    widths = layer.shards.outputs.widths
    if groups >= ctx.world_size:  # whole groups per rank: split="rowwise" is split="colwise"
        assert layer.shards.split == "colwise"
        want = Counter({("all_gather", y_bytes // cout * max(widths) * ctx.world_size): 1})
        if output_layout == "sharded":
            want = Counter()
    elif output_layout == "replicated":
        want = Counter({("all_reduce", y_bytes): 1})  # forward only: input grads stay local
    else:
        padded = y_bytes // cout * max(widths) * ctx.world_size
        want = Counter({("reduce_scatter", padded): 1, ("all_gather", padded): 1})
    assert got == want, f"rank {ctx.rank}: collectives {dict(got)}, expected {dict(want)}"
    return layer.weight.shape[1]


@pytest.mark.parametrize("output_layout", ["replicated", "sharded"])
@pytest.mark.parametrize("cin, cout, groups", CONV_CASES, ids=["G=1", "G=1-uneven", "G>=P"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_row_parallel_conv_equals_nn_conv2d(pool, world_size, cin, cout, groups, output_layout):
    columns = pool.run(_row_conv, world_size, cin, cout, groups, output_layout)
    if groups == 1:  # each rank holds its columns of the weight, together all of them
        assert sum(columns) == cin and min(columns) >= 1


def test_row_parallel_conv_on_one_device_is_nn_conv2d():
    ref, layer, x, dim = _conv_pair(8, 6, 1, "replicated", None)
    _check_parity(ref, layer, x, dim, 0)
    assert torch.equal(layer(x), ref(x))


def _linear(ctx, split, input_layout, output_layout) -> None:
    ref, layer, x, dim = _linear_pair(split, input_layout, output_layout, ctx.process_group)
    got = _check_parity(ref, layer, x, dim, ctx.rank)
    ops = Counter()
    for (op, _), count in got.items():
        ops[op] += count
    want = Counter()
    if split == "rowwise":
        want["all_reduce" if output_layout == "replicated" else "reduce_scatter"] += 1
        if output_layout == "sharded":
            want["all_gather"] += 1
    else:
        if input_layout == "replicated":
            want["all_reduce"] += 1  # backward: the ranks' input grads summed
        else:
            want["all_gather"] += 1
            want["reduce_scatter"] += 1
        if output_layout == "replicated":
            want["all_gather"] += 1
    assert ops == want, f"rank {ctx.rank} {split} {input_layout}->{output_layout}: {dict(ops)}"


@pytest.mark.parametrize("split, input_layout, output_layout", LINEAR_LAYOUTS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_linear_equals_nn_linear(pool, world_size, split, input_layout, output_layout):
    pool.run(_linear, world_size, split, input_layout, output_layout)


@pytest.mark.parametrize("split, input_layout, output_layout", LINEAR_LAYOUTS)
def test_parallel_linear_on_one_device_is_nn_linear(split, input_layout, output_layout):
    ref, layer, x, dim = _linear_pair(split, input_layout, output_layout, None)
    _check_parity(ref, layer, x, dim, 0)
    assert torch.equal(layer(x), ref(x))
    assert list(dict(layer.named_parameters())) == ["weight", "bias"]


def _as_full_function(layer, dim: int):
    """``f(x, weight, bias)`` on the full tensors, replicated on every rank: each rank takes
    its parts of the weight, bias and (sharded) input, and a sharded output is gathered."""
    parts = layer._mpgroups_tensor_shards
    in_shards, out_shards = layer.shards.inputs, layer.shards.outputs

    def f(x, weight, bias):
        x_in = slice_channels(x, in_shards, dim) if layer.input_layout == "sharded" else x
        local = {
            "weight": slice_channels(weight, parts["weight"][0], parts["weight"][1]),
            "bias": slice_channels(bias, out_shards, 0),
        }
        y = functional_call(layer, local, (x_in,))
        return all_gather_channels(y, out_shards, dim) if layer.output_layout == "sharded" else y

    return f


def _gradgradcheck(ctx, kind: str, config: tuple) -> bool:
    if kind == "conv":
        ref, layer, x, dim = _conv_pair(*config, ctx.process_group, dtype=torch.float64)
        x = x[:1, :, :3, :3]
    else:
        ref, layer, x, dim = _linear_pair(*config, ctx.process_group, dtype=torch.float64)
        x = x[:1, :2]
    f = _as_full_function(layer, dim)
    x = x.clone().requires_grad_()
    weight = ref.weight.detach().clone().requires_grad_()
    bias = ref.bias.detach().clone().requires_grad_()
    assert_close(f(x, weight, bias), ref(x), 1e-12, "forward")
    inputs = (x, weight, bias)
    # Entry by entry for the first case; along random directions (fast mode: a wrong entry
    # shows in all of them) for the others, where each entry costs a step with collectives.
    fast = (kind, config) != GRADGRAD_CASES[0]
    return torch.autograd.gradcheck(f, inputs, fast_mode=fast) and torch.autograd.gradgradcheck(
        f, inputs, fast_mode=fast
    )


# Few channels: gradcheck perturbs every element of x, weight and bias one by one.
GRADGRAD_CASES = [("conv", (4, 3, 1, layout)) for layout in ("replicated", "sharded")]
GRADGRAD_CASES += [("conv", (4, 4, 2, "replicated"))]
GRADGRAD_CASES += [("linear", layouts) for layouts in LINEAR_LAYOUTS]


@pytest.mark.parametrize("kind, config", GRADGRAD_CASES, ids=lambda v: str(v))
def test_gradgradcheck_row_and_column_parallel(pool, kind, config):
    assert pool.run(_gradgradcheck, 2, kind, config) == [True, True]


def _same_seed(ctx) -> None:
    torch.manual_seed(7)
    ref = nn.Linear(9, 6)
    for split, layout in (("colwise", "replicated"), ("rowwise", "sharded")):
        torch.manual_seed(7)
        layer = mpgroups.ParallelLinear(
            9, 6, process_group=ctx.process_group, split=split, input_layout=layout
        )
        for name, (shards, dim) in layer._mpgroups_tensor_shards.items():
            start, stop = shards.own
            want = getattr(ref, name).detach().narrow(dim, start, stop - start)
            assert torch.equal(getattr(layer, name).detach(), want), (split, name)
        full = layer.to_linear()
        assert torch.equal(full.weight, ref.weight) and torch.equal(full.bias, ref.bias)


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_linear_initialises_as_nn_linear(pool, world_size):
    pool.run(_same_seed, world_size)


def test_split_in_errors_say_what_works():
    with pytest.raises(ValueError, match="needs input_layout='sharded'"):
        mpgroups.ParallelLinear(4, 4, split="rowwise")
    with pytest.raises(ValueError, match="split must be one of"):
        mpgroups.GroupParallelConv2d(4, 4, 1, split="rows")
    with pytest.raises(ValueError, match="shard_groups=2 applies to a groups=1 layer"):
        mpgroups.GroupParallelConv2d(4, 4, 1, groups=4, shard_groups=2, output_layout="sharded")


def test_split_in_with_fewer_groups_than_ranks_is_refused_clearly():
    from mpgroups.sharding.layout import check_split

    with pytest.raises(ValueError, match=r"1 < groups=2 < world size 4 is not supported"):
        check_split("rowwise", 2, 4, "sharded")
    for groups, world_size in ((1, 4), (4, 4), (8, 4), (2, 2)):
        check_split("rowwise", groups, world_size, "sharded")  # accepted
