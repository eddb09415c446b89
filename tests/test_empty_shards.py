"""A layer with fewer output channels than ranks: some ranks hold an empty ``(0,)`` bias (a
row-parallel layer's bias rows follow its output shards). Every path that moves state handles
the empty shards: full and sharded state dicts, full grads, ``to_linear``/``to_conv``,
``unparallelize``, and training itself."""

from __future__ import annotations

import copy

import torch
from parity import assert_close
from torch import nn

import mpgroups


def _linear_with_empty_bias(process_group):
    """``Linear(8, 1)`` row-parallel: rank 0 holds the one bias row, the others none."""
    torch.manual_seed(0)
    plain = nn.Linear(8, 1)
    layer = mpgroups.ParallelLinear.from_linear(
        copy.deepcopy(plain), process_group, split="rowwise", input_layout="sharded"
    )
    return plain, layer


def _row_conv_with_empty_bias(process_group):
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 1, 3, padding=1)
    layer = mpgroups.GroupParallelConv2d.from_conv(
        copy.deepcopy(plain), process_group, split="rowwise", input_layout="sharded"
    )
    return plain, layer


def _state_paths(ctx, kind: str, directory: str) -> None:
    build = _linear_with_empty_bias if kind == "linear" else _row_conv_with_empty_bias
    plain, layer = build(ctx.process_group)
    assert layer.bias.shape == ((1,) if ctx.rank == 0 else (0,))
    in_start, in_stop = layer.shards.inputs.own
    shape = (3, 8) if kind == "linear" else (3, 8, 4, 4)
    torch.manual_seed(1)
    x = torch.randn(shape)
    y = layer(x[:, in_start:in_stop])
    y.square().sum().backward()
    want = plain(x)
    want.square().sum().backward()
    assert_close(y, want, 1e-5, "output")

    full = mpgroups.full_state_dict(layer)
    assert list(full) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert_close(full[key], value, 1e-6, key)
    grads = mpgroups.full_grad_dict(layer)
    assert_close(grads["bias"], plain.bias.grad, 1e-5, "bias grad")
    assert_close(grads["weight"], plain.weight.grad, 1e-5, "weight grad")
    whole = layer.to_linear() if kind == "linear" else layer.to_conv()
    assert_close(whole.bias, plain.bias, 1e-6, "whole bias")

    mpgroups.save_sharded_state_dict(layer, directory)
    _, fresh = build(ctx.process_group)
    with torch.no_grad():
        fresh.weight.zero_()
        fresh.bias.zero_()
    mpgroups.load_sharded_state_dict(fresh, directory)
    assert torch.equal(fresh.bias, layer.bias) and torch.equal(fresh.weight, layer.weight)
    mpgroups.load_full_state_dict(fresh, plain.state_dict())
    assert torch.equal(fresh.bias, layer.bias)

    model = mpgroups.unparallelize(nn.Sequential(layer))
    assert type(model[0]) is type(plain)
    assert_close(model[0].bias, plain.bias, 1e-6, "unparallelized bias")


def test_state_paths_with_an_empty_bias_shard(pool, tmp_path):
    for kind in ("linear", "conv"):
        for world_size in (2, 4):
            pool.run(_state_paths, world_size, kind, str(tmp_path / f"{kind}-{world_size}"))


def _auto_planned_head_of_one_output(ctx, directory: str) -> None:
    """A classifier of one output under ``plan="auto"`` is a row-parallel ``Linear(C, 1)``:
    it trains as the single-device model, and its state gathers back whole."""
    import tv_models

    torch.manual_seed(0)
    reference = tv_models.small_mobilenet_v2(num_classes=1)
    model = mpgroups.parallelize(copy.deepcopy(reference), ctx.process_group, plan="auto")
    head = model.classifier[-1]
    assert isinstance(head, mpgroups.ParallelLinear) and head.split == "rowwise"
    assert head.bias.shape == (1,)  # a DTensor: its global shape; its local rows below
    assert head.bias.to_local().shape == ((1,) if ctx.rank == 0 else (0,))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    for net in (model, reference):
        net.eval()  # BatchNorm on its running statistics, no dropout: the steps compare alike
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    full = mpgroups.full_state_dict(model)
    for key, value in reference.state_dict().items():
        assert_close(full[key], value, 1e-4, key)
    # DCP: rank 0's one bias row and the others' none make the one-element entry of the file.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    path = f"{directory}/dcp-{ctx.world_size}"
    dcp.save(get_model_state_dict(model), checkpoint_id=path, process_group=ctx.process_group)
    if ctx.rank == 0:
        dcp_to_torch_save(path, f"{path}.pt")
        whole = torch.load(f"{path}.pt", weights_only=True)
        assert whole["classifier.1.bias"].shape == (1,)
        for key, value in full.items():
            assert torch.equal(whole[key], value), key
    plain = mpgroups.unparallelize(model)
    assert type(plain.classifier[-1]) is nn.Linear


def test_auto_planned_head_of_one_output(pool, tmp_path):
    for world_size in (2, 4):
        pool.run(_auto_planned_head_of_one_output, world_size, str(tmp_path))
