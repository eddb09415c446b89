"""``parallelize(model, group, plan="spatial")`` on whole networks: a 2-D and a 3-D U-Net
(skip concatenations, BatchNorm, GroupNorm, InstanceNorm, transposed convs, upsampling) and a
classifier whose chain ends in a global pooling, each trained 10 SGD steps against one
device (float64), its state the plain model's; and what the plan refuses, by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from dist_harness import own_block, spatial_grid
from models import Bottleneck, TinyResNeXt
from torch import nn
from torch.distributed.tensor import DTensor, Shard

import mpgroups
from mpgroups.comm.collectives import all_reduce_sum
from mpgroups.models import UNet
from mpgroups.plans.parallelize import PlanError

STEPS = 10
MESH_STEPS = 5  # on a 2 x 2 mesh, whose layers are each tested against torch.nn as well
TOLERANCE = 1e-9


class Classifier(nn.Module):
    """Convs, pooling and dropout on the split image, then a global pooling (the chain's
    end), flatten and a linear head on the whole."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.3),
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False),
        )  # fmt: skip
        self.grid = nn.AdaptiveMaxPool2d((4, 3))  # to a global size: rows stay split
        self.pool = nn.AdaptiveAvgPool2d(1)  # to one row: the chain ends here
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.grid(self.features(x))), 1))


_MODELS = {
    "unet2d-transpose": (lambda: UNet(2, 2, "transpose", "batch"), (2, 2, 20, 12)),
    "unet2d-upsample": (lambda: UNet(2, 2, "upsample", "group"), (2, 2, 20, 12)),
    "unet3d": (lambda: UNet(3, 1, "upsample", "instance"), (2, 2, 10, 6, 6)),
    "unet3d-transpose": (lambda: UNet(3, 1, "transpose", "batch"), (1, 2, 10, 6, 4)),
    "classifier": (Classifier, (4, 3, 23, 16)),
    # split both ways on ("sp", "gp"): the blocks' channel groups over gp, rows over sp
    "resnext": (lambda: TinyResNeXt(channels=16, width=32), (2, 3, 9, 6)),
    "block": (lambda: Bottleneck(16, 32, groups=8), (2, 16, 9, 5)),
}


def _loss(out, target, whole_numel: int, group, split: bool):
    """The mean squared error of the whole output (a split output: this rank's part of it,
    the whole loss summed over the ranks for the record)."""
    part = (out - target).square().sum() / whole_numel
    whole = all_reduce_sum(part.detach(), group) if split else part.detach()
    return part, whole


def _train(ctx, kind: str, dtype: torch.dtype = torch.float64, mesh: str | None = None) -> None:
    """``mesh``: ``None`` (ctx's group splits the rows: ``STEPS`` steps), ``"grid"`` (2 × 2,
    rows and columns) or ``"sp-gp"`` (2 × 2, rows and channel groups): ``MESH_STEPS``."""
    build, shape = _MODELS[kind]
    tolerance = TOLERANCE if dtype == torch.float64 else 1e-4
    torch.manual_seed(0)
    plain = build().to(dtype)
    where, rows_group, loss_group = ctx.process_group, ctx.process_group, ctx.process_group
    if mesh == "grid":
        where = rows_group = spatial_grid()
    elif mesh == "sp-gp":
        where = spatial_grid(("sp", "gp"))
        rows_group = where["sp"]
        loss_group = rows_group.get_group()
    model = mpgroups.parallelize(copy.deepcopy(plain), where, plan="spatial")
    split_output = kind not in ("classifier", "resnext")
    if mesh == "sp-gp":  # every conv of the block split both ways: rows, and its channels
        block = model.layer1[0] if kind == "resnext" else model
        for conv in (block.conv1, block.conv2, block.conv3):
            assert type(conv).__name__ == "SplitRowsGroupParallelConv2d"
        assert block.conv2.weight.placements == (Shard(0),)
        assert block.conv2.weight.to_local().shape[0] == block.conv2.out_channels // 2
    if kind == "classifier":  # the adaptive pooling to (4, 3) keeps rows split; to 1 ends
        assert type(model.grid).__name__ == "SpatialAdaptiveMaxPool2d"
        assert type(model.pool) is nn.AdaptiveAvgPool2d
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (plain, model)]
    with torch.no_grad():
        out_shape = copy.deepcopy(plain).eval()(torch.zeros(shape, dtype=dtype)).shape
    generator = torch.Generator().manual_seed(1)
    for step in range(STEPS if mesh is None else MESH_STEPS):
        x = torch.randn(shape, generator=generator, dtype=dtype)
        target = torch.randn(out_shape, generator=generator, dtype=dtype)
        losses, norms = [], []
        for i, (m, optimizer) in enumerate(zip((plain, model), optimizers, strict=True)):
            torch.manual_seed(100 + step)  # every rank and the device draw one dropout mask
            optimizer.zero_grad()
            split = i == 1
            inputs = mpgroups.spatial_shard(x, rows_group) if split else x
            out = m(inputs)
            goal = target
            if split and split_output:
                goal = own_block(ctx, target, mesh)
            part, whole = _loss(out, goal, target.numel(), loss_group, split and split_output)
            part.backward()
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.5)
            # (a DTensor where channel groups are split: the norm over every rank's shards)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
            optimizer.step()
            losses.append(whole)
        torch.testing.assert_close(losses[1], losses[0], rtol=tolerance, atol=tolerance)
        # clipping (active: the norms are about 1 to 2) sees one device's gradients on every rank
        torch.testing.assert_close(norms[1], norms[0], rtol=tolerance, atol=tolerance)
    state, plain_state = mpgroups.full_state_dict(model), plain.state_dict()
    assert list(state) == list(plain_state)
    for key, value in plain_state.items():
        torch.testing.assert_close(state[key], value, rtol=tolerance, atol=tolerance)
    back = mpgroups.unparallelize(model)
    leaves = [m for m in back.modules() if next(m.children(), None) is None]
    assert all(type(m).__module__.startswith("torch.nn") for m in leaves)
    back.load_state_dict(plain_state)
    back.eval(), plain.eval()
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(back(x), plain(x), rtol=tolerance, atol=tolerance)


# Every model at P = 2 or 4, the 2-D U-Net with transposed convs at both.
_RUNS = [
    ("unet2d-transpose", 2),
    ("unet2d-transpose", 4),
    ("unet2d-upsample", 2),
    ("unet3d", 4),
    ("unet3d-transpose", 2),
    ("classifier", 2),  # at 4 ranks on the 2 x 2 grid below
]


@pytest.mark.parametrize("kind, world_size", _RUNS)
def test_spatial_plan_trains_as_one_device(pool, kind, world_size):
    pool.run(_train, world_size, kind)


@pytest.mark.parametrize("kind", ["unet2d-transpose", "unet3d", "classifier"])
def test_spatial_plan_on_a_2x2_grid_trains_as_one_device(pool, kind):
    pool.run(_train, 4, kind, torch.float64, "grid")


@pytest.mark.parametrize("kind", ["resnext", "block"])
def test_rows_and_channel_groups_split_both_ways_train_as_one_device(pool, kind):
    pool.run(_train, 4, kind, torch.float64, "sp-gp")


@pytest.mark.parametrize("kind, world_size", [("unet2d-transpose", 2), ("unet3d", 4)])
def test_spatial_plan_trains_as_one_device_in_float32(pool, kind, world_size):
    pool.run(_train, world_size, kind, torch.float32)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.conv(x), 1)  # on the rows alone: refused


def _saved_per_rank(ctx, kind: str) -> tuple[int, int, int]:
    from activation_memory import saved_bytes

    build, shape = _MODELS[kind]
    torch.manual_seed(0)
    plain = build().double()
    model = mpgroups.parallelize(copy.deepcopy(plain), ctx.process_group, plan="spatial")
    x = torch.randn(shape, dtype=torch.float64)
    single = saved_bytes(plain, x, None)["activations"]
    with mpgroups.CommCounter() as comm:
        mine = saved_bytes(model, mpgroups.spatial_shard(x, ctx.process_group), None)
    halos = sum(r.nbytes for r in comm.records if r.op == "halo_exchange")
    return single, mine["activations"], halos


@pytest.mark.parametrize("kind, world_size", [("unet2d-transpose", 2), ("unet3d", 4)])
def test_a_rank_saves_its_share_of_activations_plus_the_halos(pool, kind, world_size):
    """Bytes one training forward saves for backward, per rank: at most one device's over P
    plus every halo row the ranks exchanged (forward and backward, all ranks: a bound)."""
    results = pool.run(_saved_per_rank, world_size, kind)
    every_halo = sum(halos for _, _, halos in results)
    for single, mine, _ in results:
        assert mine <= single / world_size + every_halo


def _one_check_per_forward(ctx, grid: bool) -> dict:
    from mpgroups.comm.checks import InputMismatchError

    torch.manual_seed(0)
    where = spatial_grid() if grid else ctx.process_group
    plain = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.GroupNorm(2, 4), nn.MaxPool2d(3, 1, 1),
    ).double()  # fmt: skip
    model = mpgroups.parallelize(copy.deepcopy(plain), where, plan="spatial")
    counts = {}
    # 20 rows, then 19: rank 0 holds 10 rows both times at P = 2, the others do not; every
    # layer must still see the new total (the root's agreed total is part of its key); on
    # the grid, 12 columns then 11 as well
    for rows in (20, 20, 19, 19):
        columns = rows - 8 if grid else 12
        x = torch.randn(2, 2, rows, columns, dtype=torch.float64)
        with mpgroups.CommCounter() as comm:
            out = model(mpgroups.spatial_shard(x, where))
        own = own_block(ctx, plain(x), "grid" if grid else None)
        torch.testing.assert_close(out, own, rtol=TOLERANCE, atol=TOLERANCE)
        counts.setdefault(rows, []).append(comm.count("input_check", kind="check"))
    # a rank with a row (a column) too many: the root raises on every rank, before any halo
    block = mpgroups.spatial_shard(torch.randn(2, 2, 20, 12, dtype=torch.float64), where)
    if ctx.rank == 1:
        dim = 3 if grid else 2
        block = torch.cat([block, block.narrow(dim, 0, 1)], dim=dim)
    with mpgroups.CommCounter() as comm, pytest.raises(InputMismatchError) as info:
        model(block)
    assert comm.count("halo_exchange") == 0
    counts["message"] = str(info.value)
    return counts


@pytest.mark.parametrize("grid", [False, True], ids=["rows", "grid"])
def test_a_split_model_checks_once_per_forward_at_its_root(pool, grid):
    for counts in pool.run(_one_check_per_forward, 4 if grid else 2, grid):
        # a new total: the root and every layer check once; then the root alone
        assert counts[20][1] == counts[19][1] == 1 < counts[20][0] == counts[19][0]
        total = "20 × 13" if grid else "21"
        assert "model's input" in counts["message"], counts["message"]
        assert f"balanced blocks of {total} rows" in counts["message"], counts["message"]


def _split_setup(ctx, mesh: str | None):
    """``(where, rows_group, plain model, input)`` for ``mesh`` (as in :func:`_train`): a
    U-Net on rows or on the grid; a ResNeXt bottleneck split both ways on ``"sp-gp"``."""
    torch.manual_seed(0)
    if mesh == "sp-gp":
        where = spatial_grid(("sp", "gp"))
        plain = Bottleneck(16, 32, groups=8).double()
        return where, where["sp"], plain, torch.randn(2, 16, 9, 5, dtype=torch.float64)
    where = spatial_grid() if mesh == "grid" else ctx.process_group
    plain = UNet(2, 1, "upsample", "group").double()
    return where, where, plain, torch.randn(2, 2, 16, 8, dtype=torch.float64)


def _habits(ctx, mesh: str | None) -> None:
    where, rows_group, plain, x = _split_setup(ctx, mesh)
    model = mpgroups.parallelize(copy.deepcopy(plain), where, plan="spatial")
    expected = own_block(ctx, plain(x), mesh).detach()
    block = mpgroups.spatial_shard(x, rows_group)

    def close(out, tolerance=TOLERANCE):
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)

    with torch.no_grad():
        close(model(block))
    with torch.inference_mode():
        close(model(block))
    close(copy.deepcopy(model)(block))  # an EMA's copy shares the groups
    close(model(block.contiguous(memory_format=torch.channels_last)))
    close(model(block.transpose(2, 3).contiguous().transpose(2, 3)))  # non-contiguous
    if mesh is not None:
        return  # compiled on rows alone: dynamo's graphs around every exchange take seconds
    # torch.compile (eager backend: dynamo's graphs around the exchanges), on a small stack
    torch.manual_seed(1)
    stack = nn.Sequential(nn.Conv2d(x.shape[1], 4, 3, padding=1, groups=2), nn.ReLU())
    stack = nn.Sequential(*stack, nn.MaxPool2d(3, 1, 1)).double()
    split = mpgroups.parallelize(copy.deepcopy(stack), where, plan="spatial")
    compiled = torch.compile(split, backend="eager")(block)
    own = own_block(ctx, stack(x), mesh)
    torch.testing.assert_close(compiled, own, rtol=TOLERANCE, atol=TOLERANCE)
    # a bad batch on one rank that the loop catches, then the loop goes on in step
    from mpgroups.comm.checks import InputMismatchError

    bad = block[:, :1] if ctx.rank == 0 else block
    with pytest.raises((InputMismatchError, ValueError)):
        model(bad)
    close(model(block))


@pytest.mark.parametrize("mesh", [None, "grid", "sp-gp"], ids=["rows", "grid", "sp-gp"])
def test_spatial_plan_under_user_habits(pool, mesh):
    pool.run(_habits, 2 if mesh is None else 4, mesh)


def _loop(ctx, mesh: str | None, path: str) -> dict:
    """AdamW steps under a GradScaler (one step of them skipped for an inf on one rank
    alone), then a DCP save of the model: every rank as one device."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    where, rows_group, plain, x = _split_setup(ctx, mesh)
    model = mpgroups.parallelize(copy.deepcopy(plain), where, plan="spatial")
    runs, out_channels = [], copy.deepcopy(plain).eval()(x).shape[1]
    for m, split in ((plain, False), (model, True)):
        optimizer = torch.optim.AdamW(m.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for step in range(3):
            batch = x * (step + 1)
            inputs = mpgroups.spatial_shard(batch, rows_group) if split else batch
            # the first element inf: in rank 0's block only (and its channel replicas'),
            # every rank skips the step
            holds_it = ctx.rank < 2 if mesh == "sp-gp" else ctx.rank == 0
            if step == 1 and (not split or holds_it):
                inputs = inputs.clone()
                inputs[0, 0, 0, 0] = float("inf")
            optimizer.zero_grad()
            # this rank's share of the whole output's mean square (its rows' sum / the whole)
            loss = m(inputs).square().sum() / (x.numel() // x.shape[1] * out_channels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        runs.append(scaler.get_scale())
    assert runs[0] == runs[1] == 2.0**7, runs  # the inf step skipped and halved the scale
    state, plain_state = mpgroups.full_state_dict(model), plain.state_dict()
    for key, value in plain_state.items():  # (the inf batch leaves BatchNorm's statistics nan)
        torch.testing.assert_close(state[key], value, rtol=1e-8, atol=1e-8, equal_nan=True, msg=key)
    group = ctx.process_group if mesh is None else None  # a 2 x 2 mesh: the default group
    dcp.save(get_model_state_dict(model), checkpoint_id=path, process_group=group)
    return {key: value.clone() for key, value in plain_state.items()}


def _gates(ctx, mesh: str | None) -> None:
    """Squeeze-and-excitation on the split rows: the gate's gradient summed where it meets
    them, so every gradient is one device's (found by review: each rank's share before)."""
    torch.manual_seed(0)
    channels = 8 if mesh == "sp-gp" else 3
    if mesh == "sp-gp":
        where = spatial_grid(("sp", "gp"))
        rows = where["sp"]
        plain = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), _Gate(8)).double()
    else:
        where = rows = spatial_grid() if mesh == "grid" else ctx.process_group
        plain = _Gate(3).double()
    model = mpgroups.parallelize(copy.deepcopy(plain), where, plan="spatial")
    x = torch.randn(2, channels, 7, 5, dtype=torch.float64)
    out = plain(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    split_out = model(mpgroups.spatial_shard(x, rows))
    torch.testing.assert_close(split_out, own_block(ctx, out, mesh).detach(), rtol=TOLERANCE,
                               atol=TOLERANCE)  # fmt: skip
    split_out.backward(own_block(ctx, grad, mesh))
    grads = mpgroups.full_grad_dict(model)
    for name, parameter in plain.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=TOLERANCE, atol=TOLERANCE,
                                   msg=name)  # fmt: skip


@pytest.mark.parametrize("mesh", [None, "grid", "sp-gp"], ids=["rows", "grid", "sp-gp"])
def test_a_squeeze_and_excitation_gate_has_one_device_gradients(pool, mesh):
    pool.run(_gates, 2 if mesh is None else 4, mesh)


def _channel_dropouts(ctx) -> str:
    """Between layers whose channels gp splits: a channel dropout's mask is the same for
    any rows (taken as it is); an elementwise one is refused by name."""
    where = spatial_grid(("sp", "gp"))

    def stack(dropout):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(16, 32, 1), nn.ReLU(), dropout, nn.Conv2d(32, 32, 3, padding=1, groups=8),
            nn.Conv2d(32, 16, 1),
        ).double()  # fmt: skip

    plain = stack(nn.Dropout2d(0.3))
    model = mpgroups.parallelize(copy.deepcopy(plain), where, plan="spatial")
    x = torch.randn(2, 16, 9, 5, dtype=torch.float64)
    torch.manual_seed(3)
    expected = own_block(ctx, plain(x), "sp-gp")
    torch.manual_seed(3)  # every rank and the device draw one mask
    out = model(mpgroups.spatial_shard(x, where["sp"]))
    torch.testing.assert_close(out, expected, rtol=TOLERANCE, atol=TOLERANCE)
    with pytest.raises(PlanError) as info:
        mpgroups.parallelize(stack(nn.Dropout(0.3)), where, plan="spatial")
    return str(info.value)


def test_channel_dropouts_split_both_ways_and_an_elementwise_one_is_refused(pool):
    message = pool.run(_channel_dropouts, 4)[0]
    assert "'2' (an nn.Dropout between layers whose channels" in message


@pytest.mark.parametrize("mesh", [None, "grid", "sp-gp"], ids=["rows", "grid", "sp-gp"])
def test_adamw_gradscaler_and_dcp_see_one_device(pool, tmp_path, mesh):
    """The loop users write, unchanged: AdamW under a GradScaler trains as one device, and
    the DCP checkpoint is the plain model's file (``strict=True``, values equal)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp_path / "dcp")
    expected = pool.run(_loop, 2 if mesh is None else 4, mesh, path)[0]
    dcp_to_torch_save(path, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert sorted(whole) == sorted(expected)  # DCP writes its own order
    for key, value in expected.items():
        torch.testing.assert_close(whole[key], value, rtol=1e-8, atol=1e-8, equal_nan=True, msg=key)


class _LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((1, 2, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gamma * self.conv(x)


class _Subsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)[:, :, ::2]


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.shape[2] > 4 else x


class _Gate(nn.Module):
    """Squeeze-and-excitation: a whole-image gate brought back onto the split rows
    (``also_returned``: the gate returned besides, a use the plan cannot sum)."""

    def __init__(self, channels: int = 2, also_returned: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1)
        self.also_returned = also_returned

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.fc(self.pool(y)))
        return (y * gate, gate) if self.also_returned else y * gate


def _refusals(ctx) -> list[str]:
    messages = []
    unknown = nn.Sequential(nn.Conv2d(2, 2, 3), nn.LayerNorm(4))
    models = (unknown, _Functional(), _LayerScale(), _Subsample(), _Untraceable())
    models += (_Gate(also_returned=True),)
    for model in models:
        with pytest.raises(PlanError) as info:
            mpgroups.parallelize(model, ctx.process_group, plan="spatial")
        messages.append(str(info.value))
    return messages


def test_spatial_plan_refuses_what_would_see_only_its_rows(pool):
    """An unknown module, functional pooling, a container's own parameters, indexing along
    the rows, a forward torch.fx cannot trace: each would compute on a block as on the whole;
    a gate gathered from the whole image, brought back onto the rows and returned as well,
    whose gradient the plan cannot sum where it meets the rows only."""
    messages = pool.run(_refusals, 2)[0]
    assert "'1' (LayerNorm)" in messages[0]
    assert "adaptive_avg_pool2d" in messages[1]
    assert "_LayerScale''s own parameters (gamma)" in messages[2]
    assert "indexing" in messages[3] and "slice(None, None, 2)" in messages[3]
    assert "tracing it with torch.fx" in messages[4]
    assert "computed after 'pool'" in messages[5] and "at 'mul'" in messages[5]


class _Switchable(nn.Module):
    """A forward whose path an attribute picks (traced as it was at parallelize time)."""

    def __init__(self) -> None:
        super().__init__()
        self.trim = nn.Conv2d(2, 2, (2, 1))  # valid along rows: L -> L - 1
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.trims = False

    def forward(self, x):
        return self.conv(self.trim(x) if self.trims else x)


def _frozen_norms_and_paths(ctx) -> None:
    torch.manual_seed(0)
    frozen = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Conv2d(4, 2, 1),
    ).double()  # fmt: skip
    with torch.no_grad():
        frozen(torch.randn(2, 2, 14, 6, dtype=torch.float64))  # running statistics
    frozen.eval()  # fine-tuning with frozen statistics: the affine grads still sum
    model = mpgroups.parallelize(copy.deepcopy(frozen), ctx.process_group, plan="spatial")
    x = torch.randn(2, 2, 14, 6, dtype=torch.float64)
    frozen(x).square().sum().backward()
    model(mpgroups.spatial_shard(x, ctx.process_group)).square().sum().backward()
    for (name, mine), theirs in zip(model.named_parameters(), frozen.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    # the path switched between forwards: rank 0's block keeps its shape (10 rows of 20, then
    # of 19) while the total changes; every layer still learns the new total
    torch.manual_seed(1)
    plain = _Switchable().double()
    model = mpgroups.parallelize(copy.deepcopy(plain), ctx.process_group, plan="spatial")
    x = torch.randn(1, 2, 20, 5, dtype=torch.float64)
    block = mpgroups.spatial_shard(x, ctx.process_group)
    for trims in (False, True, False, True):
        plain.trims = model.trims = trims
        with torch.no_grad():
            own = torch.tensor_split(plain(x), ctx.world_size, dim=2)[ctx.rank]
            torch.testing.assert_close(model(block), own, rtol=TOLERANCE, atol=TOLERANCE)


def test_frozen_norms_sum_their_grads_and_a_switched_path_never_pairs_stale_totals(pool):
    pool.run(_frozen_norms_and_paths, 2)


def _autocast(ctx) -> None:
    torch.manual_seed(0)
    plain = UNet(2, 1, "transpose", "group")
    model = mpgroups.parallelize(copy.deepcopy(plain), ctx.process_group, plan="spatial")
    x = torch.randn(2, 2, 16, 8)
    outs = []
    for m, inputs in ((plain, x), (model, mpgroups.spatial_shard(x, ctx.process_group))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(inputs)
        out.float().square().sum().backward()
        outs.append(out)
    own = torch.tensor_split(outs[0], ctx.world_size, dim=2)[ctx.rank]
    assert outs[1].dtype == own.dtype == torch.bfloat16
    torch.testing.assert_close(outs[1].float(), own.float(), rtol=3e-2, atol=3e-2)
    for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        # bfloat16 rounds differently on a block than on the whole: compare as a whole
        assert (mine.grad - theirs.grad).norm() <= 5e-2 * theirs.grad.norm()


def test_spatial_plan_under_bfloat16_autocast(pool):
    pool.run(_autocast, 2)


class _AuxHead(nn.Module):
    """A classification head computed before the segmentation output: the split rows reach
    a conv after the first chain end in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.cls = nn.Linear(4, 3)
        self.seg = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        features = self.body(x)
        return self.cls(torch.flatten(self.pool(features), 1)), self.seg(features)


def _aux_head(ctx) -> None:
    torch.manual_seed(0)
    plain = _AuxHead().double()
    model = mpgroups.parallelize(copy.deepcopy(plain), ctx.process_group, plan="spatial")
    assert type(model.seg).__name__ == "SpatialConv2d" and type(model.cls) is nn.Linear
    x = torch.randn(2, 2, 14, 6, dtype=torch.float64)
    classes, segments = plain(x)
    (classes.square().sum() + segments.square().sum()).backward()
    my_classes, my_segments = model(mpgroups.spatial_shard(x, ctx.process_group))
    own = torch.tensor_split(segments, ctx.world_size, dim=2)[ctx.rank]
    torch.testing.assert_close(my_segments, own.detach(), rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(my_classes, classes.detach(), rtol=TOLERANCE, atol=TOLERANCE)
    # the whole logits on every rank, each computing their whole loss (the gather's backward
    # takes each rank's rows of its gradient); the segments' loss, this rank's rows' share
    (my_classes.square().sum() + my_segments.square().sum()).backward()
    for (name, mine), theirs in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


def test_split_rows_reach_a_layer_after_a_chain_end(pool):
    pool.run(_aux_head, 2)
