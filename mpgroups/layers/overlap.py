"""A column-parallel layer's local op whose input-grad all-reduce runs while its weight grads
are computed (docs/design.md §4).

A column-parallel layer on a replicated input (one team reading every channel: the auto
plan's first 1×1 conv of a bottleneck, a column-parallel ``Linear``) computes in backward a
partial input grad on each rank, which the ranks sum (one all-reduce), and its own weight and
bias grads, which need nothing from the others. Composed of torch ops, autograd computes both
in one node and the all-reduce waits for both. Here one autograd Function computes the input
grad first, starts its all-reduce, computes the weight and bias grads while it runs, then
waits: the all-reduce hides behind the weight grads (on NCCL, its own stream; on gloo, its
worker thread), as Megatron-LM's column-parallel linear does.

The layers take this path in eager training with grad recorded for the input;
``MPGROUPS_OVERLAP=0`` turns it off. Under ``torch.compile`` (the compiler orders the graph's
collectives itself), under autocast (the casts are torch's ops') and for padding other than
zeros and explicit numbers, the composed path runs. A backward that records its own graph
(``create_graph=True``) computes the same grads with differentiable ops and the all-reduce's
autograd Function, so higher-order grads are those of the composed path.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mpgroups.comm.collectives import all_reduce_sum, copy_to_ranks, start_all_reduce
from mpgroups.sharding.layout import LayerShards

__all__ = ["ConvOp", "LinearOp", "column_parallel", "overlaps_input_grad"]

Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


class ConvOp(NamedTuple):
    """``F.conv{dims}d`` with these arguments (explicit padding)."""

    dims: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def grads(self, grad: Tensor, x: Tensor, weight: Tensor, mask: tuple[bool, ...]) -> Grads:
        """``(input, weight, bias)`` grads where ``mask`` asks for them, else ``None``."""
        bias_sizes = [weight.shape[0]] if mask[2] else None
        return torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, list(self.stride), list(self.padding),
            list(self.dilation), False, [0] * self.dims, self.groups, list(mask),
        )  # fmt: skip


class LinearOp(NamedTuple):
    """``F.linear``."""

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def grads(self, grad: Tensor, x: Tensor, weight: Tensor, mask: tuple[bool, ...]) -> Grads:
        """``(input, weight, bias)`` grads where ``mask`` asks for them, else ``None``."""
        rows = grad.reshape(-1, grad.shape[-1])
        return (
            grad.matmul(weight) if mask[0] else None,
            rows.t().mm(x.reshape(-1, x.shape[-1])) if mask[1] else None,
            rows.sum(0) if mask[2] else None,
        )


class _ColumnParallel(torch.autograd.Function):
    """Forward: ``op`` on the replicated input; backward: input grad, its all-reduce started,
    weight and bias grads meanwhile, then the summed input grad."""

    @staticmethod
    def forward(ctx, x, weight, bias, op, process_group):
        ctx.save_for_backward(x, weight)
        ctx.op, ctx.process_group = op, process_group
        return op.forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        op, process_group = ctx.op, ctx.process_group
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: the composed path's differentiable ops
            # The input as each rank consumes it: what flows back to it (from the weight
            # grad too, in a second backward) is summed over the ranks.
            x = copy_to_ranks(x, process_group)
            grad_x, grad_w, grad_b = op.grads(grad, x, weight, ctx.needs_input_grad[:3])
            if grad_x is not None:
                grad_x = all_reduce_sum(grad_x, process_group)
            return grad_x, grad_w, grad_b, None, None
        summed = None
        if need_input:
            grad_x = op.grads(grad, x, weight, (True, False, False))[0]
            summed = start_all_reduce(grad_x, process_group)
        _, grad_w, grad_b = op.grads(grad, x, weight, (False, need_weight, need_bias))
        return (summed() if summed else None), grad_w, grad_b, None, None


def overlaps_input_grad(x: Tensor, shards: LayerShards, input_layout: str) -> bool:
    """Whether a layer's local op on ``x`` runs as :func:`column_parallel`: a column-parallel
    layer whose input is replicated and read whole by every rank, in eager training that
    records the input's grad, outside autocast, and ``MPGROUPS_OVERLAP`` not ``0``."""
    placement = shards.placement
    return (
        placement.world_size > 1
        and input_layout == "replicated"
        and shards.split == "colwise"
        and placement.filter_split
        and placement.team_size == placement.world_size
        and x.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
        and os.environ.get("MPGROUPS_OVERLAP", "1").strip() != "0"
    )


def column_parallel(
    x: Tensor, weight: Tensor, bias: Tensor | None, op: ConvOp | LinearOp, process_group
) -> Tensor:
    """``op(x, weight, bias)`` on a replicated ``x`` whose input grad is summed over
    ``process_group`` in backward, overlapped with the weight and bias grads. Equals
    ``op(copy_to_ranks(x, process_group), weight, bias)``."""
    return _ColumnParallel.apply(x, weight, bias, op, process_group)
