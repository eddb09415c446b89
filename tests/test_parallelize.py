"""Drop-in conversion of real model structures: parallelize, state dicts, checkpoints,
the two-tower AlexNet, and plan errors."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_harness import run_in_one_rank_world
from models import TinyConvNeXt, TinyMobileNet, TinyRegNet, TinyResNeXt, randomize_norms
from parity import assert_close
from torch import nn

import mpgroups
from mpgroups import ChannelLocal, ParallelLayer
from mpgroups.layers.conv import _GroupParallelConvNd

ALEXNET_SMALL = dict(num_classes=10, in_channels=3, channels=(16, 32, 48, 48, 32), hidden=64)


def resnext_tower_plan() -> dict:
    return {
        "layer1.*.conv2": ParallelLayer(output_layout="sharded"),
        "layer1.*.bn2": ChannelLocal(),
        "layer1.*.relu2": ChannelLocal(output_layout="replicated"),
    }


def build(kind: str, group, *, parallel: bool = True):
    """A seeded model of ``kind`` and its input, parallelized over ``group`` or plain."""
    torch.manual_seed(0)
    if kind.startswith("alexnet"):
        options = dict(batch_norm=kind == "alexnet_bn", **ALEXNET_SMALL)
        model = mpgroups.models.AlexNet(parallel=False, **options)
        randomize_norms(model)
        if parallel:
            state = model.state_dict()
            torch.manual_seed(0)
            model = mpgroups.models.AlexNet(process_group=group, **options)
            mpgroups.load_full_state_dict(model, state)
        size = 32
    else:
        classes = {
            "resnext": TinyResNeXt,
            "resnext_plan": TinyResNeXt,
            "mobilenet": TinyMobileNet,
            "convnext": TinyConvNeXt,
            "regnet": TinyRegNet,
        }
        model = classes[kind]()
        randomize_norms(model)
        size = 16
        if parallel:
            plan = resnext_tower_plan() if kind == "resnext_plan" else None
            model = mpgroups.parallelize(model, group, plan=plan)
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size)
    return model, x


def _alexnet_init(ctx) -> None:
    """Same seed: the parallel AlexNet starts from exactly the single-device weights."""
    torch.manual_seed(0)
    reference = mpgroups.models.AlexNet(parallel=False, batch_norm=True, **ALEXNET_SMALL)
    torch.manual_seed(0)
    model = mpgroups.models.AlexNet(
        process_group=ctx.process_group, batch_norm=True, **ALEXNET_SMALL
    )
    full = mpgroups.full_state_dict(model)
    assert list(full) == list(reference.state_dict())
    assert all(torch.equal(full[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("world_size", [2, 4])
def test_alexnet_initialises_like_the_single_device_model(pool, world_size):
    pool.run(_alexnet_init, world_size)


def _forward_backward(model, x, seed: int):
    torch.manual_seed(seed)
    out = model(x)
    torch.manual_seed(seed + 1)
    grad = torch.randn_like(out)
    out.backward(grad)
    return out


def _biases_into_batch_norm(model: nn.Module) -> set[str]:
    """Conv biases that feed a BatchNorm directly (registration order, as in AlexNet).

    In train mode their gradient is zero in exact arithmetic (BatchNorm subtracts the batch
    mean), so both the reference and the parallel model hold only rounding noise there:
    PyTorch's own fp32 value for ``conv3.bias`` of the small AlexNet is 1.6e-5.
    """
    names = [(name, m) for name, m in model.named_modules() if name]
    return {
        f"{name}.bias"
        for (name, m), (_, following) in zip(names[:-1], names[1:], strict=True)
        if isinstance(m, nn.Conv2d) and m.bias is not None
        if isinstance(following, nn.BatchNorm2d)
    }


def _model_parity(ctx, kind: str) -> dict:
    reference, x = build(kind, None, parallel=False)
    zero_in_train = _biases_into_batch_norm(reference)
    model, _ = build(kind, ctx.process_group)
    tol = 1e-5
    assert list(mpgroups.full_state_dict(model)) == list(reference.state_dict())
    errors = {}
    for mode in ("train", "eval"):
        reference.train(mode == "train")
        model.train(mode == "train")
        reference.zero_grad()
        model.zero_grad()
        out_ref = _forward_backward(reference, x, seed=5)
        out = _forward_backward(model, x, seed=5)
        errors[f"{mode} output"] = assert_close(out, out_ref, tol, f"{kind} {mode} output")
        grads = mpgroups.full_grad_dict(model)
        assert list(grads) == [n for n, _ in reference.named_parameters()]
        for name, p in reference.named_parameters():
            if mode == "train" and name in zero_in_train:
                # Checked against the reference in eval mode; here both must be noise.
                noise = max(grads[name].abs().max().item(), p.grad.abs().max().item())
                assert noise <= 1e-4, f"{kind} {name}: {noise:.3g} where 0 is exact"
                continue
            errors[f"{mode} {name}"] = assert_close(grads[name], p.grad, tol, f"{kind} {name}")
    # BatchNorm buffers (running stats, num_batches_tracked) follow too.
    full = mpgroups.full_state_dict(model)
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            assert_close(full[key], value, tol, f"{kind} state {key}")
        else:
            assert torch.equal(full[key], value), key
    return errors


MODELS = ["resnext", "resnext_plan", "regnet", "mobilenet", "convnext", "alexnet", "alexnet_bn"]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", MODELS)
def test_parallelized_model_equals_unconverted(pool, kind, world_size):
    errors = pool.run(_model_parity, world_size, kind, timeout=120)
    assert all(max(e.values()) <= 1e-5 for e in errors)


def _train(ctx, kind: str, parallel: bool, steps: int = 20):
    group = ctx.process_group if parallel else None
    model, _ = build(kind, group, parallel=parallel)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(2)
    size = 32 if kind.startswith("alexnet") else 16
    data = torch.randn(steps, 8, 3, size, size)
    labels = torch.randint(0, 10, (steps, 8))
    losses = []
    torch.manual_seed(3)  # dropout masks: the same stream on every rank and every P
    for step in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data[step]), labels[step])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, mpgroups.full_state_dict(model)


@pytest.mark.parametrize("kind", ["alexnet", "resnext_plan"])
def test_training_matches_single_device(pool, kind):
    (ref_losses, ref_state) = pool.run(_train, 1, kind, False)[0]
    assert ref_losses[-1] < ref_losses[0], "the reference run must learn something"
    for world_size in (1, 2, 4):
        if world_size == 1:
            results = [run_in_one_rank_world(_train, kind, True, timeout=180)]
        else:
            results = pool.run(_train, world_size, kind, True, timeout=180)
        for rank, (losses, state) in enumerate(results):
            rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True)]
            assert max(rel) <= 1e-4, (world_size, rank, max(rel))
            assert list(state) == list(ref_state)
            for key, value in ref_state.items():
                if value.is_floating_point():
                    assert_close(state[key], value, 1e-4, f"P={world_size} {key}")
                else:
                    assert torch.equal(state[key], value)


def _round_trip(ctx, kind: str) -> None:
    plain, x = build(kind, None, parallel=False)
    state = copy.deepcopy(plain.state_dict())
    plan = resnext_tower_plan() if kind == "resnext_plan" else None
    model = mpgroups.parallelize(plain, ctx.process_group, plan=plan)
    assert any(isinstance(m, _GroupParallelConvNd) for m in model.modules())
    restored = mpgroups.unparallelize(model)
    assert not any(isinstance(m, _GroupParallelConvNd) for m in restored.modules())
    after = restored.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    # No hook of parallelize is left behind: the restored model runs anywhere.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in restored.modules())


@pytest.mark.parametrize("kind", ["resnext", "resnext_plan", "regnet", "mobilenet", "convnext"])
def test_unparallelize_restores_the_state_dict_bitwise(pool, kind):
    pool.run(_round_trip, 4, kind)


def _save_at_two(ctx, directory: str) -> list:
    model, x = build("alexnet_bn", ctx.process_group)
    model.train()
    _forward_backward(model, x, seed=0)  # moves the BatchNorm running stats
    full = mpgroups.full_state_dict(model, rank0_only=True)
    if ctx.rank == 0:
        mpgroups.atomic_save(full, f"{directory}/full.pt")
    else:
        assert full == {}
    mpgroups.save_sharded_state_dict(model, f"{directory}/sharded")
    model.eval()
    return model(x).tolist()


def _load_elsewhere(ctx, directory: str) -> list:
    outputs = []
    full = mpgroups.safe_load(f"{directory}/full.pt")
    plain, x = build("alexnet_bn", None, parallel=False)
    plain.load_state_dict(full, strict=True)
    outputs.append(plain.eval()(x))
    model, _ = build("alexnet_bn", ctx.process_group)
    torch.nn.init.zeros_(model.features.conv2.weight)  # so loading has to restore it
    mpgroups.load_full_state_dict(model, full)
    outputs.append(model.eval()(x))
    resharded, _ = build("alexnet_bn", ctx.process_group)
    mpgroups.load_sharded_state_dict(resharded, f"{directory}/sharded")
    outputs.append(resharded.eval()(x))
    return [o.tolist() for o in outputs]


def test_checkpoints_written_at_two_load_at_four_and_one(pool, tmp_path):
    expected = torch.tensor(pool.run(_save_at_two, 2, str(tmp_path))[0])
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "shard-00000-of-00002.pt",
        "shard-00001-of-00002.pt",
    ]
    at_four = pool.run(_load_elsewhere, 4, str(tmp_path))
    at_one = run_in_one_rank_world(_load_elsewhere, str(tmp_path))
    for world_size, results in ((4, at_four), (1, [at_one])):
        for rank, outs in enumerate(results):
            for what, out in zip(["plain nn", "full", "sharded"], outs, strict=True):
                assert_close(torch.tensor(out), expected, 1e-5, f"P={world_size} r{rank} {what}")


def _parameter_counts(ctx) -> dict:
    model, _ = build("alexnet", ctx.process_group)
    plain, _ = build("alexnet", None, parallel=False)
    for name, module in model.named_modules():
        if isinstance(module, _GroupParallelConvNd):
            full = plain.get_submodule(name)
            full_count = sum(p.numel() for p in full.parameters())
            local_count = sum(p.to_local().numel() for p in module.parameters())
            assert local_count * ctx.world_size == full_count, (name, local_count, full_count)
    # A tensor split unlike torch.chunk (10 classes' biases over 4 ranks: 3, 3, 2, 2) is held
    # whole on every rank (a DTensor Replicate(), its module computing on its rows).
    whole = [p for p in model.parameters() if p.placements[0].is_replicate()]
    return {
        "bytes": mpgroups.local_parameter_bytes(model),
        "plain bytes": mpgroups.local_parameter_bytes(plain),
        "whole bytes": sum(p.numel() * p.element_size() for p in whole),
        "repr": repr(model),
    }


@pytest.mark.parametrize("world_size", [2, 4])
def test_grouped_layers_hold_one_pth_of_their_parameters(pool, world_size):
    results = pool.run(_parameter_counts, world_size)
    for r in results:
        count = r["bytes"] // 4
        assert f"parameters on this rank: {count:,} ({r['bytes'] / 2**20:.1f} MiB)" in r["repr"]
    # Every parameter, classifier included, is held by exactly one rank, but for those held
    # whole on every rank (none at P = 2; the last bias at P = 4).
    extra = (world_size - 1) * results[0]["whole bytes"]
    assert sum(r["bytes"] for r in results) == results[0]["plain bytes"] + extra
    assert (results[0]["whole bytes"] > 0) == (world_size == 4)


def _plan_mistakes(ctx) -> None:
    model, x = build("resnext", None, parallel=False)
    bad = mpgroups.parallelize(
        model, ctx.process_group, plan={"layer1.0.conv2": ParallelLayer(output_layout="sharded")}
    )
    with pytest.raises(mpgroups.PlanError, match=r"module 'layer1.0.bn2' \(BatchNorm2d\)"):
        bad(x)
    alex = nn.Sequential(
        nn.Conv2d(8, 8, 3, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 3),
    )
    alex = mpgroups.parallelize(
        alex, ctx.process_group, plan={"0": ParallelLayer(output_layout="sharded")}
    )
    # nn.Flatten passes the channel shards on as feature shards; the Linear needs it whole.
    with pytest.raises(mpgroups.PlanError, match=r"module '3' \(Linear\) received an activation"):
        alex(torch.randn(2, 8, 6, 6))
    with pytest.raises(mpgroups.PlanError, match="matches no module"):
        mpgroups.parallelize(
            TinyResNeXt(), ctx.process_group, plan={"layer9.conv": ParallelLayer()}
        )
    with pytest.raises(mpgroups.PlanError, match="it applies to nn.Conv1d/2d/3d and nn.Linear"):
        mpgroups.parallelize(TinyResNeXt(), ctx.process_group, plan={"stem.1": ParallelLayer()})
    with pytest.raises(mpgroups.PlanError, match="no sharded-output conv before it"):
        mpgroups.parallelize(TinyResNeXt(), ctx.process_group, plan={"stem.1": ChannelLocal()})


def test_plan_mistakes_raise_naming_the_module(pool):
    pool.run(_plan_mistakes, 2)


def _conversion_keeps(ctx) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4, dtype=torch.float64),
        nn.GroupNorm(4, 16, dtype=torch.float64),
        nn.Conv2d(16, 8, 1, dtype=torch.float64),
    ).eval()
    model[0].bias.requires_grad_(False)
    seen = []
    handle = model[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    plan = {"0": ParallelLayer(output_layout="sharded"), "1": ChannelLocal("replicated")}
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    reference = model(x)
    seen.clear()
    converted = mpgroups.parallelize(model, ctx.process_group, plan=plan)
    conv = converted[0]
    assert isinstance(conv, mpgroups.GroupParallelConv2d) and not conv.training
    assert conv.weight.dtype == torch.float64 and not conv.bias.requires_grad
    assert converted[1].num_groups * ctx.world_size == 4  # whole norm groups per rank
    assert_close(converted(x), reference, 1e-12, "GroupNorm chain")
    assert seen == [(2, 16 // ctx.world_size, 5, 5)], "the user's hook still fires"
    handle.remove()
    converted(x)
    assert len(seen) == 1, "and its handle still removes it"
    restored = mpgroups.unparallelize(converted)
    assert isinstance(restored[0], nn.Conv2d) and restored[1].num_groups == 4
    assert_close(restored(x), reference, 1e-12, "restored")

    split_norm = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.GroupNorm(1, 8))
    with pytest.raises(mpgroups.PlanError, match="fall inside a norm group"):
        mpgroups.parallelize(
            split_norm,
            ctx.process_group,
            plan={"0": ParallelLayer(output_layout="sharded"), "1": ChannelLocal()},
        )


def test_conversion_keeps_dtype_mode_requires_grad_and_hooks(pool):
    pool.run(_conversion_keeps, 2)
    pool.run(_conversion_keeps, 4)


def _sync_from_rank0(ctx) -> None:
    torch.manual_seed(ctx.rank)  # every rank initialises differently
    model = TinyResNeXt()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = mpgroups.parallelize(model, ctx.process_group)
    torch.manual_seed(0)  # rank 0's initialisation
    assert_close(model.eval()(x), TinyResNeXt().eval()(x), 1e-5, "synchronised from rank 0")


def test_parallelize_synchronises_module_states_from_rank0(pool):
    pool.run(_sync_from_rank0, 2)


def _alexnet_comm_sites(ctx) -> tuple[dict, list]:
    """Which modules issue data collectives in forward, and which ops the backward issues."""
    model, x = build("alexnet", ctx.process_group)
    sites, marks = {}, {}
    with mpgroups.CommCounter() as comm:

        def before(module, args):
            marks[module] = len(comm.records)

        def after(module, args, output):
            ops = [r.op for r in comm.records[marks[module] :] if r.kind == "data"]
            if ops:
                sites[names[module]] = sorted(ops)

        names = {m: n for n, m in model.named_modules() if next(m.children(), None) is None}
        for module in names:
            module.register_forward_pre_hook(before)
            module.register_forward_hook(after)
        out = model(x)
        forward_records = len(comm.records)
        out.sum().backward()
        backward_ops = sorted(r.op for r in comm.records[forward_records:] if r.kind == "data")
    return sites, backward_ops


@pytest.mark.parametrize("world_size", [2, 4])
def test_alexnet_communicates_only_at_conv3_and_the_classifier(pool, world_size):
    """docs/design.md §3b: towers run alone; conv3 mixes them; fc6 and fc8 (row-parallel) sum their
    partial outputs; at P = 4 each tower's two ranks also gather their group's channels."""
    (sites, backward_ops), *_ = pool.run(_alexnet_comm_sites, world_size)
    teams = ["features.conv2", "features.conv4", "features.conv5"] if world_size == 4 else []
    expected = {name: ["all_gather"] for name in ["features.conv3", *teams]}
    expected |= {"classifier.1": ["all_reduce"], "classifier.6": ["all_reduce"]}
    assert sites == expected
    # Each partial gather of an input (conv3, and the team gathers) sums its grad back; fc7
    # (column-parallel on a replicated input) sums its input grads. At P = 4 fc8's bias (10
    # classes: 3, 3, 2, 2 rows, unlike torch.chunk) is held whole: its rows' grads are gathered.
    uneven = ["all_gather"] if world_size == 4 else []
    assert backward_ops == sorted(["all_reduce", *uneven] + ["reduce_scatter"] * (1 + len(teams)))


def _alexnet_parameters(ctx) -> tuple[int, int]:
    torch.manual_seed(0)
    model = mpgroups.models.AlexNet(100, process_group=ctx.process_group)
    total = sum(p.numel() for p in mpgroups.models.AlexNet(100, parallel=False).parameters())
    return sum(p.to_local().numel() for p in model.parameters()), total


@pytest.mark.parametrize("world_size", [2, 4])
def test_alexnet_holds_one_pth_of_its_parameters_per_rank(pool, world_size):
    """The 2012 split, classifier included: every weight and bias is divided (none is
    replicated), so each rank holds total / P to within 1 %, together exactly the total."""
    counts = pool.run(_alexnet_parameters, world_size, timeout=120)
    total = counts[0][1]
    assert sum(local for local, _ in counts) == total
    for local, _ in counts:
        assert abs(local - total / world_size) <= 0.01 * total / world_size, (local, total)


def _alexnet_old_checkpoints(ctx, tmp: str) -> None:
    """Checkpoints of the towers-only AlexNet (classifier replicated, as before the 2012 split)
    load into today's split model: full state dicts and sharded directories alike."""
    from pathlib import Path

    torch.manual_seed(0)
    old = mpgroups.models.AlexNet(
        process_group=ctx.process_group, split_classifier=False, **ALEXNET_SMALL
    )
    directory = Path(tmp) / "towers"
    mpgroups.save_sharded_state_dict(old, directory)
    full = mpgroups.full_state_dict(old)
    torch.manual_seed(1)  # different weights, overwritten by each load
    for load in ("full", "sharded"):
        new = mpgroups.models.AlexNet(process_group=ctx.process_group, **ALEXNET_SMALL)
        assert new.classifier[1].split == "rowwise"
        if load == "full":
            mpgroups.load_full_state_dict(new, full)
        else:
            mpgroups.load_sharded_state_dict(new, directory)
        reloaded = mpgroups.full_state_dict(new)
        assert list(reloaded) == list(full)
        assert all(torch.equal(reloaded[k], v) for k, v in full.items()), load
        x = torch.randn(2, 3, 32, 32)
        assert_close(new.eval()(x), old.eval()(x), 1e-5, f"{load} checkpoint, eval output")


@pytest.mark.parametrize("world_size", [2, 4])
def test_alexnet_loads_checkpoints_of_the_towers_only_model(pool, world_size, tmp_path):
    pool.run(_alexnet_old_checkpoints, world_size, str(tmp_path))
