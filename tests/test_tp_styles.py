"""``GroupwiseParallel`` and ``ChannelwiseNorm`` under torch's ``parallelize_module``.

A Mamba-style block (in_proj → depthwise causal Conv1d → SiLU → GroupNorm over heads →
gate → out_proj) parallelized with ColwiseParallel / GroupwiseParallel / ChannelwiseNorm /
RowwiseParallel equals the single-device block at P = 2 and 4, forward and every grad, and
the only collectives are torch's own (mpgroups counts none; ``CommDebugMode`` sees only
all-reduces). A grouped Conv2d with G >= P and G < P and a BatchNorm2d, DTensor in and out;
layouts and sizes that are refused; the habits of PyTorch users (grad modes, non-contiguous
input, ``copy.deepcopy``, an optimizer step, the state dict).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from parity import assert_close
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import mpgroups
from mpgroups.plans.tp_styles import ChannelwiseNorm, GroupwiseParallel, dtensor_channel_slices

TOL = 1e-10  # float64 throughout


def _mesh(ctx):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(ctx.process_group, "cpu")


class MambaStyleBlock(nn.Module):
    """Model code only, no parallel code: ``u [B, L, d] -> [B, L, d]``.

    ``in_proj`` makes ``x`` and ``z`` in one Linear (``[x; z]`` rows), or in two
    (``split_in_proj``: ``in_proj_x``, ``in_proj_z``); ``x`` goes through a depthwise causal
    conv over the sequence (``padding=k-1``, truncated to ``L``), SiLU and a GroupNorm over
    ``heads`` heads, gated by ``silu(z)``, then ``out_proj``.
    """

    def __init__(
        self, d: int = 6, e: int = 8, kernel: int = 4, heads: int = 4, split_in_proj=False
    ) -> None:
        super().__init__()
        f64 = {"dtype": torch.float64}
        if split_in_proj:
            self.in_proj_x, self.in_proj_z = nn.Linear(d, e, **f64), nn.Linear(d, e, **f64)
        else:
            self.in_proj = nn.Linear(d, 2 * e, **f64)
        self.conv = nn.Conv1d(e, e, kernel, groups=e, padding=kernel - 1, **f64)
        self.act = nn.SiLU()
        self.norm = nn.GroupNorm(heads, e, **f64)
        self.out_proj = nn.Linear(e, d, **f64)
        with torch.no_grad():  # not the identity affine of a fresh GroupNorm
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, u):
        length = u.shape[1]
        if hasattr(self, "in_proj"):
            # Under ColwiseParallel a rank's output features are its rows of in_proj: with
            # the rows in rank-major order (tp_row_order) its chunks are its x and z.
            x, z = self.in_proj(u).chunk(2, dim=-1)  # [B, L, e] each; [B, L, e/P] per rank
        else:
            x, z = self.in_proj_x(u), self.in_proj_z(u)
        x = self.act(self.conv(x.transpose(1, 2))[..., :length])  # [B, e, L], non-contiguous in
        y = self.norm(x) * F.silu(z.transpose(1, 2))
        return self.out_proj(y.transpose(1, 2))


def tp_row_order(e: int, world_size: int) -> torch.Tensor:
    """The order of the fused ``in_proj``'s ``2e`` output rows under tensor parallelism.

    ColwiseParallel gives rank ``r`` the ``r``-th contiguous chunk of rows. A single
    ``[x; z]`` Linear would hand rank 0 all of ``x`` at P=2; real Mamba TP code (mamba_ssm's
    column-parallel ``in_proj``) lays the fused weight out rank-major instead,
    ``[x_0; z_0; x_1; z_1; ...]``, so that each rank's chunk splits into its ``x`` and ``z``
    channels and the model code stays ``in_proj(u).chunk(2, dim=-1)`` on the *local* output
    (``use_local_output=True``, ColwiseParallel's default). At P=1 this is the identity.
    """
    per_rank = e // world_size
    rows = []
    for r in range(world_size):
        rows += list(range(r * per_rank, (r + 1) * per_rank))
        rows += list(range(e + r * per_rank, e + (r + 1) * per_rank))
    return torch.tensor(rows)


def _parallel_block(ref: MambaStyleBlock, mesh, world_size: int, row_order=None) -> nn.Module:
    """The block under ``parallelize_module``. Fused ``in_proj``: the issue's plan, local
    tensors between the modules. Split ``in_proj_x``/``in_proj_z``: DTensors all the way
    (``use_local_output=False``): ``x`` arrives at the conv as ColwiseParallel's ``Shard(-1)``
    of ``[B, L, e]`` transposed, i.e. ``Shard(1)`` of ``[B, e, L]``."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    block = copy.deepcopy(ref)
    if hasattr(ref, "in_proj"):
        order = tp_row_order(ref.conv.in_channels, world_size) if row_order is None else row_order
        with torch.no_grad():
            block.in_proj.weight.copy_(ref.in_proj.weight[order])
            block.in_proj.bias.copy_(ref.in_proj.bias[order])
        plan = {
            "in_proj": ColwiseParallel(),
            "conv": GroupwiseParallel(),
            "norm": ChannelwiseNorm(),
            "out_proj": RowwiseParallel(),
        }
    else:
        plan = {
            "in_proj_*": ColwiseParallel(use_local_output=False),
            "conv": GroupwiseParallel(use_local_output=False),
            "norm": ChannelwiseNorm(use_local_output=False),
            "out_proj": RowwiseParallel(),
        }
    return parallelize_module(block, mesh, plan)


def _full(value, key: str, order: torch.Tensor) -> torch.Tensor:
    """A gathered entry as the single-device block holds it: DTensors made whole, in_proj's
    rows put back in ``[x; z]`` order."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if key.startswith("in_proj."):
        value = value[torch.argsort(order)]
    return value


def _assert_dict_close(actual: dict, expected: dict, order, what: str) -> None:
    assert list(actual) == list(expected), (what, list(actual), list(expected))
    for key, value in expected.items():
        assert_close(_full(actual[key], key, order), value, TOL, f"{what} {key}")


def _torch_ops(mode) -> dict[str, int]:
    """``{op name: count}`` of the collectives a ``CommDebugMode`` saw (torch's and, through
    the c10d ops, mpgroups' too)."""
    return {str(op): n for op, n in mode.get_comm_counts().items() if n}


def _mamba_block(ctx, split_in_proj: bool) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    world, mesh = ctx.world_size, _mesh(ctx)
    torch.manual_seed(0)
    ref = MambaStyleBlock(split_in_proj=split_in_proj)
    block = _parallel_block(ref, mesh, world)
    order = tp_row_order(ref.conv.in_channels, world)
    assert type(block.conv) is mpgroups.GroupParallelConv1d
    assert (block.conv.input_layout, block.conv.output_layout) == ("sharded", "sharded")
    # Every parameter is a DTensor, as torch's styles make theirs: the conv's and the norm's
    # rows Shard(0) on the mesh (global shapes those of the torch.nn block).
    for module, shape in ((block.conv, (8, 1, 4)), (block.norm, (8,))):
        for name, param in module.named_parameters():
            assert isinstance(param, DTensor) and isinstance(param, nn.Parameter), name
            assert param.placements == (Shard(0),) and param.shape == shape[: param.dim()]
            assert param.to_local().shape[0] == 8 // world
    assert block.norm.num_groups == 4 // world
    assert all(isinstance(p, DTensor) for p in block.parameters())

    u = torch.randn(2, 7, 6, dtype=torch.float64)
    grad = torch.randn(2, 7, 6, dtype=torch.float64)
    u_ref, u_par = u.clone().requires_grad_(), u.clone().requires_grad_()
    y_ref = ref(u_ref)
    y_ref.backward(grad)
    with mpgroups.CommCounter() as comm, CommDebugMode() as torch_comm:
        y = block(u_par)
        forward_ops = _torch_ops(torch_comm)
        y.backward(grad)
    all_ops = _torch_ops(torch_comm)

    assert not isinstance(y, DTensor)  # RowwiseParallel's default: local and replicated
    assert_close(y, y_ref, TOL, "forward")
    assert_close(u_par.grad, u_ref.grad, TOL, "input grad")
    grads = mpgroups.full_grad_dict(block)
    _assert_dict_close(grads, {n: p.grad for n, p in ref.named_parameters()}, order, "grad")
    # The conv and the norm communicate nothing, data or metadata.
    assert comm.count(kind=None) == 0, comm.records
    if not split_in_proj:
        # Why in_proj's rows are laid out rank-major: with the single-device [x; z] order the
        # contiguous chunks of ColwiseParallel mix x and z channels, and the block is wrong.
        naive = _parallel_block(ref, mesh, world, row_order=torch.arange(2 * 8))
        assert (naive(u) - y_ref).abs().max() > 0.1
    return {"forward": forward_ops, "all": all_ops}


@pytest.mark.parametrize("split_in_proj", [False, True], ids=["fused-local", "split-dtensor"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_mamba_block_equals_single_device(pool, world_size, split_in_proj):
    ops = pool.run(_mamba_block, world_size, split_in_proj)
    # torch's side (CommDebugMode also sees mpgroups' c10d collectives, see
    # test_comm_debug_mode_sees_mpgroups): the forward's only collective is RowwiseParallel's
    # all-reduce of out_proj's partial sums; backward adds ColwiseParallel's all-reduce of the
    # input grad, one per in_proj Linear.
    backward = 2 if split_in_proj else 1
    for rank_ops in ops:
        assert rank_ops["forward"] == {"c10d_functional.all_reduce": 1}, rank_ops
        assert rank_ops["all"] == {"c10d_functional.all_reduce": 1 + backward}, rank_ops


def _comm_debug_mode_sees_mpgroups(ctx) -> dict[str, int]:
    """The torch-side count above is not blind to mpgroups: a G < P conv's team all-gather
    shows in CommDebugMode."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    conv = parallelize_module(
        nn.Conv1d(8, 8, 3, groups=1), _mesh(ctx), GroupwiseParallel(checks=False)
    )
    with CommDebugMode() as torch_comm:
        conv(torch.randn(2, 8 // ctx.world_size, 5))
    return _torch_ops(torch_comm)


def test_comm_debug_mode_sees_mpgroups(pool):
    assert pool.run(_comm_debug_mode_sees_mpgroups, 2) == [{"c10d._allgather_base_": 1}] * 2


def _mamba_habits(ctx) -> None:
    """Grad modes, deepcopy, an optimizer step and the state dict of the parallel block."""
    from torch.distributed.tensor import distribute_tensor

    world, mesh = ctx.world_size, _mesh(ctx)
    torch.manual_seed(1)
    ref = MambaStyleBlock()
    block = _parallel_block(ref, mesh, world)
    order = tp_row_order(ref.conv.in_channels, world)
    u = torch.randn(3, 5, 6, dtype=torch.float64)
    y_ref = ref(u)

    # torch.no_grad and inference_mode give the grad-mode numbers.
    with torch.no_grad():
        assert_close(block(u), y_ref, TOL, "no_grad")
    with torch.inference_mode():
        assert_close(block(u), y_ref, TOL, "inference_mode")

    # state_dict: the keys of the torch.nn block; every parameter entry a DTensor (the conv's
    # and the norm's holding this rank's rows, as torch's styles' do); full_state_dict is the
    # single-device state dict.
    state = block.state_dict()
    assert list(state) == list(ref.state_dict())
    lo, hi = dtensor_channel_slices(8, world)[ctx.rank]
    assert torch.equal(state["conv.weight"].to_local(), ref.conv.weight[lo:hi])
    assert torch.equal(state["norm.bias"].to_local(), ref.norm.bias[lo:hi])
    assert isinstance(state["out_proj.weight"], DTensor)
    full = mpgroups.full_state_dict(block)
    _assert_dict_close(full, ref.state_dict(), order, "full_state_dict")

    # copy.deepcopy (EMA): the copy computes the same and trains apart from the original.
    twin = copy.deepcopy(block)
    assert twin.conv.weight is not block.conv.weight
    assert twin.conv.process_group is block.conv.process_group
    assert_close(twin(u), y_ref, TOL, "deepcopy forward")
    twin(u).sum().backward()
    assert all(p.grad is None for p in block.parameters())
    assert all(p.grad is not None for p in twin.parameters())

    # One SGD step equals the single-device step.
    grad = torch.randn_like(y_ref)
    ref(u).backward(grad)
    block(u).backward(grad)
    for model in (ref, block):
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).step()
    assert_close(block(u), ref(u), TOL, "after an SGD step")
    _assert_dict_close(mpgroups.full_state_dict(block), ref.state_dict(), order, "stepped")

    # Loading a single-device state dict (a pretrained block): load_full_state_dict takes the
    # rows of plain entries; DTensor entries are loaded as they are.
    torch.manual_seed(6)
    pretrained = MambaStyleBlock()
    state = {
        k: v[order] if k.startswith("in_proj.") else v for k, v in pretrained.state_dict().items()
    }
    local = block.state_dict()
    for key, value in local.items():
        if isinstance(value, DTensor):
            state[key] = distribute_tensor(state[key], value.device_mesh, value.placements)
    mpgroups.load_full_state_dict(block, state)
    assert_close(block(u), pretrained(u), TOL, "after loading a single-device state dict")


@pytest.mark.parametrize("world_size", [2, 4])
def test_mamba_block_user_habits(pool, world_size):
    pool.run(_mamba_habits, world_size)


def _conv_and_batchnorm(ctx, cin: int, cout: int, groups: int, channels_last: bool) -> int:
    """A grouped Conv2d then BatchNorm2d, DTensor Shard(1) in, DTensor Shard(1) out; returns
    the data collectives mpgroups counted (none with G >= P)."""
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = _mesh(ctx)
    torch.manual_seed(2)
    ref = nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, groups=groups, dtype=torch.float64),
        nn.BatchNorm2d(cout, dtype=torch.float64),
    )
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
    model = parallelize_module(
        copy.deepcopy(ref),
        mesh,
        {
            "0": GroupwiseParallel(use_local_output=False),
            "1": ChannelwiseNorm(use_local_output=False),
        },
    )
    assert model[0].placement.filter_split == (groups < ctx.world_size)
    x = torch.randn(3, cin, 6, 5, dtype=torch.float64)
    grad = torch.randn(3, cout, 6, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.clone().requires_grad_()
    lo, hi = dtensor_channel_slices(cin, ctx.world_size)[ctx.rank]
    x_shard = x[:, lo:hi]  # a view: non-contiguous, channels_last strides kept
    x_par = DTensor.from_local(x_shard, mesh, [Shard(1)], run_check=False).requires_grad_()
    y_ref = ref(x_ref)
    y_ref.backward(grad)
    with mpgroups.CommCounter() as comm:
        y = model(x_par)
        assert isinstance(y, DTensor) and y.placements == (Shard(1),), y
        assert y.shape == y_ref.shape
        local = y.to_local()
        assert local.is_contiguous(memory_format=torch.channels_last) == channels_last
        lo, hi = dtensor_channel_slices(cout, ctx.world_size)[ctx.rank]
        local.backward(grad[:, lo:hi])
    assert_close(y.full_tensor(), y_ref, TOL, "forward")
    assert_close(x_par.grad.full_tensor(), x_ref.grad, TOL, "input grad")
    grads = mpgroups.full_grad_dict(model)
    _assert_dict_close(grads, {n: p.grad for n, p in ref.named_parameters()}, None, "grad")
    # Training-mode BatchNorm: running statistics per channel, as on one device.
    _assert_dict_close(mpgroups.full_state_dict(model), ref.state_dict(), None, "state")
    return comm.count()


@pytest.mark.parametrize(
    "world_size, cin, cout, groups, channels_last",
    [
        (2, 8, 12, 4, False),  # G >= P: two groups per rank
        (4, 8, 12, 4, True),  # G = P, channels_last input
        (2, 8, 8, 1, False),  # G < P: a dense conv, filters split over the team of 2
        (4, 8, 8, 2, True),  # G < P: two teams of two ranks
    ],
    ids=["G4-P2", "G4-P4-channels_last", "G1-P2", "G2-P4-channels_last"],
)
def test_grouped_conv2d_and_batchnorm_dtensor_in_and_out(
    pool, world_size, cin, cout, groups, channels_last
):
    counts = pool.run(_conv_and_batchnorm, world_size, cin, cout, groups, channels_last)
    if groups >= world_size:
        assert counts == [0] * world_size  # no collective from the conv or the norm
    else:
        # The team gathers its group's input channels (forward) and reduce-scatters their
        # grads (backward): mpgroups' collectives, counted.
        assert counts == [2] * world_size


def _replicated_layouts(ctx) -> None:
    """Replicate() in and out: the conv equals nn.Conv2d, DTensor or local in; its weight rows
    are a DTensor Shard(0), so groups that split unevenly (G=3 on 2 ranks: 4 + 2 rows, where
    Shard(0) holds 3 + 3) are refused, naming both splits."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    layouts = {"input_layouts": Replicate(), "output_layouts": Replicate()}
    with pytest.raises(ValueError, match=r"\[\(0, 4\), \(4, 6\)\].*\[\(0, 3\), \(3, 6\)\]"):
        parallelize_module(nn.Conv2d(12, 6, 3, groups=3), _mesh(ctx), GroupwiseParallel(**layouts))
    mesh = _mesh(ctx)
    torch.manual_seed(3)
    ref = nn.Conv2d(12, 6, 3, groups=6, dtype=torch.float64)
    conv = parallelize_module(
        copy.deepcopy(ref), mesh, GroupwiseParallel(use_local_output=False, **layouts)
    )
    # A hook registered on the nn.Conv2d still runs on what it became.
    local, seen = copy.deepcopy(ref), []
    local.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    local = parallelize_module(local, mesh, GroupwiseParallel(**layouts))
    assert repr(local).startswith("GroupParallelConv2d(12, 6, kernel_size=(3, 3)")
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64)
    x_ref = x.clone().requires_grad_()
    x_par = distribute_tensor(x, mesh, [Replicate()]).requires_grad_()
    y_ref = ref(x_ref)
    y = conv(x_par)
    assert y.placements == (Replicate(),)
    assert_close(y.to_local(), y_ref, TOL, "forward")
    y.to_local().sum().backward()
    y_ref.sum().backward()
    assert_close(x_par.grad.to_local(), x_ref.grad, TOL, "input grad")
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    assert not strided.is_contiguous()
    assert_close(local(strided), y_ref, TOL, "local, non-contiguous input")
    assert not isinstance(local(x), DTensor)
    assert seen == [y_ref.shape] * 2


def test_replicated_layouts(pool):
    pool.run(_replicated_layouts, 2)


def _unbatched(ctx) -> None:
    """An unbatched Conv1d input [C, L] has its channels in dim 0: Shard(0) in and out."""
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = _mesh(ctx)
    torch.manual_seed(5)
    ref = nn.Conv1d(4, 6, 3, groups=2, dtype=torch.float64)
    conv = parallelize_module(copy.deepcopy(ref), mesh, GroupwiseParallel(use_local_output=False))
    x = torch.randn(4, 7, dtype=torch.float64)
    lo, hi = dtensor_channel_slices(4, ctx.world_size)[ctx.rank]
    y = conv(DTensor.from_local(x[lo:hi], mesh, [Shard(0)], run_check=False))
    assert y.placements == (Shard(0),) and y.shape == (6, 5)
    assert_close(y.full_tensor(), ref(x), TOL, "unbatched")


def test_unbatched_input(pool):
    pool.run(_unbatched, 2)


def _refusals(ctx) -> list[str]:
    """What is refused on the mesh, each with a message naming what works."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    mesh, world = _mesh(ctx), ctx.world_size
    messages = []

    def refused(error, module, style, match: str) -> None:
        with pytest.raises(error, match=match) as info:
            parallelize_module(module, mesh, style)
        messages.append(str(info.value))

    # DTensor's torch.chunk split against mpgroups' placement, where they differ.
    if world == 4:
        # Depthwise, 6 channels: torch 2, 2, 2, 0 against mpgroups 2, 2, 1, 1.
        refused(ValueError, nn.Conv1d(6, 6, 3, groups=6), GroupwiseParallel(), r"\(6, 6\)")
        # GroupNorm(2, 8): 2 channels per rank cut the norm groups of 4.
        refused(ValueError, nn.GroupNorm(2, 8), ChannelwiseNorm(), "fall inside a norm group")
        # groups=3 cannot be placed on 4 ranks at all (mpgroups' PlacementError).
        refused(mpgroups.PlacementError, nn.Conv2d(6, 6, 1, groups=3), GroupwiseParallel(), "")
    else:
        # groups=3 on 2 ranks: mpgroups 8 + 4 channels, torch 6 + 6.
        refused(ValueError, nn.Conv2d(12, 12, 1, groups=3), GroupwiseParallel(), r"\(6, 12\)")
        # 1 channel on 2 ranks leaves rank 1 without any.
        refused(ValueError, nn.BatchNorm1d(1), ChannelwiseNorm(), "without channels")
    refused(TypeError, nn.Linear(4, 4), GroupwiseParallel(), "ColwiseParallel")
    refused(TypeError, nn.SyncBatchNorm(4), ChannelwiseNorm(), "GroupNorm")
    # A DTensor that arrives sharded on another dim than the channels.
    conv = parallelize_module(nn.Conv1d(8, 8, 3, groups=8), mesh, GroupwiseParallel())
    x = distribute_tensor(torch.randn(2, 8, 4 * world), mesh, [Shard(2)])
    with pytest.raises(ValueError, match=r"Shard\(dim=1\)"):
        conv(x)
    # The style applies once: the conv is a GroupParallelConv1d now.
    with pytest.raises(TypeError, match="already parallelized"):
        parallelize_module(conv, mesh, GroupwiseParallel())
    # A 2-D mesh.
    from torch.distributed.device_mesh import DeviceMesh

    mesh_2d = DeviceMesh("cpu", torch.arange(world).reshape(2, world // 2), _init_backend=False)
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        GroupwiseParallel()._apply(nn.Conv1d(8, 8, 3, groups=8), mesh_2d)
    return messages


@pytest.mark.parametrize("world_size", [2, 4])
def test_refused_sizes_and_inputs(pool, world_size):
    messages = pool.run(_refusals, world_size)[0]
    if world_size == 4:
        assert "[(0, 2), (2, 4), (4, 5), (5, 6)]" in messages[0]  # mpgroups' split
        assert "[(0, 2), (2, 4), (4, 6), (6, 6)]" in messages[0]  # torch's split


def _source_rank(ctx) -> None:
    """src_data_rank, as torch's styles take it: rank 0's values by default, whatever the
    other ranks initialised; each rank's own with src_data_rank=None."""
    from torch.distributed.tensor.parallel import parallelize_module

    mesh, rank = _mesh(ctx), ctx.rank
    torch.manual_seed(4)
    ref = nn.Sequential(
        nn.Conv1d(8, 8, 3, padding=1, groups=4, dtype=torch.float64),
        nn.GroupNorm(4, 8, dtype=torch.float64),
    )
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    lo, hi = dtensor_channel_slices(8, ctx.world_size)[rank]
    y_ref = ref(x)[:, lo:hi]
    for src in (0, None):
        mine = copy.deepcopy(ref)
        drifted = mine[0].weight
        if rank != 0:  # this rank initialised otherwise
            with torch.no_grad():
                for t in [*mine.parameters(), *mine.buffers()]:
                    t.add_(1.0)
        plan = {"0": GroupwiseParallel(), "1": ChannelwiseNorm()}
        model = parallelize_module(mine, mesh, plan, src_data_rank=src)
        close = torch.allclose(model(x[:, lo:hi]), y_ref, rtol=0, atol=TOL)
        assert close == (rank == 0 or src is not None), (src, rank)
        # The module's own parameters were replaced, never overwritten in place.
        assert rank == 0 or torch.equal(drifted, ref[0].weight + 1.0)


def test_src_data_rank(pool):
    pool.run(_source_rank, 2)


def _torch_splits(ctx) -> None:
    """dtensor_channel_slices is the split distribute_tensor makes."""
    from torch.distributed.tensor import distribute_tensor

    mesh = _mesh(ctx)
    for channels in range(1, 12):
        full = torch.arange(float(channels)).reshape(1, channels, 1)
        local = distribute_tensor(full, mesh, [Shard(1)]).to_local().flatten()
        start, stop = dtensor_channel_slices(channels, ctx.world_size)[ctx.rank]
        assert local.tolist() == list(range(start, stop)), (channels, local, start, stop)


@pytest.mark.parametrize("world_size", [2, 4])
def test_dtensor_channel_slices_match_distribute_tensor(pool, world_size):
    pool.run(_torch_splits, world_size)


@pytest.mark.parametrize(
    "style, layouts, match",
    [
        (GroupwiseParallel, {"input_layouts": Shard(2)}, r"Shard\(1\) or Replicate\(\)"),
        (GroupwiseParallel, {"input_layouts": Shard(-1)}, r"transpose\(1, 2\)"),
        (GroupwiseParallel, {"output_layouts": Partial()}, r"Shard\(1\) or Replicate\(\)"),
        (GroupwiseParallel, {"output_layouts": "sharded"}, r"got 'sharded'"),
        (ChannelwiseNorm, {"input_layouts": Replicate()}, r"must be Shard\(1\), got"),
        (ChannelwiseNorm, {"output_layouts": Shard(0)}, r"must be Shard\(1\), got"),
    ],
)
def test_unsupported_layouts_raise(style, layouts, match):
    with pytest.raises(ValueError, match=match):
        style(**layouts)


def test_repr_and_defaults():
    style = GroupwiseParallel()
    assert style.input_layouts == (Shard(1),) and style.output_layouts == (Shard(1),)
    assert style.use_local_output
    assert repr(ChannelwiseNorm(use_local_output=False)) == (
        "ChannelwiseNorm(input_layouts=Shard(dim=1), output_layouts=Shard(dim=1), "
        "use_local_output=False)"
    )


def test_torch_and_mpgroups_splits_agree_where_documented():
    """DTensor's split equals mpgroups' sharded layout whenever G >= P with P | G, or G < P
    with P | C (the sizes the module docstring promises); e.g. not for 6 depthwise channels
    on 4 ranks."""
    from mpgroups.sharding.layout import layout_shards

    checked = 0
    for world in range(1, 9):
        for groups in range(1, 17):
            for channels in range(groups, 49, groups):
                if (
                    groups >= world
                    and groups % world == 0
                    or (groups < world and world % groups == 0 and channels % world == 0)
                ):
                    mpgroups_split = layout_shards(channels, groups, world, 0).slices
                    assert mpgroups_split == dtensor_channel_slices(channels, world)
                    checked += 1
    assert checked == 450
    assert layout_shards(6, 6, 4, 0).slices != dtensor_channel_slices(6, 4)


# The training loop users already write, unchanged, on the parallelized block: every
# parameter is a DTensor, so torch's own tools see the single-device model.


def _clipped_training(ctx, optimizer: str) -> None:
    """10 steps with clip_grad_norm_ active: the norm on every rank is the single-device
    norm, and losses and the final state equal single-device training."""
    world, mesh = ctx.world_size, _mesh(ctx)
    torch.manual_seed(7)
    ref = MambaStyleBlock(split_in_proj=True)
    block = _parallel_block(ref, mesh, world)
    make = {
        "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    }[optimizer]
    opt_ref, opt = make(ref.parameters()), make(block.parameters())
    for step in range(10):
        u = torch.randn(3, 5, 6, dtype=torch.float64)
        target = torch.randn(3, 5, 6, dtype=torch.float64)
        losses = []
        for model, opt_ in ((ref, opt_ref), (block, opt)):
            opt_.zero_grad()
            loss = F.mse_loss(model(u), target)
            loss.backward()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], 1e-9, f"loss at step {step}")
        total = torch.nn.utils.get_total_norm([p.grad for p in block.parameters()])
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.1)
        norm = torch.nn.utils.clip_grad_norm_(block.parameters(), max_norm=0.1)
        assert norm_ref > 0.1, "clipping must be active"
        for value in (total, norm):
            assert isinstance(value, DTensor) and value.placements == (Replicate(),)
            assert_close(value.full_tensor(), norm_ref, 1e-12 * float(norm_ref), "norm")
        opt_ref.step()
        opt.step()
    _assert_dict_close(mpgroups.full_state_dict(block), ref.state_dict(), None, "trained")
    # clip_grad_value_ clamps every rank's entries alike (elementwise: no reduction needed).
    torch.nn.utils.clip_grad_value_(ref.parameters(), 1e-3)
    torch.nn.utils.clip_grad_value_(block.parameters(), 1e-3)
    grads = mpgroups.full_grad_dict(block)
    _assert_dict_close(grads, {n: p.grad for n, p in ref.named_parameters()}, None, "clamped")


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adamw"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_clip_grad_norm_sees_the_single_device_block(pool, world_size, optimizer):
    pool.run(_clipped_training, world_size, optimizer)


def _dcp_save(ctx, path: str) -> dict:
    """Train two AdamW steps, save model and optimizer with DCP, train two more; returns
    the single-device states after each part (on rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    world, mesh = ctx.world_size, _mesh(ctx)
    torch.manual_seed(9)
    block = _parallel_block(MambaStyleBlock(split_in_proj=True), mesh, world)
    opt = torch.optim.AdamW(block.parameters(), lr=0.01)
    torch.manual_seed(10)
    batches = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(4)]
    for u in batches[:2]:
        _adamw_step(block, opt, u)
    # Entries a rank holds whole are its tensors themselves, as in state_dict(): copy them.
    saved = {key: value.clone() for key, value in mpgroups.full_state_dict(block).items()}
    dcp.save(
        {"model": get_model_state_dict(block), "optim": get_optimizer_state_dict(block, opt)},
        checkpoint_id=path,
        process_group=ctx.process_group,  # the pool's world is larger than the block's
    )
    for u in batches[2:]:
        _adamw_step(block, opt, u)
    return {"saved": saved, "final": mpgroups.full_state_dict(block), "batches": batches}


def _adamw_step(model, opt, u) -> None:
    opt.zero_grad()
    model(u).square().mean().backward()
    opt.step()


def _dcp_resume(ctx, path: str, batches: list) -> dict:
    """A block initialised otherwise loads the checkpoint (any world size) and trains the
    last two steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(11)
    block = _parallel_block(MambaStyleBlock(split_in_proj=True), _mesh(ctx), ctx.world_size)
    opt = torch.optim.AdamW(block.parameters(), lr=0.01)
    _adamw_step(block, opt, batches[0])  # optimizer state to load into
    state = {"model": get_model_state_dict(block), "optim": get_optimizer_state_dict(block, opt)}
    dcp.load(state, checkpoint_id=path, process_group=ctx.process_group)
    set_model_state_dict(block, state["model"])
    set_optimizer_state_dict(block, opt, state["optim"])
    loaded = {key: value.clone() for key, value in mpgroups.full_state_dict(block).items()}
    for u in batches[2:]:
        _adamw_step(block, opt, u)
    return {"loaded": loaded, "final": mpgroups.full_state_dict(block)}


def test_dcp_checkpoint_holds_the_single_device_block_and_resumes_at_another_size(pool, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp_path / "dcp")
    saved = pool.run(_dcp_save, 2, path)[0]
    # The files hold the single-device tensors: the plain block loads them with strict=True.
    dcp_to_torch_save(path, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    plain = MambaStyleBlock(split_in_proj=True)
    plain.load_state_dict(whole["model"], strict=True)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, saved["saved"][key]), key
    # Resumed at P = 4 (and at P = 2), training equals the uninterrupted run.
    for world_size in (4, 2):
        resumed = pool.run(_dcp_resume, world_size, path, saved["batches"])[0]
        for key, value in saved["saved"].items():
            assert torch.equal(resumed["loaded"][key], value), (world_size, key)
        for key, value in saved["final"].items():
            assert_close(resumed["final"][key], value, 1e-12, f"P={world_size} {key}")


def _compiled_block(ctx, split_in_proj: bool) -> None:
    """``torch.compile(fullgraph=True)`` of the parallelized block: one graph, its forward
    and every gradient those of the single-device block."""
    world, mesh = ctx.world_size, _mesh(ctx)
    torch.manual_seed(0)
    ref = MambaStyleBlock(split_in_proj=split_in_proj)
    block = _parallel_block(ref, mesh, world)
    order = tp_row_order(ref.conv.in_channels, world)
    u = torch.randn(2, 7, 6, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y = compiled(u)
    y.sum().backward()
    y_ref = ref(u)
    y_ref.sum().backward()
    assert_close(y, y_ref, TOL, "compiled forward")
    grads = mpgroups.full_grad_dict(block)
    _assert_dict_close(grads, {n: p.grad for n, p in ref.named_parameters()}, order, "compiled")


@pytest.mark.parametrize("split_in_proj", [False, True], ids=["fused-local", "split-dtensor"])
def test_fullgraph_compile_of_the_block(pool, split_in_proj):
    pool.run(_compiled_block, 2, split_in_proj)
