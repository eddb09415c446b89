"""A 2-D ``("dp", "gp")`` mesh at world size 4 (2 x 2): group parallel over ``mesh["gp"]``,
FSDP2 over ``mesh["dp"]`` (sharding parameters at rest, or holding them whole between forward
and backward as DDP does), and checkpoints that move between meshes. DDP itself takes plain
tensors only and refuses a parallelized model, whose parameters are DTensors, saying so.

What "equals the single-device model on the global batch" takes. Each dp rank gets its half
of a global batch of 8 (dp rank 0 the first 4 samples); the reference is the plain
``torch.nn`` model trained on all 8 on one device. Two things differ between those unless
they are made the same, and :func:`mpgroups.match_global_batch` makes them so:

* BatchNorm: each replica would normalise with its own half's statistics; converted, it
  all-reduces per-channel sums over dp and normalises with the global batch's (what
  ``nn.SyncBatchNorm`` does on GPUs; it does not run on CPU).
* Dropout: every rank is seeded alike (group-parallel dropout needs it: the gp ranks of one
  replica must drop the same features), so plain DP would draw the same masks on both
  replicas, and neither equals the mask one device draws for the 8 samples. Converted, every
  dp rank draws the mask of the whole global batch from the shared seed and keeps its rows:
  each sample is dropped exactly as the single device drops it. No seed differs per rank.

With those, losses and the final full state equal the reference's within 1e-4 (relative);
float32 throughout.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from models import TinyResNeXt

import mpgroups
from mpgroups import match_global_batch
from mpgroups.models import AlexNet

ALEXNET = dict(num_classes=10, in_channels=3, channels=(16, 32, 48, 48, 32), hidden=64)
STEPS = 10
GLOBAL_BATCH = 8
TOLERANCE = 1e-4
_MESHES: dict = {}  # one mesh per worker process, made once (all four ranks make it together)


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    if "2x2" not in _MESHES:
        _MESHES["2x2"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "gp"))
    return _MESHES["2x2"]


def _build(kind: str, process_group, *, parallel: bool = True, batch_norm: bool = False):
    """The seeded model of ``kind`` (parallelized over ``process_group``) and its image size."""
    torch.manual_seed(0)
    if kind == "alexnet":
        options = dict(ALEXNET, dropout=0.5, batch_norm=batch_norm)
        return AlexNet(process_group=process_group, parallel=parallel, **options), 32
    model = TinyResNeXt()
    if parallel:
        model = mpgroups.parallelize(model, process_group, plan="auto")
    return model, 8


def _data(size: int):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (STEPS, GLOBAL_BATCH), generator=generator)
    return x, y


def _wrap(model, mesh, wrapper: str):
    """``(module to call, parameters to optimise)`` of ``model`` under FSDP2 over dp
    (``"fsdp2-keep"``: ``reshard_after_forward=False``)."""
    from torch.distributed.fsdp import fully_shard

    match_global_batch(model, mesh["dp"])
    return fully_shard(model, mesh=mesh["dp"], reshard_after_forward=wrapper == "fsdp2"), model


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-12)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def _train_on_mesh(ctx, kind: str, wrapper: str) -> dict:
    mesh = _mesh()
    dp_rank, dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    model, size = _build(kind, mesh["gp"])
    plain_bytes = mpgroups.local_parameter_bytes(_build(kind, None, parallel=False)[0])
    net, model = _wrap(model, mesh, wrapper)
    optimizer = _sgd(model)  # after fully_shard: it replaces the parameters by DTensors
    x, y = _data(size)
    rows = slice(dp_rank * GLOBAL_BATCH // dp_size, (dp_rank + 1) * GLOBAL_BATCH // dp_size)
    losses = []
    torch.manual_seed(3)  # dropout: the same stream on every rank
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x[step, rows]), y[step, rows])
        loss.backward()
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())
        losses.append(total.item() / dp_size)
    full = mpgroups.full_state_dict(model)
    grads = mpgroups.full_grad_dict(model)  # the last step's, averaged over dp
    local_bytes = mpgroups.local_parameter_bytes(model)

    reference, _ = _build(kind, None, parallel=False)
    ref_optimizer = _sgd(reference)
    ref_losses = []
    torch.manual_seed(3)
    for step in range(STEPS):
        ref_optimizer.zero_grad()
        loss = F.cross_entropy(reference(x[step]), y[step])
        loss.backward()
        ref_optimizer.step()
        ref_losses.append(loss.item())
    expected = reference.state_dict()
    state_errors = {
        key: _relative(full[key], value)
        if value.is_floating_point()
        else float(not torch.equal(full[key], value))
        for key, value in expected.items()
        if key in full and full[key].shape == value.shape
    }
    state_errors |= {key: float("inf") for key in expected if key not in state_errors}
    for name, param in reference.named_parameters():
        got = grads.get(name)
        ok = got is not None and got.shape == param.grad.shape
        state_errors[f"grad of {name}"] = _relative(got, param.grad) if ok else float("inf")
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "keys": list(full) == list(expected),
        "state_errors": state_errors,
        "dtensor": any(type(p).__name__ == "DTensor" for p in model.parameters()),
        "bytes": (local_bytes, plain_bytes),
    }


@pytest.mark.parametrize("wrapper", ["fsdp2-keep", "fsdp2"])
@pytest.mark.parametrize("kind", ["alexnet", "resnext"])
def test_mesh_training_equals_one_device_on_the_global_batch(pool, kind, wrapper):
    """10 SGD (momentum) steps on the 2 x 2 mesh; see the module docstring for the seeding."""
    results = pool.run(_train_on_mesh, 4, kind, wrapper, timeout=240)
    for rank, result in enumerate(results):
        ref = result["ref_losses"]
        assert ref[-1] < ref[0], "the reference run must learn something"
        worst = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], ref, strict=True))
        assert worst <= TOLERANCE, (rank, worst, result["losses"], ref)
        assert result["keys"], "full_state_dict must have the plain model's keys, in order"
        errors = result["state_errors"]
        bad = {key: err for key, err in errors.items() if not err <= TOLERANCE}
        assert not bad, (rank, bad)
        local_bytes, plain_bytes = result["bytes"]
        assert result["dtensor"]
        # gp splits (nearly) every layer in two; FSDP2 splits each rank's part again over dp.
        share = local_bytes / plain_bytes
        assert share <= 0.3, share


def _ddp_refuses(ctx) -> str:
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    mesh = _mesh()
    model, size = _build("alexnet", mesh["gp"])
    reference, _ = _build("alexnet", None, parallel=False)
    with pytest.raises(TypeError, match="fully_shard") as info:
        DistributedDataParallel(model, process_group=mesh["dp"].get_group())
    # Given the mesh's dp dim, DDP first turns a model's DTensor parameters into plain ones
    # (torch's tensor-parallel hook-up); it must refuse before that, leaving the model whole.
    for given in (model, model.features):
        with pytest.raises(TypeError, match="fully_shard"):
            DistributedDataParallel(given, device_mesh=mesh["dp"])
    assert all(isinstance(p, DTensor) for p in model.parameters())
    x, y = _data(size)
    for loss in (F.cross_entropy(m.eval()(x[0]), y[0]) for m in (model, reference)):
        loss.backward()
    norms = [
        torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]) for m in (model, reference)
    ]
    torch.testing.assert_close(norms[0].full_tensor(), norms[1], rtol=1e-5, atol=0)
    # unparallelize gives back a plain model, which DDP takes.
    DistributedDataParallel(mpgroups.unparallelize(model), process_group=ctx.process_group)
    return str(info.value)


def test_ddp_refuses_a_parallelized_model_and_names_fsdp2(pool):
    message = pool.run(_ddp_refuses, 4)[0]
    assert "DTensors" in message and "mesh['dp']" in message


# Checkpoints on the mesh ------------------------------------------------------------------


def _record_writes(monkey_target, written: list):
    original = monkey_target.atomic_save

    def recording(obj, path, **kwargs):
        written.append(Path(path).name)
        return original(obj, path, **kwargs)

    monkey_target.atomic_save = recording
    return original


def _save_on_mesh(ctx, directory: str, wrapper: str, name_dp: bool) -> dict:
    """Train 3 steps with BatchNorm and dropout on the 2 x 2 mesh, then save full and sharded."""
    import mpgroups.state.checkpoint as checkpoint

    mesh = _mesh()
    dp_rank = mesh["dp"].get_local_rank()
    model, size = _build("alexnet", mesh["gp"], batch_norm=True)
    net, model = _wrap(model, mesh, wrapper)
    optimizer = _sgd(model)
    x, y = _data(size)
    rows = slice(dp_rank * 4, dp_rank * 4 + 4)
    torch.manual_seed(3)
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(net(x[step, rows]), y[step, rows]).backward()
        optimizer.step()
    full = mpgroups.full_state_dict(model, rank0_only=True)
    if ctx.rank == 0:
        mpgroups.atomic_save(full, f"{directory}/full.pt")
    written: list = []
    original = _record_writes(checkpoint, written)
    try:
        group = mesh["dp"] if name_dp else None
        mpgroups.save_sharded_state_dict(model, f"{directory}/sharded", data_parallel_group=group)
    finally:
        checkpoint.atomic_save = original
    return {"dp_rank": dp_rank, "written": written}


def _state_after_loading(ctx, directory: str, where: str) -> dict:
    """Load the sharded checkpoint on another mesh; the full state it then has."""
    sharded = f"{directory}/sharded"
    if where == "dp1_gp4":  # the whole world is one group-parallel replica
        model, _ = _build("alexnet", ctx.process_group, batch_norm=True)
        mpgroups.load_sharded_state_dict(model, sharded)
    elif where == "dp4_gp1":  # four replicas of the plain model under DDP
        from torch.nn.parallel import DistributedDataParallel

        model, _ = _build("alexnet", None, parallel=False, batch_norm=True)
        mpgroups.load_sharded_state_dict(model, sharded)
        DistributedDataParallel(model, process_group=ctx.process_group)
    else:  # back onto the 2 x 2 mesh, under FSDP2
        from torch.distributed.fsdp import fully_shard

        mesh = _mesh()
        model, _ = _build("alexnet", mesh["gp"], batch_norm=True)
        fully_shard(model, mesh=mesh["dp"])
        mpgroups.load_sharded_state_dict(model, sharded)
    return mpgroups.full_state_dict(model)


def _assert_same_state(state: dict, expected: dict, what: str) -> None:
    assert list(state) == list(expected), what
    for key, value in expected.items():
        if value.is_floating_point():
            assert _relative(state[key], value) <= 1e-6, (what, key)
        else:
            assert torch.equal(state[key], value), (what, key)


@pytest.mark.parametrize(
    "wrapper, name_dp",
    [("fsdp2-keep", True), ("fsdp2", False)],
    ids=["fsdp2-keep-dp-named", "fsdp2-dp-found"],
)
def test_checkpoint_written_on_2x2_loads_on_other_meshes(pool, tmp_path, wrapper, name_dp):
    saved = pool.run(_save_on_mesh, 4, str(tmp_path), wrapper, name_dp, timeout=180)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert files == ["shard-00000-of-00002.pt", "shard-00001-of-00002.pt"], files
    for rank, result in enumerate(saved):
        writes = result["dp_rank"] == 0
        expected = [f"shard-{rank % 2:05d}-of-00002.pt"] if writes else []
        assert result["written"] == expected, (rank, result)
    full = mpgroups.safe_load(tmp_path / "full.pt")
    plain = AlexNet(**ALEXNET, batch_norm=True, parallel=False)
    mpgroups.load_sharded_state_dict(plain, tmp_path / "sharded")
    _assert_same_state(plain.state_dict(), full, "plain model")
    for where in ("dp1_gp4", "dp4_gp1", "dp2_gp2_fsdp2"):
        states = pool.run(_state_after_loading, 4, str(tmp_path), where, timeout=120)
        for rank, state in enumerate(states):
            _assert_same_state(state, full, f"{where} rank {rank}")


def _copy_keeps_the_group(ctx) -> None:
    mesh = _mesh()
    model, _ = _build("resnext", mesh["gp"])
    match_global_batch(model, mesh["dp"])
    twin = copy.deepcopy(model)
    bn = twin.stem[1]
    assert bn._replicas is model.stem[1]._replicas, "copies share the data-parallel group"
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    out = model(x)
    torch.manual_seed(0)
    assert torch.equal(twin(x), out)


def test_a_converted_model_deep_copies(pool):
    pool.run(_copy_keeps_the_group, 4)
