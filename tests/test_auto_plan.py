"""``auto_plan`` and ``parallelize(plan="auto")`` on models with torchvision's structure:
the plan found, forward and every grad equal to the original, one all-reduce per block,
full state dicts that load into the original, and the fallback for untraceable models."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import tv_models
from models import randomize_norms
from parity import assert_close, held_whole
from torch import nn

import mpgroups
from mpgroups import ChannelLocal, ParallelLayer

# name: (factory, the blocks that each close with one row-parallel all-reduce forward)
MODELS = {
    "resnext50_32x4d": (tv_models.small_resnext, "Bottleneck"),
    "regnet_y_400mf": (tv_models.small_regnet_y, "ResBottleneckBlock"),
    "mobilenet_v2": (tv_models.small_mobilenet_v2, "InvertedResidual"),
    # 6 and 10 groups: uneven shards at P = 4 (column layers laid out as the groups)
    "regnet_y_uneven": (partial(tv_models.small_regnet_y, uneven=True), "ResBottleneckBlock"),
}


def _rows(plan: dict) -> list[str]:
    return [n for n, s in plan.items() if isinstance(s, ParallelLayer) and s.split == "rowwise"]


def _closing_layers(model: nn.Module, plan: dict, block: str) -> dict[str, list[str]]:
    """For each block (module of class ``block``): the row-parallel layers inside it."""
    names = [n for n, m in model.named_modules() if type(m).__name__ == block]
    return {b: [r for r in _rows(plan) if r.startswith(f"{b}.")] for b in names}


# float64 shows the computation exact; float32 through a deep train-mode BatchNorm network
# differs from the original by rounding in the order of the partial sums (2.7e-5 relative,
# measured on small_resnext at P = 2, where float64 gives 2.6e-14).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _ops(**counts: int) -> dict[str, int]:
    return {op: n for op, n in counts.items() if n}


def _auto_parity(ctx, name: str, dtype: torch.dtype, objective: str = "collectives") -> dict:
    factory, _ = MODELS[name]
    torch.manual_seed(0)
    reference = factory().to(dtype)
    randomize_norms(reference)
    plan = mpgroups.auto_plan(reference, ctx.process_group, objective=objective)
    rows = _rows(plan)
    scattered = [n for n in rows if plan[n].output_layout == "sharded"]
    rows = [n for n in rows if n not in scattered]
    # Dense layers reading a whole input: their input grads are summed backward.
    columns = [
        n
        for n, s in plan.items()
        if isinstance(s, ParallelLayer) and s.input_layout == "replicated"
        if getattr(reference.get_submodule(n), "groups", 1) == 1
    ]
    # Under the memory objective a model may end a chain by gathering a per-channel module's
    # output (RegNet's squeeze-excitation): counted on the models that have none.
    gathers = [n for n, s in plan.items() if s.output_layout == "replicated" and n not in rows]
    model = mpgroups.parallelize(copy.deepcopy(reference), ctx.process_group, plan=plan)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32, dtype=dtype)
    tol = TOLERANCE[dtype]
    errors = {}
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        model.train(mode == "train")
        reference.zero_grad()
        model.zero_grad()
        x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(5)  # dropout (MobileNetV2's classifier): the same stream for both
        y_ref = reference(x_ref)
        torch.manual_seed(5)
        with mpgroups.CommCounter() as forward:
            y = model(x_par)
        grad = torch.randn_like(y_ref)
        y_ref.backward(grad)
        with mpgroups.CommCounter() as backward:
            y.backward(grad)
        # Forward: one all-reduce per row-parallel layer (a reduce-scatter where its output
        # stays sharded); backward: one all-reduce per column-parallel layer (its input grads),
        # an all-gather per reduce-scatter. Entries split unlike torch.chunk are held whole:
        # one all-gather per such parameter backward (MobileNetV2's 10 classes over 4 ranks)
        # and per such buffer after a training forward (RegNet's 6 and 10 groups).
        buffers = len(held_whole(model, buffers=True)) if mode == "train" else 0
        params = len(held_whole(model))
        if not gathers:
            assert forward.ops() == _ops(
                all_reduce=len(rows), reduce_scatter=len(scattered), all_gather=buffers
            ), forward.ops()
            assert backward.ops() == _ops(
                all_reduce=len(columns), all_gather=params + len(scattered)
            ), backward.ops()
        errors[f"{mode} output"] = assert_close(y, y_ref, tol, f"{name} {mode} output")
        errors[f"{mode} input grad"] = assert_close(x_par.grad, x_ref.grad, tol, "input grad")
        grads = mpgroups.full_grad_dict(model)
        for key, p in reference.named_parameters():
            errors[f"{mode} {key}"] = assert_close(grads[key], p.grad, tol, f"{name} {key}")
    full = mpgroups.full_state_dict(model)
    plain = factory().to(dtype)
    plain.load_state_dict(full, strict=True)
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            assert_close(full[key], value, tol, f"{name} state {key}")
    return errors


# The real torchvision configurations (same classes, full widths and depths).
REAL = {
    "resnext50_32x4d": tv_models.resnext50_32x4d,
    "regnet_y_400mf": tv_models.regnet_y_400mf,
    "mobilenet_v2": tv_models.mobilenet_v2,
}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name, size", [(n, "small") for n in MODELS] + [(n, "real") for n in REAL])
def test_every_block_closes_with_one_all_reduce(name, size, world_size):
    """Column → grouped/depthwise → row in every block: one row-parallel layer closes it
    (RegNet-Y: plus one in its squeeze-excitation, whose squeeze reads every channel)."""
    factory, block = MODELS[name]
    model = (factory if size == "small" else REAL[name])()
    plan = mpgroups.auto_plan(model, world_size=world_size)
    closing = _closing_layers(model, plan, block)
    assert closing
    for name_, rows in closing.items():
        main = [r for r in rows if ".se." not in r]
        assert len(main) == 1, (name_, rows)
        se = [r for r in rows if ".se." in r]
        assert len(se) == (1 if name.startswith("regnet") else 0), (name_, rows)
        grouped = [
            n
            for n, s in plan.items()
            if n.startswith(f"{name_}.") and isinstance(s, ParallelLayer)
            if model.get_submodule(n).groups > 1
        ]
        assert len(grouped) == 1, (name_, grouped)
        assert plan[grouped[0]] == ParallelLayer("sharded", "sharded"), (name_, grouped)


# float64 at P = 2 and 4 (exactness); float32 (what users train in) at P = 2.
PARITY = [(n, p, torch.float64) for n in MODELS for p in (2, 4)]
PARITY += [(n, 2, torch.float32) for n in MODELS]


@pytest.mark.parametrize("name, world_size, dtype", PARITY, ids=str)
def test_auto_plan_equals_the_original_model(pool, name, world_size, dtype):
    errors = pool.run(_auto_parity, world_size, name, dtype, timeout=150)
    assert all(max(e.values()) <= TOLERANCE[dtype] for e in errors)


# The memory objective: every layer split, what lies between blocks sharded.
MEMORY = [(n, 2, torch.float64) for n in MODELS]
MEMORY += [(n, 4, torch.float64) for n in ("resnext50_32x4d", "regnet_y_uneven")]
MEMORY += [("resnext50_32x4d", 2, torch.float32)]


@pytest.mark.parametrize("name, world_size, dtype", MEMORY, ids=str)
def test_memory_objective_equals_the_original_model(pool, name, world_size, dtype):
    errors = pool.run(_auto_parity, world_size, name, dtype, "memory", timeout=150)
    assert all(max(e.values()) <= TOLERANCE[dtype] for e in errors)


def test_memory_objective_splits_the_stem_downsample_and_classifier():
    """ResNeXt under the memory objective: the stem column-parallel, every dense conv in a
    block (the downsample too) row-parallel with its output sharded, the per-channel modules
    between blocks on shards, the classifier row-parallel into the whole logits."""
    model = tv_models.small_resnext()
    for world_size in (2, 4):
        plan = mpgroups.auto_plan(model, world_size=world_size, objective="memory")
        assert plan["conv1"] == ParallelLayer(output_layout="sharded")
        assert isinstance(plan["bn1"], ChannelLocal) and plan["bn1"].output_layout == "sharded"
        blocks = [n for n, m in model.named_modules() if type(m).__name__ == "Bottleneck"]
        for block in blocks:
            for dense in ("conv1", "conv3", "downsample.0"):
                if dense == "downsample.0" and model.get_submodule(block).downsample is None:
                    continue
                style = plan[f"{block}.{dense}"]
                assert (style.split, style.input_layout, style.output_layout) == (
                    "rowwise",
                    "sharded",
                    "sharded",
                ), (block, dense, style)
            assert plan[f"{block}.conv2"] == ParallelLayer("sharded", "sharded")
            assert plan[f"{block}.bn3"].output_layout == "sharded"
        fc = plan["fc"]
        assert (fc.split, fc.input_layout, fc.output_layout) == ("rowwise", "sharded", "replicated")
    with pytest.raises(ValueError, match=r"objective must be one of \('collectives', 'memory'\)"):
        mpgroups.auto_plan(model, world_size=2, objective="speed")


def _parameters_per_rank(ctx) -> dict:
    torch.manual_seed(0)
    fractions = {}
    for objective in ("collectives", "memory"):
        model = tv_models.resnext50_32x4d()
        total = sum(p.numel() for p in model.parameters())
        plan = mpgroups.auto_plan(model, ctx.process_group, objective=objective)
        mpgroups.parallelize(model, ctx.process_group, plan=plan)
        local = sum(p.to_local().numel() for p in model.parameters())
        fractions[objective] = local / total
    return fractions


def test_memory_objective_holds_half_of_resnext50_per_rank(pool):
    """torchvision's ResNeXt-50 at P = 2: the default objective leaves the stem, downsample
    convs and classifier whole on every rank; the memory objective splits them too."""
    for fractions in pool.run(_parameters_per_rank, 2, timeout=120):
        assert fractions["memory"] <= 0.501, fractions
        assert fractions["collectives"] > 0.59, fractions


def test_auto_plan_pairs_column_grouped_row_in_every_block():
    """ResNeXt: conv1 column → conv2 grouped → conv3 row in each Bottleneck, laid out as the
    grouped conv's groups; the stem, downsample and fc stay whole."""
    model = tv_models.small_resnext()
    plan = mpgroups.auto_plan(model, world_size=4)
    bottlenecks = [n for n, m in model.named_modules() if type(m).__name__ == "Bottleneck"]
    assert bottlenecks
    for block in bottlenecks:
        groups = model.get_submodule(f"{block}.conv2").groups
        assert plan[f"{block}.conv1"] == ParallelLayer(output_layout="sharded", shard_groups=groups)
        assert plan[f"{block}.conv2"] == ParallelLayer("sharded", "sharded")
        assert plan[f"{block}.conv3"] == ParallelLayer(
            "sharded", "replicated", split="rowwise", shard_groups=groups
        )
        assert isinstance(plan[f"{block}.bn1"], ChannelLocal)
        assert f"{block}.bn3" not in plan and f"{block}.downsample.0" not in plan
    assert "conv1" not in plan and "fc" not in plan
    assert all(isinstance(v, ParallelLayer | ChannelLocal) for v in plan.values())
    assert "ParallelLayer(input_layout='sharded'" in repr(plan)  # prints readably


class _Untraceable(nn.Module):
    """Control flow on a tensor's value: ``torch.fx`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, groups=4)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


def _fallback(ctx) -> None:
    torch.manual_seed(0)
    reference = _Untraceable()
    with pytest.warns(UserWarning, match=r"torch.fx cannot trace _Untraceable .*drop-in"):
        model = mpgroups.parallelize(copy.deepcopy(reference), ctx.process_group, plan="auto")
    assert isinstance(model.conv, mpgroups.GroupParallelConv2d)
    x = torch.randn(2, 8, 5, 5)
    assert_close(model(x), reference(x), 1e-6, "fallback forward")


@pytest.mark.parametrize("world_size", [2, 4])
def test_untraceable_model_falls_back_to_the_drop_in_plan(pool, world_size):
    pool.run(_fallback, world_size)


def _plans_of_another_size(ctx) -> None:
    """The plan is made for a group size; at another size the same model splits otherwise."""
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.ReLU())
    for made_for in (2, 4):
        if made_for == ctx.world_size:
            continue
        plan = mpgroups.auto_plan(model, world_size=made_for)
        assert plan.world_size == made_for
        with pytest.raises(mpgroups.PlanError, match=f"made for {made_for} ranks and the process"):
            mpgroups.parallelize(copy.deepcopy(model), ctx.process_group, plan=plan)
    # Made for this group it applies: groups=3 splits at P = 2 and stays whole at P = 4.
    here = mpgroups.auto_plan(model, ctx.process_group)
    converted = mpgroups.parallelize(copy.deepcopy(model), ctx.process_group, plan=here)
    assert isinstance(converted[0], mpgroups.GroupParallelConv2d) == (ctx.world_size == 2)
    if ctx.world_size == 4:
        # A hand-written plan (or the drop-in) names the layer that cannot be placed.
        with pytest.raises(
            mpgroups.PlacementError, match=r"^'0' \(Conv2d with groups=3\): .*NoParallel"
        ):
            mpgroups.parallelize(copy.deepcopy(model), ctx.process_group)


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_plan_made_for_another_group_size_is_refused(pool, world_size):
    pool.run(_plans_of_another_size, world_size)


def test_rowwise_with_unplaceable_groups_suggests_only_what_works():
    from mpgroups.sharding.layout import check_split

    with pytest.raises(ValueError, match="use split='colwise'"):
        check_split("rowwise", 2, 4, "sharded")
    with pytest.raises(
        ValueError, match=r"nor can split='colwise' place groups=3 on 4 ranks"
    ) as err:
        check_split("rowwise", 3, 4, "sharded")
    assert "use split='colwise'" not in str(err.value)


def _memory_objective_habits(ctx) -> None:
    torch.manual_seed(0)
    reference = tv_models.small_resnext()
    plan = mpgroups.auto_plan(reference, ctx.process_group, objective="memory")
    model = mpgroups.parallelize(copy.deepcopy(reference), ctx.process_group, plan=plan)
    x = torch.randn(4, 3, 32, 32)
    inputs = {
        "contiguous": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "non-contiguous": x.transpose(2, 3),
    }
    for what, batch in inputs.items():
        assert_close(model(batch), reference(batch), 1e-5, f"train forward, {what}")
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert_close(model(x), reference(x), 1e-5, "no_grad")
    with torch.inference_mode():
        assert_close(model(x), reference(x), 1e-5, "inference_mode")
    ema = torch.optim.swa_utils.AveragedModel(model)
    assert_close(ema(x), reference(x), 1e-5, "a deep copy (EMA)")


def test_memory_objective_under_user_habits(pool):
    """channels_last and non-contiguous batches, no_grad, inference_mode, a deep copy."""
    pool.run(_memory_objective_habits, 2)


def _linear_over_the_last_dim(ctx) -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Linear(8, 3)
    ).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for objective in ("collectives", "memory"):
        plan = mpgroups.auto_plan(reference, ctx.process_group, objective=objective)
        assert getattr(plan.get("3"), "input_layout", "replicated") == "replicated", plan
        model = mpgroups.parallelize(copy.deepcopy(reference), ctx.process_group, plan=plan)
        assert_close(model(x), reference(x), 1e-12, f"{objective}: Linear over the last dim")


def test_a_linear_over_a_conv_output_reads_it_whole(pool):
    """A Linear applied to a conv's output acts on its last spatial dim, not on its channels:
    it reads the conv's output whole (a Linear reads channels only once they are flattened)."""
    pool.run(_linear_over_the_last_dim, 2)
