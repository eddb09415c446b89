"""The CUDA paths: NCCL, buffers on the process group's device, dropout's RNG on the GPU.

Tests marked ``cuda`` need a CUDA GPU; where there is none they are skipped and the summary
says so (``-rs``). Nothing else in the suite skips. The dropout test runs on the CPU always.
"""

from __future__ import annotations

import copy

import pytest
import torch
import tv_models
from dist_harness import run_in_one_rank_world
from parity import assert_close
from torch import nn

import mpgroups
from mpgroups.layers.channel_modules import ShardedDropout
from mpgroups.sharding.layout import ChannelShards

NO_GPU = "needs a CUDA GPU; this machine has none (the CUDA paths run where one exists)"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind, shape, memory",
    [
        (nn.Dropout, (4, 8, 5, 5), torch.contiguous_format),
        (nn.Dropout, (4, 8, 5, 5), torch.channels_last),
        (nn.Dropout2d, (4, 8, 5, 5), torch.contiguous_format),
        (nn.Dropout, (4, 8 * 36), torch.contiguous_format),  # flattened channel shards
    ],
)
def test_sharded_dropout_keeps_the_slice_of_the_whole_mask(device, kind, shape, memory):
    """Each rank's ShardedDropout gives exactly its slice of what nn.Dropout gives on the
    whole tensor from the same RNG state (CUDA: the fused kernel's Philox stream)."""
    slices = ((0, 3), (3, 8))  # uneven channel shards over two ranks
    x = torch.randn(shape, device=device).contiguous(memory_format=memory)
    torch.manual_seed(0)
    whole = kind(0.5)(x)
    scale = shape[1] // 8
    for rank, (start, stop) in enumerate(slices):
        dropout = ShardedDropout(kind(0.5), ChannelShards(None, slices, rank))
        torch.manual_seed(0)
        shard = dropout(x[:, start * scale : stop * scale])
        assert torch.equal(shard, whole[:, start * scale : stop * scale]), (rank, kind)


def _nccl_models(ctx) -> None:
    """One rank on NCCL: buffers on the GPU the group is bound to, the AlexNet split and an
    auto-planned ResNeXt equal the plain models on the GPU."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    plain = tv_models.small_resnext().to(device)
    model = mpgroups.parallelize(copy.deepcopy(plain), ctx.process_group, plan="auto")
    x = torch.randn(2, 3, 32, 32, device=device)
    assert_close(model(x), plain(x), 1e-4, "auto plan on CUDA")
    torch.manual_seed(0)
    alex = mpgroups.models.AlexNet(10, channels=(16, 32, 48, 48, 32), hidden=64).to(device)
    torch.manual_seed(0)
    reference = mpgroups.models.AlexNet(
        10, channels=(16, 32, 48, 48, 32), hidden=64, parallel=False
    ).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    torch.manual_seed(1)
    y = alex(x)
    torch.manual_seed(1)
    assert_close(y, reference(x), 1e-4, "AlexNet on CUDA, dropout on")
    y.sum().backward()
    full = mpgroups.full_state_dict(alex)
    assert all(t.device == device for t in full.values())


@pytest.mark.cuda
@requires_cuda
def test_models_on_one_nccl_rank_equal_the_plain_models():
    run_in_one_rank_world(_nccl_models, backend="nccl", timeout=180)
