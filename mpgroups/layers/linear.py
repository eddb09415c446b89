"""``nn.Linear`` with its weight split over a process group: column- or row-parallel.

A Linear is a 1×1 conv with one group over the last (feature) dimension (docs/design.md §3b).
Shapes on rank ``r`` of ``P`` (``in_r``/``out_r``: the rank's slices of the features)::

    split="colwise" (column-parallel)          split="rowwise" (row-parallel)
    weight  [out_r, in]  rows of nn.Linear's   weight  [out, in_r]  columns of nn.Linear's
    bias    [out_r]                            bias    [out_r]  added once, before the sum

    input   replicated [*, in]  or sharded [*, in_r]  (split="rowwise": sharded only)
    output  replicated [*, out] or sharded [*, out_r]

Column-parallel with a replicated input computes its outputs with no communication forward
(the input grads are summed over the ranks backward); row-parallel sums the ranks' partial
outputs (all-reduce, or reduce-scatter for a sharded output) and keeps the input grads local.
A column-parallel layer with a sharded output followed by a row-parallel one with a replicated
output communicates once forward and once backward (Megatron-LM's pairing).

With no process group, or a group of one rank, the layer computes what ``nn.Linear`` does,
with the same parameters and ``state_dict`` keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.comm.checks import layer_input_problem
from mpgroups.layers.base import LayerOptions, ShardedLayer
from mpgroups.layers.layer_comm import add_bias_once, layer_output, local_input
from mpgroups.layers.overlap import LinearOp, column_parallel, overlaps_input_grad

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["ParallelLinear"]


class ParallelLinear(ShardedLayer, nn.Module):
    """``nn.Linear`` whose weight is split over ``process_group`` (see the module docstring).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        process_group, input_layout, output_layout, split, shard_groups, checks: keyword-only,
            see :class:`~mpgroups.layers.base.LayerOptions`: layouts ``Replicate()`` or
            ``Shard(-1)`` (features split as ``torch.tensor_split`` does, or as
            ``shard_groups`` groups: e.g. the flattened features of a channel-sharded
            activation, ``in_features = C * H * W`` split as ``C``'s groups); ``split``
            ``"colwise"`` (each rank its output features' rows of the weight) or ``"rowwise"``
            (its input features' columns; needs a sharded input).

    Initialisation: with the same seed, each rank holds exactly its part of what
    ``nn.Linear`` would initialise.
    """

    _nn_type = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        _init_weights: bool = True,
        **options: Unpack[LayerOptions],
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"ParallelLinear needs positive in_features and out_features, got "
                f"{in_features} and {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self._place(in_features, out_features, 1, (-1,), options)
        inputs = self.shards.inputs
        if self.input_layout == "sharded":
            self._input_features = inputs.widths
            self._input_notes = [f"sharded input: features {a}..{b}" for a, b in inputs.slices]
        else:
            self._input_features = [in_features] * self.world_size
            self._input_notes = ["replicated input"] * self.world_size
        config = (
            "ParallelLinear", in_features, out_features, bias, self.split, self.input_layout,
            self.output_layout, inputs.slices, self.shards.outputs.slices,
        )  # fmt: skip
        self._make_guards(config, -1)
        self._make_parameters((out_features, in_features), bias, device, dtype, _init_weights)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, process_group=None, **options: Unpack[LayerOptions]
    ) -> ParallelLinear:
        """Split an existing ``nn.Linear``: this rank keeps its part of the weight and bias
        (copies on ``linear``'s device and dtype, with its ``requires_grad``); ``options`` as
        the constructor's."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            device="meta", dtype=linear.weight.dtype, process_group=process_group,
            _init_weights=False, **options,
        )  # fmt: skip
        layer._take_shards_of(linear)
        return layer

    def to_linear(self) -> nn.Linear:
        """The whole layer as a plain ``nn.Linear`` (a collective: every rank must call it)."""
        return self._to_full(nn.Linear)

    def _arguments(self) -> tuple:
        return (self.in_features, self.out_features, self.bias is not None)

    def _name(self) -> str:
        return (
            f"ParallelLinear({self.in_features}, {self.out_features}, split={self.split}, "
            f"{self.input_layout}->{self.output_layout})"
        )

    def forward(self, input: Tensor) -> Tensor:  # named as nn.Linear.forward names it
        """``input`` ``[*, in]`` (or ``[*, in_r]`` sharded) → ``[*, out]`` (or ``[*, out_r]``)."""
        x = input
        self.input_guard(
            x,
            problem=layer_input_problem(
                x,
                "an input [*, features]",
                (1, None),
                -1,
                self._input_features[self.rank],
                self._input_notes[self.rank],
                self.weight,
            ),
            expected_channels=self._input_features,
            channels_note=self._input_notes,
            weight=self.weight,
            communicates=self._communicates,
        )
        dim = x.dim() - 1
        if overlaps_input_grad(x, self.shards, self.input_layout):
            pg = self.shards.inputs.process_group
            y = column_parallel(x, self.weight, self.bias, LinearOp(), pg)
            return layer_output(y, self.shards, self.output_layout, dim)
        x = local_input(x, self.shards, self._team_shards, self.input_layout, dim)
        if self.shards.split == "rowwise":
            y = add_bias_once(F.linear(x, self.weight), self.bias, self.shards.outputs, dim)
        else:
            y = F.linear(x, self.weight, self.bias)
        return layer_output(y, self.shards, self.output_layout, dim)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        s += f", bias={self.bias is not None}, split={self.split}"
        s += f", rank={self.rank}/{self.world_size}"
        if (self.input_layout, self.output_layout) != ("replicated", "replicated"):
            s += f", layout={self.input_layout}->{self.output_layout}"
        return s
