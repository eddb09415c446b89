"""A column-parallel layer's backward starts its input-grad all-reduce before it computes its
weight grads, and gives the same numbers as the composed path (``MPGROUPS_OVERLAP=0``) and
as one device (double backward: ``tests/test_row_parallel.py``'s gradgradcheck of the
column-parallel conv and linear)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import tv_models
from parity import assert_close

import mpgroups


def _train_step(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    torch.manual_seed(1)
    y.backward(torch.randn_like(y))
    grads = mpgroups.full_grad_dict(model)
    model.zero_grad()
    return y.detach(), x.grad, grads


def _overlap_equals_composed_and_one_device(ctx, memory: str) -> None:
    torch.manual_seed(0)
    # float64: the BatchNorm-heavy model's input grad is ill-conditioned in float32 (rounding
    # order alone moves it by 1e-3 relative).
    reference = tv_models.small_resnext().double()
    model = mpgroups.parallelize(copy.deepcopy(reference), ctx.process_group, plan="auto")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    if memory == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    runs = {}
    for value in ("1", "0"):
        os.environ["MPGROUPS_OVERLAP"] = value
        try:
            runs[value] = _train_step(model, x)
        finally:
            del os.environ["MPGROUPS_OVERLAP"]
    want = _train_step(reference, x)
    for what, i in (("output", 0), ("input grad", 1)):
        assert_close(runs["1"][i], runs["0"][i], 1e-10, f"{what}: overlapped vs composed")
        assert_close(runs["1"][i], want[i], 1e-10, f"{what}: overlapped vs one device")
    for name, grad in want[2].items():
        assert_close(runs["1"][2][name], runs["0"][2][name], 1e-10, f"{name} grad: composed")
        assert_close(runs["1"][2][name], grad, 1e-10, f"{name} grad: one device")


@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_overlapped_backward_equals_the_composed_one_and_one_device(pool, memory):
    pool.run(_overlap_equals_composed_and_one_device, 2, memory)


def _paths(ctx) -> dict[str, str]:
    """The autograd node of a column-parallel conv's and linear's output in each case."""
    torch.manual_seed(0)
    # Sharded outputs: the output is the local op's own (no gather after it).
    options = dict(process_group=ctx.process_group, output_layout="sharded")
    conv = mpgroups.GroupParallelConv2d(8, 6, 3, padding=1, **options)
    linear = mpgroups.ParallelLinear(8, 6, **options)
    reflect = mpgroups.GroupParallelConv2d(8, 6, 3, padding=1, padding_mode="reflect", **options)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    rows = torch.randn(3, 8, requires_grad=True)

    def node(layer, inp) -> str:
        y = layer(inp)
        return type(y.grad_fn).__name__ if y.grad_fn is not None else "none"

    paths = {"conv": node(conv, x), "linear": node(linear, rows)}
    paths["conv, input without grad"] = node(conv, x.detach())
    paths["conv, reflect padding"] = node(reflect, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        paths["conv, autocast"] = node(conv, x)
    os.environ["MPGROUPS_OVERLAP"] = "0"
    try:
        paths["conv, MPGROUPS_OVERLAP=0"] = node(conv, x)
    finally:
        del os.environ["MPGROUPS_OVERLAP"]
    return paths


def test_the_overlapped_path_is_taken_where_it_applies(pool):
    paths = pool.run(_paths, 2)[0]
    assert paths.pop("conv") == paths.pop("linear") == "_ColumnParallelBackward", paths
    assert "_ColumnParallelBackward" not in paths.values(), paths


def _backward_order(ctx) -> list[str]:
    torch.manual_seed(0)
    conv = mpgroups.GroupParallelConv2d(8, 6, 3, padding=1, process_group=ctx.process_group)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    y = conv(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y.sum().backward()
    wanted = ("aten::convolution_backward", "c10d::allreduce_")
    events = sorted(
        (e for e in prof.events() if e.name in wanted), key=lambda e: e.time_range.start
    )
    return [e.name for e in events]


def test_the_input_grad_all_reduce_starts_before_the_weight_grads(pool):
    """Input grad, then its all-reduce started, then the weight grads (while it runs)."""
    order = pool.run(_backward_order, 2)[0]
    assert order == [
        "aten::convolution_backward",
        "c10d::allreduce_",
        "aten::convolution_backward",
    ], order
