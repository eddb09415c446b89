"""``torch.compile`` of planned models at P = 2: with checks off the whole model is one graph
(``fullgraph=True``) and equals eager, forward and backward; with checks on it is one graph
too, broken once by the root's check (outside the graph), and a mismatch still raises on
every rank."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import tv_models
from models import TinyResNeXt
from parity import assert_close
from torch import nn

import mpgroups

ALEXNET_SMALL = dict(num_classes=10, channels=(16, 32, 48, 48, 32), hidden=64, dropout=0.0)


def _model(kind: str, process_group) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "drop-in":
        model = mpgroups.parallelize(TinyResNeXt(), process_group)
        x = torch.randn(2, 3, 16, 16)
    elif kind == "towers":
        model = mpgroups.models.AlexNet(
            process_group=process_group, split_classifier=False, **ALEXNET_SMALL
        )
        x = torch.randn(2, 3, 32, 32)
    elif kind == "alexnet":
        model = mpgroups.models.AlexNet(process_group=process_group, **ALEXNET_SMALL)
        x = torch.randn(2, 3, 32, 32)
    elif kind == "auto":  # the auto plan: column → grouped → row in every bottleneck
        model = mpgroups.parallelize(tv_models.small_resnext(), process_group, plan="auto")
        x = torch.randn(2, 3, 32, 32)
    else:  # "auto-tiny": the same plan on two bottlenecks without downsample
        model = TinyResNeXt(channels=16, width=32)
        model = mpgroups.parallelize(model, process_group, plan="auto")
        x = torch.randn(2, 3, 32, 32)
    return model, x


def _step(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    torch.manual_seed(1)
    y.backward(torch.randn_like(y))
    # A compiled module names its parameters "_orig_mod.<name>".
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return y.detach(), x.grad, grads


def _compiled_equals_eager(ctx, kind: str, backend: str) -> None:
    os.environ["MPGROUPS_CHECKS"] = "0"
    try:
        model, x = _model(kind, ctx.process_group)
        compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend=backend)
        want = _step(model, x)
        got = _step(compiled, x)
        assert_close(got[0], want[0], 1e-5, f"{kind} output")
        assert_close(got[1], want[1], 1e-5, f"{kind} input grad")
        for name, grad in want[2].items():
            assert_close(got[2][name], grad, 1e-5, f"{kind} {name} grad")
    finally:
        del os.environ["MPGROUPS_CHECKS"]


# AOTAutograd without code generation: it captures the same whole graph (fullgraph) and its
# backward as inductor does, in a fraction of the time; inductor's code generation for that
# graph is torch's own, and runs on a GPU in tests/test_cuda.py.
@pytest.mark.parametrize(
    "kind, backend",
    [
        ("alexnet", "aot_eager"),
        ("towers", "aot_eager"),
        ("drop-in", "aot_eager"),
        ("auto", "aot_eager"),
    ],
)
def test_fullgraph_compile_with_checks_off_equals_eager(pool, kind, backend):
    pool.run(_compiled_equals_eager, 2, kind, backend, timeout=240)


def _compiled_with_checks(ctx, kind: str) -> str:
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    model, x = _model(kind, ctx.process_group)
    compiled = torch.compile(copy.deepcopy(model), backend=counting_backend)
    counters.clear()
    for step in range(3):
        with mpgroups.CommCounter() as comm:
            got = _step(compiled, x)
        # The root's check every step, outside the graph; the layers' in their first call.
        assert comm.count("input_check", kind="check") == 1, (step, comm.count("input_check"))
    # One graph for the model, broken once where the root's check leaves it; no recompiles.
    assert len(graphs) == 1, [g.graph for g in graphs]
    assert len(counters["graph_break"]) == 1, dict(counters["graph_break"])
    assert "_check_now" in next(iter(counters["graph_break"]))
    assert not counters["recompiles"], dict(counters["recompiles"])
    want = _step(model, x)
    assert_close(got[0], want[0], 1e-5, "output with checks")
    bad = x[:1] if ctx.rank == 1 else x  # one rank's batch differs
    with pytest.raises(mpgroups.InputMismatchError) as caught:
        compiled(bad)
    return str(caught.value)


# (the whole small ResNeXt compiles in the fullgraph test above: its graph count here is the
# two bottlenecks')
@pytest.mark.parametrize("kind", ["alexnet", "auto-tiny"])
def test_compile_with_checks_on_is_one_graph_and_a_mismatch_raises_on_every_rank(pool, kind):
    messages = pool.run(_compiled_with_checks, 2, kind, timeout=240)
    assert messages[0] == messages[1]
    assert "rank 1 sent [1, 3, 32, 32]" in messages[0]
