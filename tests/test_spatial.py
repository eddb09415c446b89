"""Spatial split along dim 2: the halo plans, the spatially split convs against ``nn.ConvNd``
(float64, P = 2 and 4, uneven blocks, every stride, dilation, padding and padding mode),
their double backward, the layout's entry and exit (``spatial_shard``, ``scatter_spatial``,
``gather_spatial``) and bad input raising on every rank."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from dist_harness import spatial_grid
from torch import nn
from torch.func import functional_call

import mpgroups
from mpgroups.comm.checks import InputMismatchError
from mpgroups.comm.spatial_transfer import gather_spatial, scatter_spatial, spatial_shard
from mpgroups.layers.spatial_conv import SpatialConv1d, SpatialConv2d, SpatialConv3d
from mpgroups.sharding.spatial import ZERO_ROW, ConvRows, HaloTooWideError, halo_plan, row_blocks

TOLERANCE = 1e-10
SPATIAL = {1: SpatialConv1d, 2: SpatialConv2d, 3: SpatialConv3d}
PLAIN = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# The plans alone (one process) ------------------------------------------------------------


def _assemble(plans, blocks):
    """Every rank's window, its exchange played out in one process."""
    received = {}
    for plan in plans:
        for reader, rows in plan.sends:
            received[reader, plan.rank] = blocks[plan.rank][..., list(rows)]
    windows = []
    for plan in plans:
        pieces = []
        for source, start, length in plan.runs:
            if source == ZERO_ROW:
                pieces.append(blocks[0].new_zeros(*blocks[0].shape[:-1], length))
            elif source == plan.rank:
                pieces.append(blocks[source][..., start : start + length])
            else:
                pieces.append(received[plan.rank, source][..., start : start + length])
        windows.append(torch.cat(pieces, -1))
    return windows


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_every_rank_window_gives_its_block_of_the_conv(mode):
    checked = 0
    for kernel, stride, dilation, pad, extra, size, world in itertools.product(
        [1, 2, 3, 5], [1, 2, 3], [1, 2], [0, 1, 2], [0, 1], [7, 10, 23], [2, 3, 4]
    ):
        pad_hi = pad + extra if mode == "zeros" else pad
        rows = ConvRows(kernel, stride, dilation, pad, pad_hi, mode)
        try:
            plans = [halo_plan(rows, size, world, r) for r in range(world)]
        except (HaloTooWideError, ValueError):
            continue
        x = torch.randn(1, 1, size, dtype=torch.float64)
        weight = torch.randn(1, 1, kernel, dtype=torch.float64)
        padded = F.pad(x, (pad, pad_hi), mode="constant" if mode == "zeros" else mode)
        expected = F.conv1d(padded, weight, stride=stride, dilation=dilation)
        blocks = [x[..., a:b] for a, b in row_blocks(size, world)]
        outputs = [
            F.conv1d(w, weight, stride=stride, dilation=dilation) for w in _assemble(plans, blocks)
        ]
        assert [o.shape[-1] for o in outputs] == [b - a for a, b in plans[0].out_rows]
        torch.testing.assert_close(torch.cat(outputs, -1), expected, rtol=0, atol=1e-12)
        checked += 1
    assert checked > 500


def test_a_block_smaller_than_its_halo_names_the_smallest_size_that_works():
    rows = ConvRows(kernel=5, dilation=2, pad_lo=4, pad_hi=4)
    with pytest.raises(HaloTooWideError, match="15 rows or more works"):
        halo_plan(rows, 10, 4, 0)
    halo_plan(rows, 15, 4, 0)  # and it does
    with pytest.raises(HaloTooWideError, match="each rank needs at least one output row"):
        halo_plan(ConvRows(kernel=3, stride=4), 9, 4, 0)


def test_row_blocks_are_tensor_splits():
    for size, world in itertools.product(range(12), range(1, 5)):
        parts = torch.tensor_split(torch.arange(size), world)
        assert [b - a for a, b in row_blocks(size, world)] == [len(p) for p in parts]


# Against nn.ConvNd on P ranks -------------------------------------------------------------


def _cases():
    cases = [
        dict(dims=2, kernel_size=3, padding=1),
        dict(dims=2, kernel_size=3, padding=1, stride=2, padding_mode="reflect"),
        dict(dims=2, kernel_size=4, padding="same", dilation=2, padding_mode="circular"),
        dict(dims=2, kernel_size=3, padding="valid", stride=3, bias=False),
        dict(dims=2, kernel_size=(5, 3), padding=(2, 1), stride=(2, 1), padding_mode="replicate"),
        dict(dims=2, kernel_size=2, padding=0, stride=2, groups=2),
        dict(dims=2, kernel_size=3, padding=(1, 2), dilation=(1, 2), channels_last=True),
        dict(dims=1, kernel_size=5, padding=2, stride=3, padding_mode="reflect"),
        dict(dims=1, kernel_size=3, padding="same", dilation=3),
        dict(dims=3, kernel_size=3, padding=1, stride=(2, 1, 1)),
        dict(dims=3, kernel_size=(3, 1, 3), padding="same", padding_mode="circular"),
    ]
    return cases


def _case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items() if k != "dims").replace(" ", "") or "plain"


def _spatial_sizes(dims: int, world: int) -> tuple[int, ...]:
    rows = 6 * world + 3  # uneven at P = 2 and 4
    return (rows, 7, 5)[:dims] if dims > 1 else (rows,)


def _step_against(ctx, plain: nn.Module, layer: nn.Module, x) -> None:
    """One forward and backward of ``layer`` on this rank's rows of ``x`` against ``plain`` on
    all of ``x``: this rank's output rows and the whole input grad equal one device's."""
    reference_x = x.clone().requires_grad_()
    expected = plain(reference_x)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    x = x.clone().requires_grad_()
    out = layer(spatial_shard(x, ctx.process_group))
    own = torch.tensor_split(expected, ctx.world_size, dim=2)[ctx.rank]
    torch.testing.assert_close(out, own.detach(), rtol=TOLERANCE, atol=TOLERANCE)
    out.backward(torch.tensor_split(grad, ctx.world_size, dim=2)[ctx.rank])
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=TOLERANCE, atol=TOLERANCE)


def _against_nn_conv(ctx, case: dict) -> None:
    dims = case["dims"]
    options = {k: v for k, v in case.items() if k not in ("dims", "channels_last")}
    torch.manual_seed(0)
    plain = PLAIN[dims](4, 6, **options, dtype=torch.float64)
    layer = SPATIAL[dims].from_conv(plain, ctx.process_group)
    x = torch.randn(2, 4, *_spatial_sizes(dims, ctx.world_size), dtype=torch.float64)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    with mpgroups.CommCounter() as comm:
        _step_against(ctx, plain, layer, x)
    for name, parameter in plain.named_parameters():
        got = dict(layer.named_parameters())[name].grad
        torch.testing.assert_close(got, parameter.grad, rtol=TOLERANCE, atol=TOLERANCE)
    assert list(layer.state_dict()) == list(plain.state_dict())
    # weight and bias grads summed in one all-reduce; a halo exchange forward and one back
    # where this rank sends or receives rows (none where strides and blocks line up); and
    # the all-gather of spatial_shard's backward, the whole input's grad
    ops = comm.ops()
    assert ops["all_reduce"] == 1 and ops["all_gather"] == 1, ops
    assert ops["halo_exchange"] in (0, 2) and len(ops) <= 3, ops


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_spatial_conv_equals_nn_conv(pool, case, world_size):
    pool.run(_against_nn_conv, world_size, case)


def _double_backward(ctx, grid: bool = False) -> None:
    """``grid``: on the 2 × 2 grid (rows and columns split, corners from the diagonal)."""
    torch.manual_seed(1)
    where = spatial_grid() if grid else ctx.process_group
    plain = nn.Conv2d(1, 2, 3, stride=2, padding=1, padding_mode="reflect", dtype=torch.float64)
    layer = SpatialConv2d.from_conv(plain, where)

    def split(x, weight, bias):  # the whole output on every rank: every rank perturbs alike
        block = spatial_shard(x, where)
        out = functional_call(layer, {"weight": weight, "bias": bias}, (block,))
        return gather_spatial(out, process_group=where)

    size = (5, 4) if grid else (7, 3)  # rows 4 + 3; on the grid 3 + 2 rows, 2 + 2 columns
    x = torch.randn(1, 1, *size, dtype=torch.float64, requires_grad=True)
    weight = plain.weight.detach().clone().requires_grad_()
    bias = plain.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(split, (x, weight, bias))
    # and the same values as one device's conv
    torch.testing.assert_close(split(x, weight, bias), plain(x), rtol=TOLERANCE, atol=TOLERANCE)


def test_double_backward_through_the_halo_exchange(pool):
    pool.run(_double_backward, 2)


# Entering and leaving the layout --------------------------------------------------------


def _transfers(ctx) -> None:
    group, world, rank = ctx.process_group, ctx.world_size, ctx.rank
    torch.manual_seed(2)
    whole = torch.randn(2, 3, 4 * world + 1, 5, dtype=torch.float64)
    own = torch.tensor_split(whole, world, dim=2)[rank]
    weights = torch.randn_like(whole)
    # shard, then gather on every rank: the whole tensor; gradients as of the whole tensor
    x = whole.clone().requires_grad_()
    block = spatial_shard(x, group)
    assert torch.equal(block, own)
    back = gather_spatial(block * 2, process_group=group)
    assert torch.equal(back, whole * 2)
    (back * weights).sum().backward()
    torch.testing.assert_close(x.grad, 2 * weights)
    # scatter from rank 1 and gather onto rank 1 (only it holds the whole)
    source = whole.clone().requires_grad_() if rank == 1 else None
    scattered = scatter_spatial(source, src=1, process_group=group)
    assert torch.equal(scattered, own)
    gathered = gather_spatial(scattered, 1, process_group=group)
    assert torch.equal(gathered, whole) if rank == 1 else gathered.numel() == 0
    if rank == 1:
        (gathered * weights).sum().backward()
        torch.testing.assert_close(source.grad, weights)
    else:
        gathered.sum().backward()
    # along dim 3
    block3 = spatial_shard(whole, group, dim=3)
    assert torch.equal(block3, torch.tensor_split(whole, world, dim=3)[rank])
    assert torch.equal(gather_spatial(block3, process_group=group, dim=3), whole)


@pytest.mark.parametrize("world_size", [2, 4])
def test_shard_scatter_and_gather_spatial(pool, world_size):
    pool.run(_transfers, world_size)


# Bad input: one clear error on every rank ------------------------------------------------


def _bad_blocks(ctx, problem: str) -> str:
    kernel = 7 if problem == "small" else 3  # 7: a block of 2 or 3 rows reads 2 ranks away
    layer = SpatialConv2d(3, 4, kernel, padding=kernel // 2, process_group=ctx.process_group)
    rows = torch.tensor_split(torch.arange(10), ctx.world_size)[ctx.rank].numel()
    channels = 3
    if problem == "rows" and ctx.rank == 1:
        rows += 1
    if problem == "channels" and ctx.rank == 1:
        channels = 5
    x = torch.randn(2, channels, rows, 6)
    expected = HaloTooWideError if problem == "small" else InputMismatchError
    with pytest.raises(expected) as info:
        layer(x)
    # the layer goes on working after the error (11 rows: enough for kernel 7 at P = 4)
    good_rows = torch.tensor_split(torch.arange(11), ctx.world_size)[ctx.rank].numel()
    good = torch.randn(2, 3, good_rows, 6)
    assert layer(good).shape[2] == good_rows
    return str(info.value)


@pytest.mark.parametrize("problem", ["rows", "channels", "small"])
def test_blocks_that_do_not_fit_raise_on_every_rank(pool, problem):
    messages = pool.run(_bad_blocks, 4, problem)
    if problem == "rows":
        assert "rank 1 sent 4 rows" in messages[0] and "balanced blocks of 11 rows" in messages[0]
    elif problem == "channels":
        assert "[2, 5, 3, 6]" in messages[0] and "cannot take" in messages[0]
    else:
        assert "10 rows split over 4 ranks" in messages[0] and "11 rows or more" in messages[0]
    assert len(set(m.splitlines()[-1] for m in messages)) == 1


def test_one_rank_is_nn_conv_bitwise():
    torch.manual_seed(3)
    plain = nn.Conv2d(3, 5, 3, stride=2, padding="valid", padding_mode="zeros")
    layer = SpatialConv2d.from_conv(plain)
    x = torch.randn(2, 3, 9, 8)
    assert torch.equal(layer(x), plain(x))
    assert list(layer.state_dict()) == ["weight", "bias"]


def _habits(ctx) -> None:
    import copy

    group = ctx.process_group
    torch.manual_seed(4)
    plain = nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=torch.float64)
    layer = SpatialConv2d.from_conv(plain, group)
    whole = torch.randn(2, 3, 8, 11, dtype=torch.float64).transpose(2, 3)  # non-contiguous
    expected = torch.tensor_split(plain(whole), ctx.world_size, dim=2)[ctx.rank]
    block = spatial_shard(whole, group)
    with torch.no_grad():
        torch.testing.assert_close(layer(block), expected, rtol=TOLERANCE, atol=TOLERANCE)
    with torch.inference_mode():
        torch.testing.assert_close(layer(block), expected, rtol=TOLERANCE, atol=TOLERANCE)
    twin = copy.deepcopy(layer)  # an EMA copy
    torch.testing.assert_close(twin(block), expected.detach(), rtol=TOLERANCE, atol=TOLERANCE)
    assert twin.weight is not layer.weight and twin.process_group is layer.process_group


@pytest.mark.parametrize("world_size", [2, 4])
def test_spatial_conv_under_user_habits(pool, world_size):
    pool.run(_habits, world_size)


# Pooling ------------------------------------------------------------------------------------


def _pool_cases():
    return [
        (2, "max", dict(kernel_size=3, stride=2, padding=1)),
        (2, "max", dict(kernel_size=2, stride=2, ceil_mode=True)),
        (2, "max", dict(kernel_size=3, stride=1, padding=1, dilation=2)),
        (2, "avg", dict(kernel_size=3, stride=2, padding=1)),
        (2, "avg", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False)),
        (2, "avg", dict(kernel_size=(3, 2), stride=2, padding=1, ceil_mode=True)),
        (2, "avg", dict(kernel_size=2, ceil_mode=True, count_include_pad=False)),
        (2, "avg", dict(kernel_size=3, stride=2, padding=1, divisor_override=5)),
        (1, "max", dict(kernel_size=3, stride=3, ceil_mode=True)),
        (
            1,
            "avg",
            dict(kernel_size=4, stride=2, padding=2, ceil_mode=True, count_include_pad=False),
        ),
        (3, "max", dict(kernel_size=2, stride=2)),
        (3, "avg", dict(kernel_size=3, stride=(2, 1, 2), padding=1)),
    ]


def _pooling(ctx, dims: int, kind: str, options: dict) -> None:
    from mpgroups.layers import spatial_pool

    plain = getattr(nn, f"{kind[0].upper()}{kind[1:]}Pool{dims}d")(**options)
    layer = getattr(spatial_pool, f"Spatial{type(plain).__name__}").from_module(
        plain, ctx.process_group
    )
    torch.manual_seed(5)
    x = torch.randn(2, 3, *_spatial_sizes(dims, ctx.world_size), dtype=torch.float64)
    _step_against(ctx, plain, layer, x)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "dims, kind, options", _pool_cases(), ids=lambda v: str(v).replace(" ", "")
)
def test_spatial_pooling_equals_nn_pooling(pool, dims, kind, options, world_size):
    pool.run(_pooling, world_size, dims, kind, options)


# Norms over the whole image ------------------------------------------------------------------


def _norm(ctx, kind: str) -> None:
    import copy

    from mpgroups.layers import spatial_norm
    from mpgroups.plans.global_batch import sync_batch_norms

    torch.manual_seed(6)
    dims = 3 if kind == "group3d" else 2
    if kind.startswith("group"):
        plain = nn.GroupNorm(2, 4, dtype=torch.float64)
        layer = spatial_norm.SpatialGroupNorm(
            2, 4, process_group=ctx.process_group, dtype=torch.float64
        )
    elif kind == "instance":
        options = dict(affine=True, track_running_stats=True, momentum=0.3, dtype=torch.float64)
        plain = nn.InstanceNorm2d(4, **options)
        layer = spatial_norm.SpatialInstanceNorm2d(4, process_group=ctx.process_group, **options)
    else:  # BatchNorm: match_global_batch's statistics over the split rows, grads summed
        plain = nn.BatchNorm2d(4, momentum=0.3, dtype=torch.float64)
        layer = sync_batch_norms(copy.deepcopy(plain), ctx.process_group)
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.uniform_(0.5, 1.5)
    layer.load_state_dict(plain.state_dict())
    for _step in range(2):
        x = torch.randn(3, 4, *_spatial_sizes(dims, ctx.world_size), dtype=torch.float64) * 3 + 1
        _step_against(ctx, plain, layer, x)
    for name, parameter in plain.named_parameters():
        got = dict(layer.named_parameters())[name].grad
        torch.testing.assert_close(got, parameter.grad, rtol=TOLERANCE, atol=TOLERANCE)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(
            dict(layer.named_buffers())[name], buffer, rtol=TOLERANCE, atol=0
        )
    plain.eval(), layer.eval()
    x = torch.randn(3, 4, *_spatial_sizes(dims, ctx.world_size), dtype=torch.float64)
    own = torch.tensor_split(plain(x), ctx.world_size, dim=2)[ctx.rank]
    torch.testing.assert_close(
        layer(spatial_shard(x, ctx.process_group)), own, rtol=TOLERANCE, atol=TOLERANCE
    )


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["group", "group3d", "instance", "batch"])
def test_norms_take_the_whole_image_statistics(pool, kind, world_size):
    pool.run(_norm, world_size, kind)


# Upsampling and transposed convs ------------------------------------------------------------


def _upsample_cases():
    return [
        (2, dict(scale_factor=2, mode="nearest")),
        (2, dict(scale_factor=(3, 2), mode="nearest-exact")),
        (2, dict(scale_factor=2, mode="bilinear", align_corners=False)),
        (2, dict(scale_factor=3, mode="bilinear", align_corners=False)),
        (1, dict(scale_factor=2, mode="linear")),
        (3, dict(scale_factor=2, mode="trilinear")),
        (3, dict(scale_factor=2, mode="nearest")),
    ]


def _upsampling(ctx, dims: int, options: dict) -> None:
    from mpgroups.layers.spatial_upsample import SpatialUpsample

    plain = nn.Upsample(**options)
    layer = SpatialUpsample.from_module(plain, ctx.process_group)
    torch.manual_seed(7)
    x = torch.randn(2, 3, *_spatial_sizes(dims, ctx.world_size), dtype=torch.float64)
    _step_against(ctx, plain, layer, x)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("dims, options", _upsample_cases(), ids=lambda v: str(v).replace(" ", ""))
def test_spatial_upsample_equals_nn_upsample(pool, dims, options, world_size):
    pool.run(_upsampling, world_size, dims, options)


def _refused_upsamplings(ctx) -> None:
    from mpgroups.layers.spatial_upsample import SpatialUpsample

    group = ctx.process_group
    for options, named in [
        (dict(size=(5, 5)), "not a whole scale_factor"),
        (dict(scale_factor=1.5), "not a whole scale_factor"),
        (dict(scale_factor=2, mode="bilinear", align_corners=True), "align_corners=True"),
        (dict(scale_factor=2, mode="bicubic"), "mode='bicubic'"),
    ]:
        with pytest.raises(NotImplementedError, match=re.escape(named)):
            SpatialUpsample(**options, process_group=group)


def test_upsample_settings_a_split_cannot_take_are_refused_by_name(pool):
    pool.run(_refused_upsamplings, 2)
    from mpgroups.layers.spatial_upsample import SpatialUpsample

    # with no group the layer is nn.Upsample, whatever its settings
    layer = SpatialUpsample(size=(5, 5), mode="bilinear", align_corners=True)
    x = torch.randn(1, 2, 3, 3)
    assert torch.equal(layer(x), nn.Upsample(size=(5, 5), mode="bilinear", align_corners=True)(x))


def _transposed_cases():
    return [
        (2, dict(kernel_size=2, stride=2)),
        (2, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
        (2, dict(kernel_size=3, stride=1, padding=1, bias=False)),
        (2, dict(kernel_size=2, stride=3)),
        (2, dict(kernel_size=3, stride=2, dilation=2, padding=(2, 1), groups=2)),
        (1, dict(kernel_size=4, stride=2, padding=1)),
        (3, dict(kernel_size=2, stride=2)),
    ]


def _transposed(ctx, dims: int, options: dict) -> None:
    from mpgroups.layers import spatial_conv

    torch.manual_seed(8)
    plain = getattr(nn, f"ConvTranspose{dims}d")(4, 6, **options, dtype=torch.float64)
    layer = getattr(spatial_conv, f"SpatialConvTranspose{dims}d").from_conv(
        plain, ctx.process_group
    )
    x = torch.randn(2, 4, *_spatial_sizes(dims, ctx.world_size), dtype=torch.float64)
    _step_against(ctx, plain, layer, x)
    for name, parameter in plain.named_parameters():
        got = dict(layer.named_parameters())[name].grad
        torch.testing.assert_close(got, parameter.grad, rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "dims, options", _transposed_cases(), ids=lambda v: str(v).replace(" ", "")
)
def test_spatial_conv_transpose_equals_nn(pool, dims, options, world_size):
    pool.run(_transposed, world_size, dims, options)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "dims, kind, size",
    [(2, "Avg", (6, 4)), (2, "Max", (5, None)), (1, "Avg", 7), (3, "Max", (4, 2, 3))],
    ids=str,
)
def test_adaptive_pooling_to_a_global_size(pool, dims, kind, size, world_size):
    pool.run(_pooling, world_size, dims, f"adaptive{kind}", dict(output_size=size))


def _dropout(ctx, channels_last: bool) -> None:
    from mpgroups.layers.spatial_dropout import SpatialDropout

    x = torch.randn(2, 3, 9, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(11)
    expected = nn.Dropout(0.4)(x)
    torch.manual_seed(11)  # every rank seeded alike: each keeps its rows of the same mask
    out = SpatialDropout(0.4, process_group=ctx.process_group)(spatial_shard(x, ctx.process_group))
    own = torch.tensor_split(expected, ctx.world_size, dim=2)[ctx.rank]
    assert torch.equal(out, own)


@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_keeps_its_rows_of_the_one_device_mask(pool, channels_last):
    pool.run(_dropout, 4, channels_last)
