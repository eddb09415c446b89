"""Bad input at P = 2: with checks on, the same clear error on every rank before any
collective (never a hang, never wrong numbers); with checks off, each kind of mismatch ends the
way the README says."""

from __future__ import annotations

import datetime
import time
from functools import partial

import pytest
import torch
import torch.distributed as dist
from dist_harness import TaskError

import mpgroups
from mpgroups.comm.checks import InputMismatchError
from mpgroups.layers.conv import GroupParallelConv2d

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
    if case == "batch and width on one rank, same element count":
        other = torch.randn(2, 8, 6, 12)
        return (other if rank == 1 else x), "rank 1 sent [2, 8, 6, 12] float32 on cpu"
    if case == "dtype on one rank":
        return (x.double() if rank == 1 else x), "does not match the weight's"
    if case == "float16 vs float32 weights":
        return x.half(), "float16 on cpu: a dtype that does not match the weight's float32"
    if case == "bfloat16 vs float32 weights":
        return x.bfloat16(), "bfloat16 on cpu: a dtype that does not match the weight's float32"
    if case == "3-D input on one rank":
        return (x[0] if rank == 1 else x), "rank 1 sent [8, 6, 6] float32 on cpu, rank 0 sent"
    if case == "2-D input":
        return x[:, :, 0, 0], "the wrong number of dimensions for GroupParallelConv2d"
    raise AssertionError(case)


# What each case does without the exchange (MPGROUPS_CHECKS=0), as seen on torch 2.13 + gloo.
EVERY_RANK_REFUSES_LOCALLY = [
    "float16 vs float32 weights",
    "bfloat16 vs float32 weights",
    "2-D input",
]
ONE_RANK_REFUSES_THE_OTHER_TIMES_OUT = {
    "channels on one rank": 1,
    "dtype on one rank": 1,
    "sharded slice width on one rank": 0,
}
GLOO_ABORTS = ["batch on one rank", "spatial on one rank", "3-D input on one rank"]
WRONG_NUMBERS = ["batch and width on one rank, same element count"]
CASES = [
    *EVERY_RANK_REFUSES_LOCALLY,
    *ONE_RANK_REFUSES_THE_OTHER_TIMES_OUT,
    *GLOO_ABORTS,
    *WRONG_NUMBERS,
]


def _layer(case: str, checks: bool, group, good_calls: int) -> GroupParallelConv2d:
    torch.manual_seed(0)
    layout = _input_layout(case)
    layer = GroupParallelConv2d(
        8, 8, 3, padding=1, groups=4, process_group=group, checks=checks, input_layout=layout
    )
    good = GOOD_SHARD if layout == "sharded" else GOOD
    for _ in range(good_calls):
        layer(torch.randn(good)).sum().backward()
    return layer


def _run_with_checks(ctx, case: str, good_calls: int) -> str:
    layer = _layer(case, True, ctx.process_group, good_calls)
    x, words = _bad_input(case, ctx.rank)
    with pytest.raises(InputMismatchError) as info:
        layer(x)
    assert words in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("good_calls", [0, 3])
@pytest.mark.parametrize("case", CASES)
def test_mismatch_raises_the_same_error_on_every_rank(pool, case, good_calls):
    """An InputMismatchError (not a timeout's RuntimeError): raised before any collective."""
    messages = pool.run(_run_with_checks, 2, case, good_calls)
    assert messages[0] == messages[1]


# Without the exchange a rank can wait for the other until the group's timeout: a short one.
SHORT_TIMEOUT_S = 2.0


def _short_timeout_group():
    # Made by ranks 0 and 1 only: the unchecked tests run in the scratch pool.
    return dist.new_group(
        [0, 1], timeout=datetime.timedelta(seconds=SHORT_TIMEOUT_S), use_local_synchronization=True
    )


def _unchecked_outcome(ctx, case: str) -> tuple[str, str, float]:
    """What this rank's call does without the exchange: the error type (or ``"returned"``),
    its message and the seconds it took."""
    layer = _layer(case, False, _short_timeout_group(), 1)
    x, _ = _bad_input(case, ctx.rank)
    start = time.monotonic()
    try:
        layer(x)
    except (ValueError, RuntimeError) as err:
        assert not isinstance(err, InputMismatchError)
        return type(err).__name__, str(err), time.monotonic() - start
    return "returned", "", time.monotonic() - start


@pytest.mark.parametrize("case", EVERY_RANK_REFUSES_LOCALLY)
def test_without_checks_a_problem_on_every_rank_raises_locally(scratch_pool, case):
    outcomes = scratch_pool.run(_unchecked_outcome, 2, case)
    assert [kind for kind, _, _ in outcomes] == ["ValueError", "ValueError"]


@pytest.mark.parametrize("case", ONE_RANK_REFUSES_THE_OTHER_TIMES_OUT)
def test_without_checks_the_other_rank_waits_out_the_timeout(scratch_pool, case):
    """The rank with the bad input raises at once; the other waits in the collective until
    the group's timeout (``SHORT_TIMEOUT_S`` here) ends it."""
    outcomes = scratch_pool.run(_unchecked_outcome, 2, case)
    bad = ONE_RANK_REFUSES_THE_OTHER_TIMES_OUT[case]
    (bad_kind, _, bad_seconds), (other_kind, other_message, other_seconds) = (
        outcomes[bad],
        outcomes[1 - bad],
    )
    assert (bad_kind, other_kind) == ("ValueError", "RuntimeError")
    assert "Timed out" in other_message, other_message
    assert other_seconds >= 0.9 * SHORT_TIMEOUT_S > bad_seconds


def _unchecked_numbers(ctx, case: str) -> bool:
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
    layer = GroupParallelConv2d.from_conv(ref, _short_timeout_group(), checks=False)
    x, _ = _bad_input(case, ctx.rank)
    return torch.allclose(layer(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("case", WRONG_NUMBERS)
def test_without_checks_equal_element_counts_give_wrong_numbers(scratch_pool, case):
    """The sizes on the wire agree, so the gather completes and assembles the other rank's
    output as if it had this rank's shape: both ranks return without an error, and wrong."""
    assert scratch_pool.run(_unchecked_numbers, 2, case) == [False, False]


@pytest.mark.parametrize("case", GLOO_ABORTS)
def test_without_checks_gloo_aborts_a_rank_on_a_size_mismatch(scratch_pool, case):
    """gloo ends the process ("Received data size doesn't match expected size"); under
    torchrun that ends the job. In the scratch pool, which starts anew before its next task;
    last of the scratch pool's tests here, so that only the next file's pays for a restart."""
    with pytest.raises(TaskError, match="worker died with exit code"):
        scratch_pool.run(_unchecked_outcome, 2, case, timeout=60, grace=0.5)


def _sharded_wrong_width(ctx):
    layer = GroupParallelConv2d(
        8, 8, 3, groups=4, process_group=ctx.process_group, input_layout="sharded"
    )
    start, stop = layer.input_shard
    x = torch.randn(2, stop - start + (1 if ctx.rank == 0 else 0), 5, 5)
    with pytest.raises(InputMismatchError, match="its shard 0..4 of 8 channels, groups=4"):
        layer(x)


def test_sharded_input_message_names_the_expected_shard(pool):
    pool.run(_sharded_wrong_width, 2)


def _unbatched_on_one_rank(ctx) -> str:
    layer = GroupParallelConv2d(8, 8, 3, padding=1, groups=4, process_group=ctx.process_group)
    x = torch.randn(8, 6, 6) if ctx.rank == 1 else torch.randn(4, 8, 6, 6)
    with pytest.raises(InputMismatchError) as info:
        layer(x)
    return str(info.value)


def test_unbatched_input_on_one_rank_is_reported_alike_on_every_rank(pool):
    """Both inputs have the 8 channels the layer expects (the channel dim is counted from the
    end, as nn.Conv2d does); what differs is the batch dimension."""
    messages = pool.run(_unbatched_on_one_rank, 2)
    assert messages[0] == messages[1]
    assert "input channels" not in messages[0]
    assert "rank 1 sent [8, 6, 6] float32 on cpu, rank 0 sent [4, 8, 6, 6]" in messages[0]
    assert "(dims)" in messages[0]


def _collective_helpers_out_of_step(ctx, what: str) -> None:
    """Ranks that call a collective helper with different arguments raise together."""
    torch.manual_seed(0)
    if what == "scatter_channels":
        x = torch.randn(2, 8, 4, 4) if ctx.rank == 0 else None
        groups = 4 if ctx.rank == 0 else 2  # rank 1 expects another layout
        call = partial(
            mpgroups.scatter_channels, x, 0, groups=groups, process_group=ctx.process_group
        )
    elif what == "to_conv":
        cout = 8 if ctx.rank == 0 else 12  # rank 1 gathers another layer
        layer = GroupParallelConv2d(8, cout, 3, groups=4, process_group=ctx.process_group)
        call = layer.to_conv
    else:
        channels = 8 if ctx.rank == 0 else 16  # a different model on rank 1
        conv = torch.nn.Conv2d(8, channels, 1, groups=4)
        if what == "parallelize":  # its broadcast of rank 0's state
            call = partial(mpgroups.parallelize, conv, ctx.process_group)
        else:
            model = mpgroups.parallelize(conv, ctx.process_group, sync_module_states=False)
            call = partial(mpgroups.full_state_dict, model)
    with pytest.raises(InputMismatchError, match="ranks out of step, or another layer or model"):
        call()


@pytest.mark.parametrize("what", ["scatter_channels", "to_conv", "parallelize", "full_state_dict"])
def test_collective_helpers_check_before_they_communicate(pool, what):
    pool.run(_collective_helpers_out_of_step, 2, what)


def _gather_without_channels(ctx) -> str:
    x = torch.randn(5) if ctx.rank == 1 else torch.randn(2, 4, 3, 3)
    with pytest.raises(InputMismatchError) as info:
        mpgroups.gather_channels(x, groups=4, process_group=ctx.process_group)
    return str(info.value)


def test_gather_channels_names_a_rank_without_channels(pool):
    messages = pool.run(_gather_without_channels, 2)
    assert messages[0] == messages[1]
    assert "rank 1 sent [5] float32 on cpu: the wrong number of dimensions" in messages[0]


def _scatter_under_no_grad_on_one_rank(ctx) -> str:
    x = torch.randn(2, 8, 4, 4, requires_grad=True) if ctx.rank == 0 else None
    with torch.set_grad_enabled(ctx.rank == 0), pytest.raises(InputMismatchError) as info:
        mpgroups.scatter_channels(x, 0, groups=4, process_group=ctx.process_group)
    return str(info.value)


def test_scatter_with_a_backward_on_the_source_only_raises_on_every_rank(pool):
    messages = pool.run(_scatter_under_no_grad_on_one_rank, 2)
    assert messages[0] == messages[1] and "torch.no_grad()" in messages[0]


def _nan_passes_through(ctx):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
    layer = GroupParallelConv2d.from_conv(ref, ctx.process_group)
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
        mpgroups.gather_channels(x, groups=4, process_group=ctx.process_group)


def test_gather_channels_checks_its_inputs(pool):
    pool.run(_gather_mismatch, 2)


def _checks_switch(ctx) -> dict:
    import os

    layer = GroupParallelConv2d(8, 8, 3, groups=4, process_group=ctx.process_group)
    counts = {}
    try:
        for value in ("1", "0"):
            os.environ["MPGROUPS_CHECKS"] = value
            with mpgroups.CommCounter() as comm:
                layer(torch.randn(GOOD))
            counts[value] = comm.count(kind="meta")
    finally:
        os.environ.pop("MPGROUPS_CHECKS", None)
    explicit = GroupParallelConv2d(8, 8, 3, groups=4, process_group=ctx.process_group, checks=False)
    with mpgroups.CommCounter() as comm:
        explicit(torch.randn(GOOD))
    counts["argument"] = comm.count(kind="meta")
    return counts


def test_checks_can_be_switched_off(pool):
    assert pool.run(_checks_switch, 2) == [{"1": 1, "0": 0, "argument": 0}] * 2


def _mismatch_through_a_local_layer(ctx):
    """A layer that computes alone checks locally; the next collective catches the rest."""
    local = GroupParallelConv2d(
        8, 8, 3, padding=1, groups=4, process_group=ctx.process_group,
        input_layout="sharded", output_layout="sharded",
    )  # fmt: skip
    gather = GroupParallelConv2d(
        8, 8, 1, groups=4, process_group=ctx.process_group, input_layout="sharded"
    )
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
        8, 8, 3, padding=1, groups=4, process_group=ctx.process_group, output_layout=output_layout
    )
    x = torch.randn(GOOD, requires_grad=True)
    with torch.set_grad_enabled(ctx.rank == 0), pytest.raises(InputMismatchError) as info:
        layer(x)
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


def _row_parallel_mismatch(ctx, kind: str) -> str:
    """A row-parallel layer whose ranks disagree (one rank's shard too wide, or one rank's
    batch differs): one InputMismatchError on every rank, before the all-reduce."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = mpgroups.ParallelLinear(
            8, 6, process_group=ctx.process_group, split="rowwise", input_layout="sharded"
        )
        x = torch.randn(3, 5 if ctx.rank == 0 else 4)
    else:
        layer = GroupParallelConv2d(
            8, 6, 3, process_group=ctx.process_group, split="rowwise", input_layout="sharded"
        )
        x = torch.randn(3 if ctx.rank == 1 else 2, 4, 5, 5)
    with pytest.raises(InputMismatchError) as caught:
        layer(x)
    return str(caught.value)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_row_parallel_mismatch_raises_on_every_rank(pool, kind):
    messages = pool.run(_row_parallel_mismatch, 2, kind)
    assert messages[0] == messages[1]
    assert ("rank 0 sent 5 input channels" if kind == "linear" else "rank 1 sent [3, 4, 5, 5]") in (
        messages[0]
    )
