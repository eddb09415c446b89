"""What a training step of torchvision's ResNeXt-50 (``plan="auto"``, P = 2, checks at their
default) costs besides its data: counts, not times.

The data collectives are what the plan prescribes: one all-reduce per row-parallel layer in
the forward (16) and one per column-parallel layer in the backward (16). Beside them the
model's root exchanges one check record per forward, read back on the host; each checked
layer exchanges its own only on its first call with a new input signature (docs/design.md
§6), so the first step pays 32 more and every later step none. The goals: at most 17
collectives in a forward and 33 in a step, at most 2 host reads, on CPU tensors only.
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
    counts = {}
    for step in ("first", "later"):
        x = torch.randn(2, 3, 64, 64)
        with mpgroups.CommCounter() as forward, Reads() as reads:
            y = model(x)
        with mpgroups.CommCounter() as backward:
            y.sum().backward()
        counts[step] = {
            "forward data": forward.count(),
            "forward checks": forward.count(kind="meta"),
            "backward data": backward.count(),
            "backward checks": backward.count(kind="meta"),
            "host reads": reads.count,
        }
    return counts


@pytest.fixture(scope="module")
def counts(pool) -> dict:
    per_rank = pool.run(_step_counts, 2, timeout=120)
    assert per_rank[0] == per_rank[1], per_rank
    return per_rank[0]


def test_data_collectives_are_the_plans(counts):
    for step in ("first", "later"):
        step_counts = counts[step]
        assert step_counts["forward data"] == 16, counts
        assert step_counts["backward data"] == 16, counts
        assert step_counts["backward checks"] == 0, counts


def test_the_first_step_checks_every_layer_once(counts):
    # 32 checked layers (the 16 column- and 16 row-parallel convs; the grouped convs between
    # them communicate nothing), each exchanging one record read back twice, and the root,
    # whose records are read once (they never leave the host).
    assert counts["first"]["forward checks"] == 33, counts
    assert counts["first"]["host reads"] == 65, counts


def test_later_steps_meet_the_goals(counts):
    later = counts["later"]
    assert later["forward checks"] == 1, counts  # the root's
    assert later["forward data"] + later["forward checks"] <= 17, counts
    step = sum(later[k] for k in ("forward data", "forward checks", "backward data"))
    assert step + later["backward checks"] <= 33, counts
    assert later["host reads"] == 1, counts  # the root's records, on the host
