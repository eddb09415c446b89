"""The names a torch user reads without a glossary: plan styles, ``split`` values and layouts in
torch's words, ranks as torch numbers them, and the names of mpgroups 0.1 kept for one release
with a ``FutureWarning``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Partial, Replicate, Shard

import mpgroups


@pytest.mark.parametrize(
    "old, new",
    [
        ("GroupParallel", "ParallelLayer"),
        ("Replicated", "NoParallel"),
        ("Placement", "GroupPlacement"),
    ],
)
def test_old_names_warn_and_are_the_new_ones(old, new):
    with pytest.warns(FutureWarning, match=f"mpgroups.{old} is deprecated.*use mpgroups.{new}"):
        value = getattr(mpgroups, old)
    assert value is getattr(mpgroups, new)
    assert old not in mpgroups.__all__ and new in mpgroups.__all__
    with pytest.raises(AttributeError, match="no attribute 'Frobnicate'"):
        mpgroups.Frobnicate  # noqa: B018


def test_new_names_do_not_warn(recwarn):
    mpgroups.ParallelLayer(split="rowwise", input_layout=Shard(1))
    mpgroups.GroupParallelConv2d(8, 8, 3, groups=4, split="colwise")
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


@pytest.mark.parametrize("old, new", [("out", "colwise"), ("in", "rowwise")])
def test_old_split_values_warn_at_the_callers_line_and_mean_the_new(old, new):
    with pytest.warns(FutureWarning, match=f"split='{old}' is deprecated.*split='{new}'") as got:
        style = mpgroups.ParallelLayer(split=old, input_layout="sharded")
    assert style.split == new
    assert got[0].filename == __file__
    with pytest.warns(FutureWarning, match=f"split='{old}' is deprecated") as got:
        layer = mpgroups.ParallelLinear(8, 4, split=old, input_layout="sharded")
    assert layer.split == new  # (one rank holds every group: its shards are colwise)
    assert got[0].filename == __file__
    with pytest.raises(ValueError, match="split must be one of"):
        mpgroups.ParallelLayer(split="columns")


def test_layouts_as_dtensor_placements_mean_the_layout_names():
    assert mpgroups.ParallelLayer(Shard(1), Replicate()) == mpgroups.ParallelLayer(
        "sharded", "replicated"
    )
    assert mpgroups.ParallelLayer(Shard(-1), Shard(-1), split="rowwise").input_layout == "sharded"
    assert mpgroups.ChannelLocal(output_layout=Replicate()).output_layout == "replicated"
    conv = mpgroups.GroupParallelConv2d(8, 8, 3, groups=4, input_layout=Shard(1))
    assert (conv.input_layout, conv.output_layout) == ("sharded", "replicated")
    linear = mpgroups.ParallelLinear(8, 4, input_layout=Shard(-1), output_layout=Shard(-1))
    assert (linear.input_layout, linear.output_layout) == ("sharded", "sharded")


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: mpgroups.GroupParallelConv2d(8, 8, 3, input_layout=Shard(2)), r"Shard\(1\)"),
        (lambda: mpgroups.ParallelLinear(8, 4, output_layout=Shard(1)), r"Shard\(-1\)"),
        (lambda: mpgroups.ParallelLayer(output_layout=Partial()), "output_layout must be"),
        (lambda: mpgroups.ParallelLayer(input_layout="shard"), "input_layout must be one of"),
    ],
)
def test_a_layout_that_is_not_one_raises_naming_the_argument(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_unknown_keyword_raises_type_error_listing_what_the_layer_takes():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['process_grup'\]"):
        mpgroups.GroupParallelConv2d(8, 8, 3, process_grup=None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        mpgroups.ParallelLinear.from_linear(torch.nn.Linear(4, 4), split="rowwise", frob=1)


def _ranks_as_torch_numbers_them(ctx) -> list[float]:
    """In the group of global ranks 2 and 3, ``src=3`` is its group rank 1, as in
    ``torch.distributed.scatter``; ``group_src=1`` names the same rank."""
    pair = dist.new_group([2, 3])  # every rank makes it, so the ranks' groups stay alike
    if ctx.rank < 2:
        return []
    torch.manual_seed(0)
    base = torch.randn(2, 4, 3, 3)
    x = base * 10**ctx.rank  # what each rank would send differs
    by_global = mpgroups.scatter_channels(x, src=3, groups=2, process_group=pair)
    by_group = mpgroups.scatter_channels(x, groups=2, process_group=pair, group_src=1)
    assert torch.equal(by_global, by_group)
    whole = base * 1000  # rank 3's x
    assert torch.equal(by_global, whole[:, 2 * (ctx.rank - 2) : 2 * (ctx.rank - 1)])
    at_two = mpgroups.gather_channels(by_global, dst=2, groups=2, process_group=pair)
    assert (at_two.numel() > 0) == (ctx.rank == 2)
    if ctx.rank == 2:
        assert torch.equal(at_two, whole)
    with pytest.raises(ValueError, match=r"src=1 is a global rank.*global ranks \[2, 3\]"):
        mpgroups.scatter_channels(x, src=1, groups=2, process_group=pair)
    with pytest.raises(ValueError, match="give dst .* or group_dst, not both"):
        mpgroups.gather_channels(by_global, dst=2, groups=2, process_group=pair, group_dst=0)
    return [float(at_two.sum()) if ctx.rank == 2 else 0.0]


def test_src_and_dst_are_global_ranks_as_in_torch(pool):
    results = pool.run(_ranks_as_torch_numbers_them, 4)
    assert results[:2] == [[], []] and len(results[2]) == 1
