"""What a training step of torchvision's ResNeXt-50 (``plan="auto"``, P = 2, checks at their
default) costs besides its data: counts, not times.

The data collectives are what the plan prescribes: one all-reduce per row-parallel layer in
the forward (16) and one per column-parallel layer in the backward (16). Beside them each
forward exchanges check records: one at the model's root and one per checked layer, each read
back on the host. The goals (at most 17 collectives in a forward and 33 in a step, at most 2
host reads, on CPU tensors only) need the per-layer checks gone once the root has agreed
(docs/design.md §6); until then they are held as an expected failure, strict, so the day they
are met the test says so.
"""

from __future__ import annotations

import pytest
import torch
import tv_models

import mpgroups

HOST_READS = ("tolist", "item", "cpu", "__bool__")


def _step_counts(ctx) -> dict:
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        """Counts the tensor-to-host reads (each a device sync on NCCL)."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.count += getattr(func, "__name__", "") in HOST_READS
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = mpgroups.parallelize(tv_models.resnext50_32x4d(), ctx.process_group, plan="auto")
    x = torch.randn(2, 3, 64, 64)
    with mpgroups.CommCounter() as forward, Reads() as reads:
        y = model(x)
    with mpgroups.CommCounter() as backward:
        y.sum().backward()
    return {
        "forward data": forward.count(),
        "forward checks": forward.count(kind="meta"),
        "backward data": backward.count(),
        "backward checks": backward.count(kind="meta"),
        "host reads": reads.count,
    }


@pytest.fixture(scope="module")
def counts(pool) -> dict:
    per_rank = pool.run(_step_counts, 2, timeout=120)
    assert per_rank[0] == per_rank[1], per_rank
    return per_rank[0]


def test_data_collectives_are_the_plans(counts):
    assert counts["forward data"] == 16 and counts["backward data"] == 16, counts
    assert counts["backward checks"] == 0, counts


def test_checks_today_one_at_the_root_and_one_per_checked_layer(counts):
    # 32 checked layers (the 16 column- and 16 row-parallel convs; the grouped convs between
    # them communicate nothing), each exchanging one record, read back twice on the host.
    assert counts["forward checks"] == 33, counts
    assert counts["host reads"] == 66, counts


@pytest.mark.xfail(strict=True, reason="issue 21: per-layer checks still run on every call")
def test_fixed_costs_meet_the_goals(counts):
    assert counts["forward data"] + counts["forward checks"] <= 17, counts
    step = sum(counts[k] for k in ("forward data", "forward checks", "backward data"))
    assert step + counts["backward checks"] <= 33, counts
    assert counts["host reads"] <= 2, counts
