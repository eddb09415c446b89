"""A parallelized model checks its input once per forward, at its root, and its layers carry
the model's step: a bad batch on one rank raises on every rank before any rank can fail alone,
and ranks out of step never pair one rank's batch with another's."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import tv_models
from parity import assert_close
from torch import nn

import mpgroups
from mpgroups.comm.checks import InputMismatchError


def _batches(count: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(2, 3, 32, 32) for _ in range(count)]


def _loop(model, reference, batches, feed=lambda step, x: x) -> list[str]:
    """A loop that catches what a step raises and goes on: per step ``"ok"`` (the output
    checked against ``reference`` on the batch itself), ``"mismatch"`` or its own error."""
    outcomes = []
    with torch.no_grad():
        for step, x in enumerate(batches):
            try:
                y = model(feed(step, x))
            except InputMismatchError as err:
                outcomes.append(f"mismatch: {err}")
                continue
            except RuntimeError as err:
                outcomes.append("\n".join([str(err), *getattr(err, "__notes__", [])]))
                continue
            assert_close(y, reference(x), 1e-5, f"step {step}")
            outcomes.append("ok")
    return outcomes


def _float64_on_one_rank(ctx) -> list[str]:
    """The auto-planned ResNeXt's stem conv is replicated: without the root check a float64
    batch on rank 1 raised there alone (torch's dtype error) while rank 0 went on into the
    first checked layer, and the loop below then paired rank 0's batch k with rank 1's batch
    k + 1, silently."""
    torch.manual_seed(0)
    reference = tv_models.small_resnext().eval()
    model = mpgroups.parallelize(copy.deepcopy(reference), ctx.process_group, plan="auto")

    def feed(step, x):
        return x.double() if (step == 1 and ctx.rank == 1) else x

    return _loop(model, reference, _batches(4), feed)


def test_a_bad_batch_on_one_rank_raises_on_every_rank_and_the_loop_goes_on(pool):
    """Rank 0 raises the root check's mismatch before its first collective; rank 1 raises
    torch's own dtype error in the stem conv, which it reaches before the check (in flight
    while the model runs) has settled, with the mismatch added as a note. Both stay in step."""
    outcomes = pool.run(_float64_on_one_rank, 2)
    for rank in (0, 1):
        assert [o == "ok" for o in outcomes[rank]] == [True, False, True, True], outcomes
    message = outcomes[0][1]
    assert message.startswith("mismatch: "), message
    assert "ResNet (the parallelized model's input)" in message, message
    assert "rank 1 sent [2, 3, 32, 32] float64 on cpu" in message and "(dtype)" in message
    own_error, note = outcomes[1][1].split("\n", 1)
    assert "Double" in own_error and "Float" in own_error, own_error
    assert note == "mpgroups: " + message.removeprefix("mismatch: "), note


class _FailsOnRankZero(nn.Module):
    """A user module that raises on rank 0 alone at one step (after the root check passed)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.calls = rank, 0

    def forward(self, x):
        self.calls += 1
        if self.rank == 0 and self.calls == 2:
            raise RuntimeError("a failure of rank 0 alone")
        return x


def _one_rank_fails_inside_a_step(ctx) -> list[str]:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=4))
    model = nn.Sequential(_FailsOnRankZero(ctx.rank), *copy.deepcopy(reference))
    model = mpgroups.parallelize(model, ctx.process_group)
    # Rank 0 skipped the exchanges left in its failed step: it calls once more, so that the
    # others' last exchange has a partner.
    os.environ["MPGROUPS_CHECKS"] = "detail"
    try:
        outcomes = _loop(model, reference, _batches(7 if ctx.rank == 0 else 6))
    finally:
        del os.environ["MPGROUPS_CHECKS"]
    return [o.split(":")[0] if o.startswith("mismatch") else o for o in outcomes]


def test_a_rank_that_fails_alone_never_pairs_with_another_step(pool):
    """With ``MPGROUPS_CHECKS=detail`` (every layer checks every call): rank 0 fails in its
    own code at step 2; rank 1 waits in the grouped conv's check, which then meets rank 0's
    next root check: both raise. From then on the ranks' steps differ and every step raises
    on both, instead of pairing rank 1's batch k with rank 0's k + 1. (By default rank 1 waits
    in the conv's gather and rank 0 at its next root check, on another group: both wait until
    the group's timeout, docs/design.md §6.)"""
    outcomes = pool.run(_one_rank_fails_inside_a_step, 2)
    assert outcomes[0] == ["ok", "a failure of rank 0 alone"] + ["mismatch"] * 5
    assert outcomes[1] == ["ok"] + ["mismatch"] * 5


def _exchanges_per_forward(ctx) -> tuple[list[int], int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=4))
    model = mpgroups.parallelize(model, ctx.process_group)
    checked = []
    for x in (torch.randn(2, 3, 9, 9), torch.randn(2, 3, 9, 9), torch.randn(1, 3, 9, 9)):
        for grad in (False, True, True):
            with mpgroups.CommCounter() as comm, torch.set_grad_enabled(grad):
                model(x)
            checked.append(comm.count("input_check", kind="check"))
    with mpgroups.CommCounter() as comm:
        mpgroups.unparallelize(model)
    return checked, comm.count("input_check", kind="check")


def test_the_root_checks_every_forward_and_a_layer_each_new_input_signature(pool):
    """The root's check every forward; the grouped conv's on its first call with an input
    signature (shape, grad mode) only: 2 exchanges then, 1 after (unparallelize takes the
    root's hook away with the layers)."""
    checked, after = pool.run(_exchanges_per_forward, 2)[0]
    assert checked == [2, 2, 1, 1, 1, 1, 2, 2, 1], checked


def _records_on_the_host(ctx) -> None:
    """Every group gets a gloo twin of the same ranks for the checks' records, made once and
    named from it (for NCCL so that a check never waits for the GPU; for gloo too, so that a
    record never travels where the data does)."""
    import torch.distributed as dist

    from mpgroups.comm import process_groups
    from mpgroups.comm.checks import InputGuard

    pg = ctx.process_group
    twin = process_groups.host_group(pg)
    assert twin is not pg and process_groups.host_group(pg) is twin
    assert dist.get_backend(twin) == "gloo"
    assert dist.get_process_group_ranks(twin) == dist.get_process_group_ranks(pg)
    guard = InputGuard("twin check", ("twin",), pg)
    assert guard.record_group is twin
    every = [8] * ctx.world_size
    notes = [""] * ctx.world_size
    records = guard(torch.randn(2, 8), problem=None, expected_channels=every, channels_note=notes)
    assert len(records) == ctx.world_size
    bad = torch.randn(3 if ctx.rank == 1 else 2, 8)
    try:
        guard(bad, problem=None, expected_channels=every, channels_note=notes)
    except InputMismatchError as err:
        assert "rank 1 sent [3, 8]" in str(err), str(err)
    else:
        raise AssertionError("a mismatch over the twin did not raise")


def test_check_records_travel_on_a_host_group(pool):
    for world_size in (2, 4):
        pool.run(_records_on_the_host, world_size)


class _TwoInputs(nn.Module):
    """A model whose root checks ``mask`` in full and its body's input ``y`` by digest."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 8, 1, groups=4)
        )

    def forward(self, mask, y):
        return self.body(y) * mask


def _after_agreeing_once(ctx, case: str) -> str:
    """Both ranks first run every input alike (their layers learn the signatures), then one
    rank differs in what the root checks beyond the first tensor, or calls a layer outside
    the model's forward: every rank raises, where skipping the layers' checks would have
    given wrong numbers (equal element counts) or a hang."""
    torch.manual_seed(0)
    model = mpgroups.parallelize(_TwoInputs(), ctx.process_group)
    mask = torch.ones(1)
    wide, tall = torch.randn(2, 8, 6, 12), torch.randn(4, 8, 6, 6)  # equal element counts
    for y in (wide, tall):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                model(mask, y)
                model.body(y)
    mine = wide if ctx.rank == 0 else tall
    try:
        if case == "second input":
            model(mask, mine)
        elif case == "layer called alone":
            model.body(mine)
        elif case == "grad mode":
            with torch.set_grad_enabled(ctx.rank == 1):
                model(mask, wide)
        elif case == "weights on one rank":
            if ctx.rank == 0:
                model.body[1].double()
            model(mask, wide)
        elif case == "frozen on one rank":
            model.body[0].requires_grad_(ctx.rank == 1)
            model(mask, wide)
        elif case == "eval on one rank":
            model.train(ctx.rank == 1)
            model(mask, wide)
        elif case == "compiled block":
            model.body = torch.compile(model.body, backend="aot_eager")
            model(mask, wide)  # traced with the root's exchange in flight, and agreeing
            with torch.no_grad():
                model(mask, wide)
            model(mask, mine)
    except InputMismatchError as err:
        return str(err).split(":\n")[1]
    raise AssertionError(f"{case}: no error on rank {ctx.rank}")


@pytest.mark.parametrize(
    "case, says",
    [
        ("second input", "passed other tensors besides the first"),
        ("layer called alone", "rank 1 sent [4, 8, 6, 6] float32 on cpu"),
        ("grad mode", "rank 1 runs with grad enabled"),
        ("weights on one rank", "holds parameters of other dtypes, devices or requires_grad"),
        ("frozen on one rank", "holds parameters of other dtypes, devices or requires_grad"),
        ("eval on one rank", "or is in another train/eval mode"),
        ("compiled block", "passed other tensors besides the first"),
    ],
)
def test_what_the_root_checks_beyond_its_first_input_raises_on_every_rank(pool, case, says):
    messages = pool.run(_after_agreeing_once, 2, case, timeout=120)
    assert messages[0] == messages[1] and says in messages[0], messages


class _Batch:
    """A batch object torch's pytree does not look into."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


class _TakesABatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)

    def forward(self, batch: _Batch):
        return self.conv(batch.x)


def _batch_objects(ctx) -> int:
    """A model that takes no tensor the root can see runs, its layers checking every call (the
    root cannot vouch for their inputs)."""
    torch.manual_seed(0)
    model = mpgroups.parallelize(_TakesABatch(), ctx.process_group)
    with mpgroups.CommCounter() as comm:
        for _ in range(3):
            model(_Batch(torch.randn(2, 8, 5, 5)))
    return comm.count("input_check", kind="check")


def test_a_model_taking_a_batch_object_runs(pool):
    assert pool.run(_batch_objects, 2) == [6, 6]  # the root's and the conv's, each forward


def _branches_among_identical_layers(ctx) -> str:
    """Four identical grouped convs; rank 0 runs the 1st, 3rd and 4th, rank 1 the 1st, 2nd
    and 4th: with every layer checking every call, the layers' places tell them apart."""
    torch.manual_seed(0)
    model = mpgroups.parallelize(
        nn.Sequential(*(nn.Conv2d(8, 8, 3, padding=1, groups=4) for _ in range(4))),
        ctx.process_group,
    )
    x = torch.randn(2, 8, 5, 5)
    skipped = 2 if ctx.rank == 0 else 1
    os.environ["MPGROUPS_CHECKS"] = "detail"
    try:
        for i, layer in enumerate(model):
            if i != skipped:
                x = layer(x)
    except InputMismatchError as err:
        return str(err).split(": ", 1)[1]
    finally:
        del os.environ["MPGROUPS_CHECKS"]
    raise AssertionError("ranks on different branches went on")


def test_detail_tells_identical_layers_on_different_branches_apart(pool):
    messages = pool.run(_branches_among_identical_layers, 2)
    assert messages[0] == messages[1] and "calling different call sites" in messages[0]
