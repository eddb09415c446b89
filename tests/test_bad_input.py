"""Bad input at P = 2: a clear error on every rank within 30 s, never a hang or wrong numbers."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist
from dist_harness import TaskError

import mpgroups
from mpgroups.conv import GroupParallelConv2d
from mpgroups.validation import InputMismatchError

GOOD = (4, 8, 6, 6)
# The layer's input shard at P = 2 for a sharded-input case: 4 of the 8 channels.
GOOD_SHARD = (4, 4, 6, 6)


def _input_layout(case: str) -> str:
    return "sharded" if case.startswith("sharded") else "replicated"


def _bad_input(case: str, rank: int) -> tuple[torch.Tensor, str]:
    """This rank's input for ``case`` and the words the error must contain."""
    if case == "sharded slice width on one rank":
        x = torch.randn(GOOD_SHARD)
        wide = torch.cat([x, x[:, :1]], dim=1)
        return (wide if rank == 0 else x), "rank 0 sent 5 input channels"
    x = torch.randn(GOOD)
    if case == "channels on one rank":
        return (x[:, :7] if rank == 1 else x), "rank 1 sent 7 input channels"
    if case == "batch on one rank":
        return (x[:3] if rank == 1 else x), "rank 1 sent [3, 8, 6, 6] float32"
    if case == "spatial on one rank":
        return (x[..., :5] if rank == 1 else x), "(dim 3 differs)"
    if case == "dtype on one rank":
        return (x.double() if rank == 1 else x), "does not match the weight's"
    if case == "float16 vs float32 weights":
        return x.half(), "float16 on cpu: a dtype that does not match the weight's float32"
    if case == "bfloat16 vs float32 weights":
        return x.bfloat16(), "bfloat16 on cpu: a dtype that does not match the weight's float32"
    if case == "3-D input on one rank":
        return (x[0] if rank == 1 else x), "rank 1 sent [8, 6, 6] float32 on cpu, rank 0 sent"
    if case == "2-D input":
        return x[:, :, 0, 0], "the wrong number of dimensions for this layer"
    raise AssertionError(case)


CASES = [
    "channels on one rank",
    "batch on one rank",
    "spatial on one rank",
    "dtype on one rank",
    "float16 vs float32 weights",
    "bfloat16 vs float32 weights",
    "3-D input on one rank",
    "2-D input",
    "sharded slice width on one rank",
]


def _expect_error(ctx, case: str, good_calls: int, checks: bool, group) -> float:
    torch.manual_seed(0)
    layout = _input_layout(case)
    layer = GroupParallelConv2d(
        8, 8, 3, padding=1, groups=4, process_group=group, checks=checks, input_layout=layout
    )
    good = GOOD_SHARD if layout == "sharded" else GOOD
    for _ in range(good_calls):
        layer(torch.randn(good)).sum().backward()
    x, words = _bad_input(case, ctx.rank)
    start = time.monotonic()
    try:
        layer(x)
    except InputMismatchError as err:
        assert checks
        assert words in str(err) or f"rank {ctx.rank}: {words}" in str(err), str(err)
    except (ValueError, RuntimeError) as err:
        assert not checks, f"with checks on, rank {ctx.rank} raised {err!r}"
    else:
        raise AssertionError(f"rank {ctx.rank}: no error for {case}")
    return time.monotonic() - start


@pytest.mark.parametrize("good_calls", [0, 3])
@pytest.mark.parametrize("case", CASES)
def test_mismatch_raises_on_every_rank(pool, case, good_calls):
    start = time.monotonic()
    elapsed = pool.run(_run_with_checks, 2, case, good_calls)
    assert time.monotonic() - start < 30
    assert max(elapsed) < 30


def _run_with_checks(ctx, case, good_calls):
    return _expect_error(ctx, case, good_calls, True, ctx.group)


def _run_without_checks(ctx, case):
    # A fresh group with a short timeout: without the exchange, a rank can wait for the other
    # until the process group's timeout, which must end it.
    group = dist.new_group(
        [0, 1], timeout=datetime.timedelta(seconds=5), use_local_synchronization=True
    )
    return _expect_error(ctx, case, 1, False, group)


@pytest.mark.parametrize("case", CASES)
def test_without_checks_mismatch_still_ends_within_the_timeout(pool, case):
    """Without the exchange a mismatch still ends, but worse: a rank waits out the group's
    timeout, or gloo aborts the process on a size mismatch ("Received data size doesn't
    match expected size"), which under torchrun ends the job."""
    start = time.monotonic()
    try:
        elapsed = pool.run(_run_without_checks, 2, case, timeout=60)
    except TaskError as err:
        assert "worker died with exit code" in str(err) or "timed out" in str(err).lower(), err
    else:
        assert max(elapsed) < 30
    assert time.monotonic() - start < 30


def _sharded_wrong_width(ctx):
    layer = GroupParallelConv2d(8, 8, 3, groups=4, process_group=ctx.group, input_layout="sharded")
    start, stop = layer.input_shard
    x = torch.randn(2, stop - start + (1 if ctx.rank == 0 else 0), 5, 5)
    with pytest.raises(InputMismatchError) as info:
        layer(x)
    message = str(info.value)
    assert "rank 0 sent 5 input channels" in message
    assert "its shard 0..4 of 8 channels, groups=4" in message
    return message


def test_sharded_input_with_the_wrong_slice_width(pool):
    messages = pool.run(_sharded_wrong_width, 2)
    assert messages[0].splitlines()[1:] == messages[1].splitlines()[1:] or all(
        "rank 0 sent 5 input channels" in m for m in messages
    )


def _nan_passes_through(ctx):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
    layer = GroupParallelConv2d.from_conv(ref, ctx.group)
    x = torch.randn(GOOD)
    x[0, 0, 2, 2] = float("nan")
    y, y_ref = layer(x), ref(x)
    assert torch.equal(y.isnan(), y_ref.isnan()) and y.isnan().any()
    assert torch.allclose(y.nan_to_num(), y_ref.nan_to_num(), atol=1e-6)


def test_nan_input_passes_through_like_nn_conv2d(pool):
    pool.run(_nan_passes_through, 2)


def _gather_mismatch(ctx):
    x = torch.randn(2 if ctx.rank == 0 else 3, 4, 5, 5)
    with pytest.raises(InputMismatchError, match=r"rank 1 sent \[3, 4, 5, 5\]"):
        mpgroups.gather_channels(x, groups=4, process_group=ctx.group)


def test_gather_channels_checks_its_inputs(pool):
    pool.run(_gather_mismatch, 2)


def _checks_switch(ctx) -> dict:
    import os

    layer = GroupParallelConv2d(8, 8, 3, groups=4, process_group=ctx.group)
    counts = {}
    for value in ("1", "0"):
        os.environ["MPGROUPS_CHECKS"] = value
        with mpgroups.CommCounter() as comm:
            layer(torch.randn(GOOD))
        counts[value] = comm.count(kind="meta")
    del os.environ["MPGROUPS_CHECKS"]
    explicit = GroupParallelConv2d(8, 8, 3, groups=4, process_group=ctx.group, checks=False)
    with mpgroups.CommCounter() as comm:
        explicit(torch.randn(GOOD))
    counts["argument"] = comm.count(kind="meta")
    return counts


def test_checks_can_be_switched_off(pool):
    assert pool.run(_checks_switch, 2) == [{"1": 1, "0": 0, "argument": 0}] * 2


def _mismatch_through_a_local_layer(ctx):
    """A layer that computes alone checks locally; the next collective catches the rest."""
    local = GroupParallelConv2d(
        8, 8, 3, padding=1, groups=4, process_group=ctx.group,
        input_layout="sharded", output_layout="sharded",
    )  # fmt: skip
    gather = GroupParallelConv2d(8, 8, 1, groups=4, process_group=ctx.group, input_layout="sharded")
    start, stop = local.input_shard
    x = torch.randn(3 if ctx.rank == 1 else 4, stop - start, 5, 5)  # batch differs on rank 1
    with mpgroups.CommCounter() as comm:
        y = local(x)
    assert comm.count(kind=None) == 0, "no exchange where no collective follows"
    with pytest.raises(InputMismatchError, match=r"rank 1 sent \[3, 4, 5, 5\]"):
        gather(y)


def test_layer_without_collectives_defers_to_the_next_check(pool):
    pool.run(_mismatch_through_a_local_layer, 2)


def _grad_mode_on_one_rank(ctx, output_layout: str) -> str:
    """A backward recorded on rank 0 only would leave its input-grad gather waiting forever."""
    layer = GroupParallelConv2d(
        8, 8, 3, padding=1, groups=4, process_group=ctx.group, output_layout=output_layout
    )
    x = torch.randn(GOOD, requires_grad=True)
    start = time.monotonic()
    with torch.set_grad_enabled(ctx.rank == 0), pytest.raises(InputMismatchError) as info:
        layer(x)
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "ranks [0] record a backward through the input and ranks [1] do not" in message
    # Without grad on every rank there is nothing to disagree on: inference runs.
    with torch.no_grad():
        layer(x)
    return message


@pytest.mark.parametrize("output_layout", ["sharded", "replicated"])
def test_grad_mode_on_one_rank_only_raises_on_every_rank(pool, output_layout):
    messages = pool.run(_grad_mode_on_one_rank, 2, output_layout)
    assert messages[0] == messages[1]
