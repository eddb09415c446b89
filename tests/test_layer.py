"""The layer beyond the parity grid: world size 1, initialisation, communication counts,
a sharded chain with BatchNorm, the explicit scatter/gather path, conversions and errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_in_one_rank_world
from parity import PARALLEL, REFERENCE, TOLERANCE, assert_close, case, make_reference
from torch import nn

import mpgroups
from mpgroups.comm.checks import RECORD_SIZE
from mpgroups.layers.conv import GroupParallelConv2d

SINGLE_DEVICE_CASES = [
    case(),
    case(cin=6, cout=12, groups=6, padding_mode="reflect"),
    case(cin=4, cout=6, groups=1, padding="same", kernel=4, dilation=2, bias=False),
    case(padding_mode="circular", stride=2, memory="channels_last"),
    case(dims=1, spatial=(13,), padding_mode="replicate"),
    case(dims=3, spatial=(4, 5, 3), groups=2),
]


def _bitwise_single_device(ctx, c: dict) -> None:
    """Outputs and grads bitwise equal to nn.ConvNd; same state_dict keys and shapes."""
    group = None if ctx is None else ctx.process_group
    ref, x = make_reference(c)
    layer = PARALLEL[c["dims"]].from_conv(ref, group)
    assert layer.world_size == 1 and layer.weight.shape == ref.weight.shape
    if c["memory"] == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x_ref), layer(x_par)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y.backward(grad)
    assert torch.equal(y, y_ref)
    assert torch.equal(x_par.grad, x_ref.grad)
    assert torch.equal(layer.weight.grad, ref.weight.grad)
    if c["bias"]:
        assert torch.equal(layer.bias.grad, ref.bias.grad)
    ref_state, state = ref.state_dict(), layer.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    fresh = PARALLEL[c["dims"]](
        c["cin"], c["cout"], c["kernel"], groups=c["groups"], bias=c["bias"], process_group=group
    )
    fresh.load_state_dict(ref_state, strict=True)
    ref.load_state_dict(fresh.state_dict(), strict=True)


@pytest.mark.parametrize("c", SINGLE_DEVICE_CASES, ids=lambda c: f"{c['dims']}d-g{c['groups']}")
def test_no_process_group_is_nn_conv_bitwise(c):
    assert not dist.is_initialized()
    _bitwise_single_device(None, c)


def _one_rank_world_cases(ctx):
    for c in SINGLE_DEVICE_CASES:
        _bitwise_single_device(ctx, c)
    # The default group is picked up when none is given, as DDP and SyncBatchNorm do.
    layer = GroupParallelConv2d(4, 4, 3, groups=2)
    assert layer.process_group is dist.group.WORLD and layer.world_size == 1
    return len(SINGLE_DEVICE_CASES)


def test_one_rank_process_group_is_nn_conv_bitwise():
    assert run_in_one_rank_world(_one_rank_world_cases) == len(SINGLE_DEVICE_CASES)


SEEDED_SHAPES = [
    (2, 8, 8, 4),
    (2, 6, 9, 3),
    (2, 4, 6, 1),
    (2, 4, 6, 2),
    (2, 6, 12, 6),
    (1, 6, 6, 6),
    (3, 4, 8, 2),
]


def _seeded_init(ctx, seed: int) -> int:
    checked = 0
    for dims, cin, cout, groups in SEEDED_SHAPES:
        try:
            mpgroups.place(cin, cout, groups, ctx.world_size, ctx.rank)
        except mpgroups.PlacementError:
            continue
        for bias in (True, False):
            torch.manual_seed(seed)
            layer = PARALLEL[dims](
                cin, cout, 3, groups=groups, bias=bias, process_group=ctx.process_group
            )
            layer_next_draw = torch.rand(3)
            torch.manual_seed(seed)
            ref = REFERENCE[dims](cin, cout, 3, groups=groups, bias=bias)
            ref_next_draw = torch.rand(3)
            o0, o1 = layer.out_slice
            assert torch.equal(layer.weight, ref.weight[o0:o1]), (dims, cin, cout, groups)
            if bias:
                assert torch.equal(layer.bias, ref.bias[o0:o1])
            # The RNG is left where nn leaves it, so the modules built next initialise alike.
            assert torch.equal(layer_next_draw, ref_next_draw)
            checked += 1
    return checked


@pytest.mark.parametrize("world_size", [2, 4])
def test_same_seed_gives_the_rows_of_the_single_device_weight(pool, world_size):
    checked = pool.run(_seeded_init, world_size, 1234)
    assert min(checked) >= 8


def _comm_counts(ctx) -> None:
    """docs/design.md §3's table with explicit numbers (fp32, N=2, 5x5, kernel 3, padding 1)."""
    n, hw, elt = 2, 25, 4
    torch.manual_seed(0)
    x_full = torch.randn(n, 8, 5, 5)

    def run(cin, cout, groups, layouts):
        ref = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
        layer = GroupParallelConv2d.from_conv(
            ref, ctx.process_group, input_layout=layouts[0], output_layout=layouts[1]
        )
        x = x_full[:, :cin]
        if layouts[0] == "sharded":
            x = x[:, slice(*layer.input_shard)]
        x = x.clone().requires_grad_()
        with mpgroups.CommCounter() as forward:
            y = layer(x)
        with mpgroups.CommCounter() as backward:
            y.backward(torch.ones_like(y))
        # The input-check record: one tiny all-gather per call that communicates, counted apart
        # from data; none where the layer computes alone (sharded -> sharded, whole groups).
        record_bytes = ctx.world_size * RECORD_SIZE * 8
        alone = layouts == ("sharded", "sharded") and not layer.placement.filter_split
        assert [(r.op, r.nbytes) for r in forward.records if r.kind == "meta"] == (
            [] if alone else [("all_gather", record_bytes)]
        )
        assert backward.count(kind="meta") == 0
        return (
            [(r.op, r.group_size, r.nbytes) for r in forward.records if r.kind == "data"],
            [(r.op, r.group_size, r.nbytes) for r in backward.records if r.kind == "data"],
        )

    world = ctx.world_size
    # Sharded -> sharded with G >= P: no collective at all, forward or backward.
    assert run(8, 8, 4, ("sharded", "sharded")) == ([], [])
    # Replicated -> replicated with P | G: one all-gather of the output forward, one of the
    # input grad backward, each the whole tensor.
    assert run(8, 16, 4, ("replicated", "replicated")) == (
        [("all_gather", world, n * 16 * hw * elt)],
        [("all_gather", world, n * 8 * hw * elt)],
    )
    # Replicated -> sharded: the backward gather of the input grad only.
    assert run(8, 16, 4, ("replicated", "sharded")) == (
        [],
        [("all_gather", world, n * 8 * hw * elt)],
    )
    if world == 2:
        # Uneven whole groups (G=3 -> 2 + 1): the padding to the widest shard counts as sent.
        assert run(6, 9, 3, ("replicated", "replicated")) == (
            [("all_gather", 2, 2 * n * 6 * hw * elt)],
            [("all_gather", 2, 2 * n * 4 * hw * elt)],
        )
    else:
        # G=2 < P=4: teams of two ranks; C_in=4 gives each rank 1 channel of its group's 2,
        # C_out=6 gives filters 2 + 1 per team.
        team_bytes = 2 * n * 1 * hw * elt
        assert run(4, 6, 2, ("sharded", "sharded")) == (
            [("all_gather", 2, team_bytes)],
            [("reduce_scatter", 2, team_bytes)],
        )
        assert run(4, 6, 2, ("replicated", "replicated")) == (
            [("all_gather", 4, 4 * n * 2 * hw * elt)],
            [("reduce_scatter", 2, team_bytes), ("all_gather", 4, 4 * n * 1 * hw * elt)],
        )
    # Validation records are counted apart from data.
    with mpgroups.CommCounter() as comm:
        shard = mpgroups.scatter_channels(
            x_full if ctx.rank == 0 else None, 0, groups=4, process_group=ctx.process_group
        )
    # Metadata: the check's record exchange, the broadcast of the source's shape, and the
    # agreement on recording a backward.
    assert comm.ops(kind="meta") == {"all_gather": 1, "broadcast": 1, "all_reduce": 1}
    assert comm.count(kind="check") == 1 and comm.count() == 1
    assert comm.ops() == {"scatter": 1}
    assert comm.bytes() == world * n * (8 // world) * hw * elt
    assert comm.count(kind=None) == 5
    assert torch.equal(shard, x_full[:, ctx.rank * 8 // world : (ctx.rank + 1) * 8 // world])


@pytest.mark.parametrize("world_size", [2, 4])
def test_comm_counter_proves_the_layout_table(pool, world_size):
    pool.run(_comm_counts, world_size)


def _sharded_chain(ctx, groups: int, mid: int) -> dict:
    """conv (replicated -> sharded) -> BatchNorm -> ReLU -> conv (sharded -> replicated)."""
    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Conv2d(8, mid, 3, padding=1, groups=groups),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, 8, 3, padding=1, groups=groups, bias=False),
    )
    with torch.no_grad():
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 8, 7, 7)
    conv1 = GroupParallelConv2d.from_conv(ref[0], ctx.process_group, output_layout="sharded")
    conv2 = GroupParallelConv2d.from_conv(ref[3], ctx.process_group, input_layout="sharded")
    assert conv1.output_shard == conv2.input_shard
    c0, c1 = conv1.output_shard
    bn = nn.BatchNorm2d(c1 - c0)
    with torch.no_grad():
        bn.weight.copy_(ref[1].weight[c0:c1])
        bn.bias.copy_(ref[1].bias[c0:c1])
    chain = nn.Sequential(conv1, bn, nn.ReLU(), conv2)

    x_ref, x_par = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x_ref), chain(x_par)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y.backward(grad)
    tol = TOLERANCE[torch.float32]
    o0, o1 = conv1.out_slice
    p0, p1 = conv2.out_slice
    errors = [
        assert_close(y, y_ref, tol, "output"),
        assert_close(x_par.grad, x_ref.grad, tol, "input grad"),
        assert_close(conv1.weight.grad, ref[0].weight.grad[o0:o1], tol, "conv1 weight grad"),
        assert_close(conv1.bias.grad, ref[0].bias.grad[o0:o1], tol, "conv1 bias grad"),
        assert_close(bn.weight.grad, ref[1].weight.grad[c0:c1], tol, "bn weight grad"),
        assert_close(bn.bias.grad, ref[1].bias.grad[c0:c1], tol, "bn bias grad"),
        assert_close(bn.running_mean, ref[1].running_mean[c0:c1], tol, "bn running mean"),
        assert_close(bn.running_var, ref[1].running_var[c0:c1], tol, "bn running var"),
        assert_close(conv2.weight.grad, ref[3].weight.grad[p0:p1], tol, "conv2 weight grad"),
    ]
    return {"worst": max(errors), "filter_split": conv1.placement.filter_split}


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("groups, mid", [(4, 16), (2, 12)])
def test_sharded_chain_with_batchnorm_equals_nn(pool, world_size, groups, mid):
    results = pool.run(_sharded_chain, world_size, groups, mid)
    assert all(r["worst"] <= 1e-5 for r in results)
    assert all(r["filter_split"] == (groups < world_size) for r in results)


def _scatter_layer_gather(ctx, c: dict, dst) -> None:
    """scatter_channels(x, src=0) -> sharded -> sharded layer -> gather_channels(y, dst)."""
    ref, x = make_reference(c)
    tol = TOLERANCE[c["dtype"]]
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)

    layer = PARALLEL[c["dims"]].from_conv(
        ref, ctx.process_group, input_layout="sharded", output_layout="sharded"
    )
    source = x.clone().requires_grad_() if ctx.rank == 0 else None
    x_shard = mpgroups.scatter_channels(
        source, 0, groups=c["groups"], process_group=ctx.process_group
    )
    assert x_shard.shape[1] == layer.input_shard[1] - layer.input_shard[0]
    y_shard = layer(x_shard)
    y = mpgroups.gather_channels(y_shard, dst, groups=c["groups"], process_group=ctx.process_group)
    if dst is None or ctx.rank == dst:
        assert_close(y, y_ref, tol, "gathered output")
        y.backward(grad)
    else:
        assert y.numel() == 0
        y.backward(torch.empty_like(y))
    o0, o1 = layer.out_slice
    assert_close(layer.weight.grad, ref.weight.grad[o0:o1], tol, "weight grad")
    assert_close(layer.bias.grad, ref.bias.grad[o0:o1], tol, "bias grad")
    if ctx.rank == 0:
        assert_close(source.grad, x_ref.grad, tol, "input grad on the source rank")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dst", [0, 1, None])
@pytest.mark.parametrize(
    "c",
    [case(), case(cin=8, cout=12, groups=2), case(cin=6, cout=6, groups=6, batch=1)],
    ids=["g4", "g2", "depthwise6"],
)
def test_scatter_layer_gather_path(pool, world_size, dst, c):
    pool.run(_scatter_layer_gather, world_size, c, dst)


def _in_place_on_outputs(ctx, groups: int, channels: int) -> None:
    """In-place ops on what the collectives and the layer return work as on plain tensors."""
    torch.manual_seed(0)
    x = torch.randn(3, channels, 5, 5)
    x_ref = x.clone().requires_grad_()
    ref = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
    y_ref = ref(x_ref.mul(3).relu()).add(1).relu()
    (y_ref * y_ref).sum().backward()

    source = x.clone().requires_grad_() if ctx.rank == 0 else None
    shard = mpgroups.scatter_channels(source, 0, groups=groups, process_group=ctx.process_group)
    shard.mul_(3).relu_()
    layer = GroupParallelConv2d.from_conv(ref, ctx.process_group, input_layout="sharded")
    y = layer(shard).add_(1).relu_()
    (y * y).sum().backward()
    assert_close(y, y_ref, TOLERANCE[torch.float32], "output")
    o0, o1 = layer.out_slice
    assert_close(layer.weight.grad, ref.weight.grad[o0:o1], TOLERANCE[torch.float32], "w grad")
    if ctx.rank == 0:
        assert_close(source.grad, x_ref.grad, TOLERANCE[torch.float32], "input grad")


@pytest.mark.parametrize(
    ("world_size", "groups", "channels"),
    [(2, 4, 8), (4, 4, 8), (2, 3, 6)],
    ids=["even-P2", "even-P4", "uneven-P2"],
)
def test_in_place_ops_on_returned_tensors(pool, world_size, groups, channels):
    pool.run(_in_place_on_outputs, world_size, groups, channels)


def _conversions(ctx) -> str:
    torch.manual_seed(3)
    ref = nn.Conv2d(6, 12, (3, 1), padding=(1, 0), groups=6, padding_mode="reflect")
    layer = GroupParallelConv2d.from_conv(ref, ctx.process_group)
    assert layer.weight is not ref.weight and layer.weight.requires_grad
    back = layer.to_conv()
    assert type(back) is nn.Conv2d and repr(back) == repr(ref)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert torch.equal(layer.full_weight(), ref.weight) and torch.equal(layer.full_bias(), ref.bias)
    ref.weight.requires_grad_(False)
    ref.eval()
    frozen = GroupParallelConv2d.from_conv(ref, ctx.process_group)
    assert not frozen.weight.requires_grad and not frozen.training
    assert not frozen.to_conv().weight.requires_grad
    with pytest.raises(TypeError, match="expects an Conv2d, got Conv1d"):
        GroupParallelConv2d.from_conv(nn.Conv1d(4, 4, 3), ctx.process_group)
    return repr(layer)


def test_conversions_and_repr(pool):
    reprs = pool.run(_conversions, 2)
    assert reprs[0] == (
        "GroupParallelConv2d(6, 12, kernel_size=(3, 1), stride=(1, 1), padding=(1, 0), "
        "groups=6, padding_mode=reflect, rank=0/2, local_groups=3, in_slice=(0, 3), "
        "out_slice=(0, 6))"
    )
    assert "rank=1/2" in reprs[1] and "in_slice=(3, 6), out_slice=(6, 12)" in reprs[1]


def _group_arguments(ctx) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh("cpu", list(range(ctx.world_size)))
    layer = GroupParallelConv2d(8, 8, 3, groups=4, process_group=mesh)
    assert layer.world_size == 4 and layer.rank == ctx.rank
    assert layer.full_weight().shape == (8, 2, 3, 3)
    square = DeviceMesh("cpu", [[0, 1], [2, 3]], mesh_dim_names=("dp", "mp"))
    with pytest.raises(ValueError, match="1-D DeviceMesh"):
        GroupParallelConv2d(8, 8, 3, groups=4, process_group=square)
    mp_layer = GroupParallelConv2d(8, 8, 3, groups=4, process_group=square["mp"])
    assert mp_layer.world_size == 2 and mp_layer.rank == ctx.rank % 2
    pair = dist.new_group([0, 1])
    if ctx.rank >= 2:
        with pytest.raises(ValueError, match="not a member of the process group"):
            GroupParallelConv2d(8, 8, 3, groups=4, process_group=pair)
    with pytest.raises(mpgroups.PlacementError, match="groups=3 cannot be placed on 4 ranks"):
        GroupParallelConv2d(6, 9, 3, groups=3, process_group=ctx.process_group)
    with pytest.raises(
        ValueError,
        match=r"divisible by groups \(got in_channels=6, out_channels=9, groups=2",
    ):
        GroupParallelConv2d(6, 9, 3, groups=2, process_group=ctx.process_group)
    with pytest.raises(ValueError, match="input_layout must be one of"):
        GroupParallelConv2d(
            8, 8, 3, groups=4, process_group=ctx.process_group, input_layout="split"
        )


def test_device_mesh_membership_and_construction_errors(pool):
    pool.run(_group_arguments, 4)
