"""The training loop users already write, unchanged, on every kind of mpgroups model.

A parallelized model (the drop-in ``parallelize(model)``, an auto plan, the AlexNet towers,
the 2012 AlexNet) holds every parameter as a DTensor on its group's mesh, so torch's own tools
see the single-device model: ``clip_grad_norm_`` (and ``get_total_norm``, ``clip_grad_value_``),
``torch.amp.GradScaler``'s overflow check, DCP with ``get_model_state_dict`` /
``get_optimizer_state_dict``, FSDP2 over a second mesh dim. Each is compared with the plain
``torch.nn`` model on one device, float32 (the styles' block: ``tests/test_tp_styles.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import tv_models
from models import TinyResNeXt
from parity import assert_close
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

import mpgroups

KINDS = ["drop-in", "auto", "towers", "alexnet"]
ALEXNET_SMALL = dict(num_classes=10, channels=(16, 32, 48, 48, 32), hidden=64, dropout=0.0)
TOL = 1e-4
NORM_TOL = 1e-5  # relative: assert_close scales by the norm


# The auto-planned ResNeXt runs in float64: its train-mode BatchNorms over 4 samples at 1×1
# are so ill-conditioned that one device in float32 leaves its own float64 run by 0.09 % in
# the gradient norm after one AdamW step and 19 % after three (measured), so float32 rounding
# in another order could not be told from an error there. The drop-in's small ResNeXt too:
# after 10 AdamW steps in float32 its norm left one device's by 1.16e-5 relative on one CPU
# and within 1e-5 on another (the same code).
DTYPES = {"auto": torch.float64, "auto-memory": torch.float64, "drop-in": torch.float64}


def _models(kind: str, process_group) -> tuple[nn.Module, nn.Module, int]:
    """``(the single-device model, the same model parallelized over process_group, image
    size)``, from one seed, in the kind's dtype."""
    torch.manual_seed(0)
    dtype = DTYPES.get(kind, torch.float32)
    if kind in ("towers", "alexnet"):
        options = dict(ALEXNET_SMALL, split_classifier=kind == "alexnet")
        plain = mpgroups.models.AlexNet(parallel=False, **options)
        model = mpgroups.models.AlexNet(process_group=process_group, **options)
        mpgroups.load_full_state_dict(model, plain.state_dict())
        return plain, model, 32
    if kind == "drop-in":
        plain, plan, size = TinyResNeXt().to(dtype), None, 16
    else:
        plain, size = tv_models.small_resnext().to(dtype), 16
        objective = "memory" if kind == "auto-memory" else "collectives"
        plan = mpgroups.auto_plan(plain, process_group, objective=objective)
    return plain, mpgroups.parallelize(copy.deepcopy(plain), process_group, plan=plan), size


def _input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.to(next(model.parameters()).dtype)


def _batches(size: int, steps: int, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(batch, 3, size, size, generator=generator),
         torch.randint(0, 10, (batch,), generator=generator))
        for _ in range(steps)
    ]  # fmt: skip


def _assert_single_device_state(model: nn.Module, plain: nn.Module, what: str) -> None:
    full = mpgroups.full_state_dict(model)
    for key, value in plain.state_dict().items():
        if value.is_floating_point():
            assert_close(full[key], value, TOL, f"{what}: {key}")


_OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
}


def _clipped_training(ctx, kind: str, optimizer: str) -> None:
    plain, model, size = _models(kind, ctx.process_group)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizers = [_OPTIMIZERS[optimizer](m.parameters()) for m in (plain, model)]
    for step, (x, y) in enumerate(_batches(size, 10)):
        losses, norms = [], []
        for net, opt in zip((plain, model), optimizers, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(net(_input(net, x)), y)
            loss.backward()
            losses.append(loss.detach())
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        for net in (plain, model):
            norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05))
        assert norms[0] > 0.05, "clipping must be active"
        for value in (total, norms[1]):
            assert isinstance(value, DTensor) and value.placements == (Replicate(),)
            assert_close(value.full_tensor(), norms[0], NORM_TOL, f"norm at step {step}")
        assert_close(losses[1], losses[0], TOL, f"loss at step {step}")
        for opt in optimizers:
            opt.step()
    _assert_single_device_state(model, plain, f"{kind} trained")
    # clip_grad_value_: elementwise, the same on every rank's part.
    for net in (plain, model):
        torch.nn.utils.clip_grad_value_(net.parameters(), 1e-3)
    grads = mpgroups.full_grad_dict(model)
    for key, param in plain.named_parameters():
        assert_close(grads[key], param.grad, TOL, f"clamped grad {key}")


# Every kind at P = 2 and 4, each size with one optimizer and each optimizer at one size
# (alternating from kind to kind); the memory objective's plan (a sharded trunk:
# reduce-scatters and all-gathers) once with each.
_NAMES = ("sgd-momentum", "adamw")
CLIPPED = [(k, p, _NAMES[(i + p // 2) % 2]) for i, k in enumerate(KINDS) for p in (2, 4)]
CLIPPED += [("auto-memory", 2, "adamw"), ("auto-memory", 4, "sgd-momentum")]


@pytest.mark.parametrize("kind, world_size, optimizer", CLIPPED)
def test_clip_grad_norm_trains_as_one_device(pool, kind, world_size, optimizer):
    """10 steps with clip_grad_norm_ active: every rank's norm is the single-device norm,
    and losses and the final state equal single-device training."""
    pool.run(_clipped_training, world_size, kind, optimizer, timeout=120)


def _styles_block(mesh) -> tuple[nn.Module, nn.Module]:
    """The Mamba-style block of ``tests/test_tp_styles.py`` (float64) and its parallel twin
    under ``parallelize_module`` on ``mesh``."""
    from test_tp_styles import MambaStyleBlock, _parallel_block

    torch.manual_seed(7)
    plain = MambaStyleBlock(split_in_proj=True)
    return plain, _parallel_block(plain, mesh, mesh.size())


def _grad_scaler(ctx, kind: str) -> None:
    """An inf in one rank's part of one gradient skips the step on every rank, and the scale
    drops alike."""
    if kind == "styles":
        from test_tp_styles import _mesh

        _, model = _styles_block(_mesh(ctx))
        batches = [(torch.randn(2, 5, 6, dtype=torch.float64), None) for _ in range(2)]
        split = model.conv  # its rows Shard(0) over the ranks
    elif kind == "alexnet-fp16":
        _, model, size = _models("alexnet", ctx.process_group)
        batches = _batches(size, 2)
        split = model.features.conv2  # a tower conv, Shard(0) over the ranks
    else:  # its first parameter (the stem conv) is replicated
        _, model, size = _models(kind, ctx.process_group)
        batches = _batches(size, 2)
        split = model.layer1[0].conv2  # the grouped conv, Shard(0) over the ranks
    fp16 = torch.autocast("cpu", dtype=torch.float16, enabled=kind.endswith("fp16"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    params = [name for name, _ in model.named_parameters()]
    before = {k: v.clone() for k, v in mpgroups.full_state_dict(model).items() if k in params}
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        with fp16:
            out = model(_input(model, x))
            loss = out.sum() if y is None else F.cross_entropy(out, y)
        scaler.scale(loss).backward()
        if step == 0 and ctx.rank == ctx.world_size - 1:
            split.weight.grad.to_local().view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        after = mpgroups.full_state_dict(model)
        moved = [key for key, value in before.items() if not torch.equal(after[key], value)]
        if step == 0:  # skipped everywhere, the scale halved everywhere
            assert scaler.get_scale() == 2.0**7 and not moved, moved
        else:  # the next, finite step is taken on every rank
            assert moved


@pytest.mark.parametrize("kind", ["auto", "auto-memory", "alexnet-fp16", "styles"])
def test_grad_scaler_skips_the_step_on_every_rank(pool, kind):
    """fp16: the AlexNet's forward under CPU autocast to float16, as GradScaler is used."""
    pool.run(_grad_scaler, 2, kind)


# DCP: the files hold the single-device tensors and move between world sizes and meshes.


def _optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    return _OPTIMIZERS[name](model.parameters())


def _train(model: nn.Module, optimizer, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(_input(model, x)), y).backward()
        optimizer.step()


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }


def _load_dcp(model, optimizer, path: str, process_group) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=path, process_group=process_group)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def _copy(state: dict) -> dict:
    """Entries a rank holds whole are its tensors themselves, as in ``state_dict()``."""
    return {key: value.clone() for key, value in state.items()}


def _dcp_save(ctx, kind: str, path: str, opt_name: str) -> dict:
    """Two steps, a DCP save of model and optimizer, two more steps."""
    import torch.distributed.checkpoint as dcp

    _, model, size = _models(kind, ctx.process_group)
    optimizer = _optimizer(model, opt_name)
    batches = _batches(size, 4)
    _train(model, optimizer, batches[:2])
    saved = _copy(mpgroups.full_state_dict(model))
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=path, process_group=ctx.process_group)
    _train(model, optimizer, batches[2:])
    return {"saved": saved, "final": _copy(mpgroups.full_state_dict(model))}


def _dcp_resume(ctx, kind: str, path: str, opt_name: str, on_mesh: bool) -> dict:
    """A model initialised otherwise loads the checkpoint and trains the last two steps:
    over this world's group, or on the 2 x 2 mesh under FSDP2 (each dp rank its half of
    every batch, the global batch's statistics)."""
    torch.manual_seed(5)
    if on_mesh:
        from test_mesh import _mesh
        from torch.distributed.fsdp import fully_shard

        mesh = _mesh()
        _, model, size = _models(kind, mesh["gp"])
        mpgroups.match_global_batch(model, mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp_rank, group = mesh["dp"].get_local_rank(), None
    else:
        _, model, size = _models(kind, ctx.process_group)
        dp_rank, group = None, ctx.process_group
    optimizer = _optimizer(model, opt_name)
    batches = _batches(size, 4)
    _train(model, optimizer, batches[:1])  # optimizer state to load into
    _load_dcp(model, optimizer, path, group)
    loaded = _copy(mpgroups.full_state_dict(model))
    if dp_rank is not None:  # the mean over dp of each half's mean loss: the batch's
        batches = [
            (x[2 * dp_rank : 2 * dp_rank + 2], y[2 * dp_rank : 2 * dp_rank + 2]) for x, y in batches
        ]
    _train(model, optimizer, batches[2:])
    return {"loaded": loaded, "final": _copy(mpgroups.full_state_dict(model))}


@pytest.mark.parametrize("kind, opt_name", [("auto", "adamw"), ("alexnet", "sgd-momentum")])
def test_dcp_checkpoint_is_the_single_device_model_and_resumes_anywhere(
    pool, tmp_path, kind, opt_name
):
    """Written at P = 2: ``dcp_to_torch_save`` gives the plain model's file (``strict=True``,
    values equal); loaded at P = 4, at P = 2, on one device (no process group) and on the
    2 x 2 mesh under FSDP2, training resumes as the uninterrupted run."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp_path / "dcp")
    saved = pool.run(_dcp_save, 2, kind, path, opt_name)[0]
    dcp_to_torch_save(path, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    plain, _, size = _models(kind, None)
    plain.load_state_dict(whole["model"], strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, saved["saved"][key]), key
    # One device, no process group: DCP reads the same files into the plain model.
    torch.manual_seed(5)
    plain, _, _ = _models(kind, None)
    optimizer = _optimizer(plain, opt_name)
    _train(plain, optimizer, _batches(size, 1))
    _load_dcp(plain, optimizer, path, None)
    _train(plain, optimizer, _batches(size, 4)[2:])
    runs = {"P=1": {"final": plain.state_dict(), "loaded": None}}
    runs["P=4"] = pool.run(_dcp_resume, 4, kind, path, opt_name, False)[0]
    runs["P=2"] = pool.run(_dcp_resume, 2, kind, path, opt_name, False)[0]
    runs["2x2 FSDP2"] = pool.run(_dcp_resume, 4, kind, path, opt_name, True)[0]
    for where, run in runs.items():
        for key, value in saved["saved"].items():
            if run["loaded"] is not None:
                assert torch.equal(run["loaded"][key], value), (where, key)
        for key, value in saved["final"].items():
            if value.is_floating_point():
                assert_close(run["final"][key], value, TOL, f"{where} {key}")


# 2-D: FSDP2 over dp, mpgroups over gp (or the styles over tp), clipping included.


def _clipped_on_mesh(ctx, kind: str) -> list[float]:
    """3 SGD steps with clip_grad_norm_ active on the 2 x 2 mesh; each dp rank its half of
    a global batch of 4. Returns the largest relative difference to one device."""
    from test_mesh import _mesh
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    dp_rank = mesh["dp"].get_local_rank()
    if kind == "styles":
        plain, model = _styles_block(mesh["gp"])
        generator = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(4, 5, 6, dtype=torch.float64, generator=generator),
             torch.randn(4, 5, 6, dtype=torch.float64, generator=generator))
            for _ in range(3)
        ]  # fmt: skip
        loss_of = F.mse_loss
    else:
        plain, model, size = _models(kind, mesh["gp"])
        mpgroups.match_global_batch(model, mesh["dp"])
        batches = _batches(size, 3)
        loss_of = F.cross_entropy
    fully_shard(model, mesh=mesh["dp"])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, model)]
    half = slice(2 * dp_rank, 2 * dp_rank + 2)
    for x, y in batches:
        for net, opt, rows in zip((plain, model), optimizers, (slice(None), half), strict=True):
            opt.zero_grad()
            loss_of(net(_input(net, x[rows])), y[rows]).backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm=0.05)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
        assert norm_ref > 0.05, "clipping must be active"
        assert_close(norm.full_tensor(), norm_ref, 1e-5, f"{kind} norm")
        for opt in optimizers:
            opt.step()
    _assert_single_device_state(model, plain, f"{kind} on the mesh")


@pytest.mark.parametrize("kind", ["alexnet", "auto", "styles"])
def test_fsdp2_on_a_2x2_mesh_clips_and_trains_as_one_device(pool, kind):
    pool.run(_clipped_on_mesh, 4, kind, timeout=120)


# Schedulers and an EMA of the weights, beside the rest of the loop.


def _ema_and_scheduler(ctx, kind: str) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    plain, model, size = _models(kind, ctx.process_group)
    runs = []
    for net in (plain, model):
        opt = _optimizer(net, "adamw")
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=5)
        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        runs.append((net, opt, scheduler, ema))
    for x, y in _batches(size, 5):
        for net, opt, scheduler, ema in runs:
            opt.zero_grad()
            F.cross_entropy(net(_input(net, x)), y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05)
            opt.step()
            scheduler.step()
            ema.update_parameters(net)
    (_, _, _, ema_ref), (_, _, _, ema) = runs
    assert all(isinstance(p, DTensor) for p in ema.module.parameters())
    full = mpgroups.full_state_dict(ema.module)
    for key, value in ema_ref.module.state_dict().items():
        if value.is_floating_point():
            assert_close(full[key], value, TOL, f"EMA {key}")
    x, _ = _batches(size, 1)[0]
    ema_ref.eval(), ema.eval()
    assert_close(ema(_input(ema, x)), ema_ref(_input(ema_ref, x)), TOL, "EMA forward")


@pytest.mark.parametrize("kind", ["auto", "alexnet"])
def test_ema_and_lr_scheduler_follow_one_device(pool, kind):
    """OneCycleLR, clipping and an ``AveragedModel`` EMA (a deep copy of the parallel model,
    averaged with foreach ops on its DTensors): the EMA equals the single-device EMA."""
    pool.run(_ema_and_scheduler, 2, kind)


# A model whose parallel layer the user placed by hand.


def _hand_placed(ctx) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, groups=4),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip
    model = copy.deepcopy(plain)
    model[3] = mpgroups.GroupParallelConv2d.from_conv(plain[3], ctx.process_group)
    assert mpgroups.distribute_parameters(model, ctx.process_group) is model
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, model)]
    for x, y in _batches(8, 3):
        norms = []
        for net, opt in zip((plain, model), optimizers, strict=True):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            norms.append(torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.05))
            opt.step()
        assert norms[0] > 0.05
        assert_close(norms[1].full_tensor(), norms[0], NORM_TOL, "hand-placed norm")
    _assert_single_device_state(model, plain, "hand-placed")
    # A layer split over another group is named.
    other = nn.Sequential(mpgroups.GroupParallelConv2d(8, 8, 1, groups=8, process_group=None))
    if ctx.world_size == 2:
        with pytest.raises(ValueError, match=r"'0.weight' is split over the ranks \[0, 1, 2, 3\]"):
            mpgroups.distribute_parameters(other, ctx.process_group)


@pytest.mark.parametrize("world_size", [2, 4])
def test_hand_placed_layers_with_distribute_parameters(pool, world_size):
    pool.run(_hand_placed, world_size)


def _local_view_grads(ctx) -> None:
    """The parameters' gradients arrive as torch's own ``to_local()`` would hand them, laid
    out as the local tensor whatever the gradient's layout (an expanded grad of a sum,
    channels_last), and accumulate over backward passes."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard

    from mpgroups.layers.dtensor_state import _LocalView

    mesh = DeviceMesh.from_group(ctx.process_group, "cpu")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        local = torch.randn(6, 4, 3, 3).contiguous(memory_format=memory_format)
        ours, torchs = (
            nn.Parameter(
                DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False,
                                   shape=(12, 4, 3, 3), stride=local.stride())
            )
            for _ in range(2)
        )  # fmt: skip
        weights = torch.randn(6, 4, 3, 3)
        for _ in range(2):
            _LocalView.apply(ours).sum().backward()  # an expanded gradient
            torchs.to_local().sum().backward()
            (_LocalView.apply(ours) * weights).sum().backward()
            (torchs.to_local() * weights).sum().backward()
        assert (
            ours.grad.placements == torchs.grad.placements and ours.grad.shape == torchs.grad.shape
        )
        assert torch.equal(ours.grad.to_local(), torchs.grad.to_local())
        assert ours.grad.to_local().stride() == local.stride()


def test_local_view_hands_back_gradients_as_torch_does(pool):
    pool.run(_local_view_grads, 2)


def _gradient_penalty(ctx) -> None:
    """Higher-order grads through the DTensor parameters: a penalty on the gradient of the
    loss with respect to every parameter (``create_graph=True``), then its backward."""
    plain, model, size = _models("drop-in", ctx.process_group)
    x, y = _batches(size, 1)[0]
    for net in (plain, model):
        params = list(net.parameters())
        loss = F.cross_entropy(net(_input(net, x)), y)
        first = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        if isinstance(penalty, DTensor):  # the norm of DTensor gradients: made whole
            penalty = penalty.full_tensor()
        penalty.backward()
    full = mpgroups.full_grad_dict(model)
    for key, param in plain.named_parameters():
        assert_close(full[key], param.grad, TOL, f"penalty grad {key}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_gradient_penalty_through_dtensor_parameters(pool, world_size):
    pool.run(_gradient_penalty, world_size)


def _dcp_save_on_mesh(ctx, path: str) -> dict:
    """One AdamW step on the 2 x 2 mesh (FSDP2 over dp), then a DCP save."""
    import torch.distributed.checkpoint as dcp
    from test_mesh import _mesh
    from torch.distributed.fsdp import fully_shard

    mesh = _mesh()
    _, model, size = _models("alexnet", mesh["gp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = _optimizer(model, "adamw")
    _train(model, optimizer, _batches(size, 1))
    saved = _copy(mpgroups.full_state_dict(model))
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=path)
    return saved


def test_dcp_checkpoint_written_on_a_2x2_mesh_is_the_single_device_model(pool, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp_path / "dcp")
    saved = pool.run(_dcp_save_on_mesh, 4, path)[0]
    dcp_to_torch_save(path, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    plain, _, _ = _models("alexnet", None)
    plain.load_state_dict(whole["model"], strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, saved[key]), key
