"""What a group-parallel layer communicates around its local op (docs/design.md §3, §3b).

Shared by the conv layers (channels on dim 1) and :class:`~mpgroups.layers.linear.ParallelLinear`
(features on the last dim). A layer calls :func:`local_input` on its input, runs its local op
(conv or matmul with its shard of the weight), then :func:`layer_output`::

    split   input        before the local op                 after it (output layout)
    colwise replicated   own slice (G >= P) / none, grads      replicated: all-gather
                         summed (one team) / team block        sharded:    none
            sharded      none (G >= P) / team all-gather
    rowwise sharded      none                                  replicated: all-reduce
                                                               sharded:    reduce-scatter
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mpgroups.comm.collectives import (
    all_gather_channels,
    all_gather_channels_partial,
    all_reduce_sum,
    copy_to_ranks,
    reduce_scatter_channels,
    slice_channels,
    slice_group_channels,
)
from mpgroups.sharding.layout import ChannelShards, LayerShards

__all__ = ["add_bias_once", "layer_output", "local_input"]


def local_input(
    x: Tensor, shards: LayerShards, team: ChannelShards | None, input_layout: str, dim: int
) -> Tensor:
    """The input of this rank's local op, from ``x`` in ``input_layout``.

    ``team`` is the layer's team split (``LayerShards.team``) for a filter split, else ``None``.
    """
    placement = shards.placement
    if placement.world_size == 1:
        return x
    if input_layout == "replicated":
        if not placement.filter_split:
            return slice_channels(x, shards.inputs, dim)
        if placement.team_size == placement.world_size:
            # One team reads every channel: nothing to take, the grads are summed.
            return copy_to_ranks(x, shards.inputs.process_group)
        return slice_group_channels(x, placement.in_slice, team, shards.inputs, dim)
    if placement.filter_split and shards.split == "colwise":
        return all_gather_channels_partial(x, team, dim)
    return x


def layer_output(y: Tensor, shards: LayerShards, output_layout: str, dim: int) -> Tensor:
    """The layer's output in ``output_layout``, from the local op's result ``y``: this rank's
    output channels (``split="colwise"``) or its partial sums of all of them
    (``split="rowwise"``)."""
    if shards.placement.world_size == 1:
        return y
    outputs = shards.outputs
    if shards.split == "rowwise":
        if output_layout == "replicated":
            return all_reduce_sum(y, outputs.process_group)
        return reduce_scatter_channels(y, outputs, dim)
    if output_layout == "replicated":
        return all_gather_channels(y, outputs, dim)
    return y


def add_bias_once(y: Tensor, bias: Tensor | None, outputs: ChannelShards, dim: int) -> Tensor:
    """Add this rank's bias rows ``outputs.own`` to its partial sums ``y`` (all output
    channels along ``dim``) before they are summed over the ranks: every channel gets its
    bias once, from the rank that holds it."""
    if bias is None:
        return y
    start, stop = outputs.own
    # In y's dtype, as the conv or linear op adds its bias (under autocast too).
    padded = F.pad(bias.to(y.dtype), (start, outputs.total - stop))
    shape = [1] * y.dim()
    shape[dim] = outputs.total
    return y + padded.view(shape)
