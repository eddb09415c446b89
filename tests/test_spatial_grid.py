"""Spatial split over a 2 × 2 grid (a ``DeviceMesh`` with dims ``("sp_h", "sp_w")``): rank
``(h, w)`` holds block ``h`` of dim 2 and block ``w`` of dim 3. Every layer against
``torch.nn`` in float64 on uneven blocks along both dims (15 × 7 at 2 × 2), the corners of
a window coming from the diagonal neighbour; the layout's entry and exit; bad blocks."""

from __future__ import annotations

import re

import pytest
import torch
from dist_harness import own_block, spatial_grid
from test_spatial import (
    PLAIN,
    SPATIAL,
    TOLERANCE,
    _case_id,
    _cases,
    _double_backward,
    _pool_cases,
    _transposed_cases,
    _upsample_cases,
)
from torch import nn

import mpgroups
from mpgroups.comm.checks import InputMismatchError
from mpgroups.comm.spatial_transfer import gather_spatial, scatter_spatial, spatial_shard
from mpgroups.sharding.spatial import HaloTooWideError

_grid = spatial_grid


def _sizes(dims: int) -> tuple[int, ...]:
    return (15, 7, 5)[:dims]  # 8 + 7 rows, 4 + 3 columns


def _step_against(ctx, plain: nn.Module, layer: nn.Module, x) -> None:
    """As in the 1-D tests: this rank's block of the output and the whole input grad equal
    one device's, and so do the parameters' grads."""
    reference_x = x.clone().requires_grad_()
    expected = plain(reference_x)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    x = x.clone().requires_grad_()
    out = layer(spatial_shard(x, _grid()))
    torch.testing.assert_close(
        out, own_block(ctx, expected, "grid").detach(), rtol=TOLERANCE, atol=TOLERANCE
    )
    out.backward(own_block(ctx, grad, "grid"))
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=TOLERANCE, atol=TOLERANCE)
    for name, parameter in plain.named_parameters():
        got = dict(layer.named_parameters())[name].grad
        torch.testing.assert_close(got, parameter.grad, rtol=TOLERANCE, atol=TOLERANCE)


def _conv(ctx, case: dict) -> dict:
    dims = case["dims"]
    options = {k: v for k, v in case.items() if k not in ("dims", "channels_last")}
    torch.manual_seed(0)
    plain = PLAIN[dims](4, 6, **options, dtype=torch.float64)
    layer = SPATIAL[dims].from_conv(plain, _grid())
    x = torch.randn(2, 4, *_sizes(dims), dtype=torch.float64)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    with mpgroups.CommCounter() as comm:
        _step_against(ctx, plain, layer, x)
    return comm.ops()


@pytest.mark.parametrize("case", [c for c in _cases() if c["dims"] > 1], ids=_case_id)
def test_grid_conv_equals_nn_conv(pool, case):
    ops = pool.run(_conv, 4, case)
    # weight and bias grads in one all-reduce over the grid; spatial_shard's backward
    # gathers along each dim; halo exchanges along each dim, forward and back
    assert all(o["all_reduce"] == 1 and o["all_gather"] == 2 for o in ops), ops
    assert all(o.get("halo_exchange", 0) in (0, 2, 4) for o in ops), ops


def _pooling(ctx, dims: int, kind: str, options: dict) -> None:
    from mpgroups.layers import spatial_pool

    plain = getattr(nn, f"{kind[0].upper()}{kind[1:]}Pool{dims}d")(**options)
    twin = getattr(spatial_pool, f"Spatial{type(plain).__name__}")
    torch.manual_seed(5)
    x = torch.randn(2, 3, *_sizes(dims), dtype=torch.float64)
    _step_against(ctx, plain, twin.from_module(plain, _grid()), x)


@pytest.mark.parametrize(
    "dims, kind, options",
    [c for c in _pool_cases() if c[0] > 1]
    + [(2, "adaptiveAvg", dict(output_size=(6, 4))), (2, "adaptiveMax", dict(output_size=(5, 3)))]
    + [(3, "adaptiveMax", dict(output_size=(4, 2, 3)))],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_grid_pooling_equals_nn_pooling(pool, dims, kind, options):
    pool.run(_pooling, 4, dims, kind, options)


def _norm(ctx, kind: str) -> None:
    import copy

    from mpgroups.layers import spatial_norm
    from mpgroups.plans.global_batch import sync_batch_norms

    torch.manual_seed(6)
    options = dict(dtype=torch.float64)
    if kind == "group":
        plain = nn.GroupNorm(2, 4, **options)
        layer = spatial_norm.SpatialGroupNorm(2, 4, process_group=_grid(), **options)
    elif kind == "instance":
        options.update(affine=True, track_running_stats=True, momentum=0.3)
        plain = nn.InstanceNorm2d(4, **options)
        layer = spatial_norm.SpatialInstanceNorm2d(4, process_group=_grid(), **options)
    else:
        plain = nn.BatchNorm2d(4, momentum=0.3, **options)
        mpgroups.parallelize  # noqa: B018 - the grid's whole group comes from the plan's helper
        from mpgroups.comm.spatial_groups import resolve_spatial_split

        layer = sync_batch_norms(copy.deepcopy(plain), resolve_spatial_split(_grid())[0])
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.uniform_(0.5, 1.5)
    layer.load_state_dict(plain.state_dict())
    for _step in range(2):
        x = torch.randn(3, 4, *_sizes(2), dtype=torch.float64) * 3 + 1
        _step_against(ctx, plain, layer, x)
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(
            dict(layer.named_buffers())[name], buffer, rtol=TOLERANCE, atol=0
        )


@pytest.mark.parametrize("kind", ["group", "instance", "batch"])
def test_grid_norms_take_the_whole_image_statistics(pool, kind):
    pool.run(_norm, 4, kind)


def _resampling(ctx, kind: str, dims: int, options: dict) -> None:
    """An ``nn.Upsample`` or an ``nn.ConvTransposeNd`` against its twin on the grid."""
    from mpgroups.layers import spatial_conv
    from mpgroups.layers.spatial_upsample import SpatialUpsample

    torch.manual_seed(8)
    if kind == "upsample":
        plain, channels = nn.Upsample(**options), 3
        layer = SpatialUpsample.from_module(plain, _grid())
    else:
        plain = getattr(nn, f"ConvTranspose{dims}d")(4, 6, **options, dtype=torch.float64)
        twin, channels = getattr(spatial_conv, f"SpatialConvTranspose{dims}d"), 4
        layer = twin.from_conv(plain, _grid())
    x = torch.randn(2, channels, *_sizes(dims), dtype=torch.float64)
    _step_against(ctx, plain, layer, x)


@pytest.mark.parametrize(
    "kind, dims, options",
    [("upsample", *c) for c in _upsample_cases() if c[0] > 1]
    + [("transpose", *c) for c in _transposed_cases() if c[0] > 1],
    ids=lambda v: str(v).replace(" ", ""),
)
def test_grid_upsample_and_conv_transpose_equal_nn(pool, kind, dims, options):
    pool.run(_resampling, 4, kind, dims, options)


def _dropout(ctx) -> None:
    from mpgroups.layers.spatial_dropout import SpatialDropout

    x = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    torch.manual_seed(11)
    expected = nn.Dropout(0.4)(x)
    torch.manual_seed(11)
    out = SpatialDropout(0.4, process_group=_grid())(spatial_shard(x, _grid()))
    assert torch.equal(out, own_block(ctx, expected, "grid"))


def test_grid_dropout_keeps_its_block_of_the_one_device_mask(pool):
    pool.run(_dropout, 4)


def test_grid_double_backward_through_both_exchanges(pool):
    pool.run(_double_backward, 4, True)


def _transfers(ctx) -> None:
    grid = _grid()
    torch.manual_seed(2)
    whole = torch.randn(2, 3, 9, 5, dtype=torch.float64)
    weights = torch.randn_like(whole)
    x = whole.clone().requires_grad_()
    block = spatial_shard(x, grid)
    assert torch.equal(block, own_block(ctx, whole, "grid"))
    back = gather_spatial(block * 2, process_group=grid)
    assert torch.equal(back, whole * 2)
    (back * weights).sum().backward()
    torch.testing.assert_close(x.grad, 2 * weights)
    # scatter from global rank 3 (at (1, 1)) and gather onto it
    source = whole.clone().requires_grad_() if ctx.rank == 3 else None
    scattered = scatter_spatial(source, src=3, process_group=grid)
    assert torch.equal(scattered, own_block(ctx, whole, "grid"))
    gathered = gather_spatial(scattered, 3, process_group=grid)
    if ctx.rank == 3:
        assert torch.equal(gathered, whole)
        (gathered * weights).sum().backward()
        torch.testing.assert_close(source.grad, weights)
    else:
        assert gathered.numel() == 0
        gathered.sum().backward()
    with pytest.raises(ValueError, match="leave dim=2"):
        spatial_shard(whole, grid, dim=3)


def test_grid_shard_scatter_and_gather(pool):
    pool.run(_transfers, 4)


def _bad_blocks(ctx, problem: str) -> str:
    from mpgroups.layers.spatial_conv import SpatialConv2d

    kernel = 5 if problem == "small" else 3
    layer = SpatialConv2d(3, 4, kernel, padding=kernel // 2, process_group=_grid())
    block = own_block(ctx, torch.empty(2, 3, 10, 6), "grid")
    shape = list(block.shape)
    if problem == "columns" and ctx.rank == 1:
        shape[3] += 1
    if problem == "small":  # 1 column: none on the second column of ranks
        shape[3] = (1, 0)[ctx.rank % 2]
    expected = HaloTooWideError if problem == "small" else InputMismatchError
    with pytest.raises(expected) as info:
        layer(torch.randn(shape))
    assert layer(block.normal_()).shape == block.shape[:1] + (4,) + block.shape[2:]
    return str(info.value)


@pytest.mark.parametrize("problem", ["columns", "small"])
def test_grid_blocks_that_do_not_fit_raise_on_every_rank(pool, problem):
    messages = pool.run(_bad_blocks, 4, problem)
    if problem == "columns":
        assert "rank 1 sent (5, 4) rows" in messages[0], messages[0]
        assert "balanced blocks of 10 × 7 rows" in messages[0], messages[0]
    else:
        assert re.search(r"along dim 3: 1 rows split over 2 ranks .* 2 rows or more", messages[0])
    assert len({m.splitlines()[-1] for m in messages}) == 1


def _refusals(ctx) -> None:
    from mpgroups.layers.spatial_conv import SpatialConv1d, SpatialConv2d

    with pytest.raises(ValueError, match="takes 1 spatial dim"):
        SpatialConv1d(2, 2, 3, process_group=_grid())
    other = spatial_grid(("dp", "sp"))
    with pytest.raises(ValueError, match=re.escape("mesh_dim_names=('sp_h', 'sp_w')")):
        SpatialConv2d(2, 2, 3, process_group=other)


def test_grid_refuses_what_it_cannot_split(pool):
    pool.run(_refusals, 4)
