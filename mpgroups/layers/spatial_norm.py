"""Normalisations whose statistics span the whole image while each rank holds a block of its
rows (dim 2): ``nn.GroupNorm`` and ``nn.InstanceNorm1d/2d/3d``.

Each rank sums its rows per (sample, group); one all-reduce makes the sums (and counts) of
the whole image, the mean first and then the centred squares, as one device computes them.
Every rank's output depends on every rank's rows, so the backward all-reduces the
statistics' gradients too. (BatchNorm over the split image is the global-batch norm of
:mod:`mpgroups.plans.global_batch`, whose sums span the batch dim too, with its parameters'
grads summed over the group: ``sync_batch_norms``.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mpgroups.comm.collectives import all_reduce_sum, copy_to_ranks
from mpgroups.layers.spatial_base import SpatialLayer
from mpgroups.sharding.spatial import ConvRows

__all__ = [
    "SpatialGroupNorm",
    "SpatialInstanceNorm1d",
    "SpatialInstanceNorm2d",
    "SpatialInstanceNorm3d",
    "normalize_over_ranks",
]


def _sum_over_ranks(x: Tensor, process_group) -> Tensor:
    """Forward and backward: the sum over the ranks (each rank's output reads every sum)."""
    return all_reduce_sum(copy_to_ranks(x, process_group), process_group)


def normalize_over_ranks(
    x: Tensor, groups: int, eps: float, process_group
) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` ``[N, C, rows, *rest]`` normalised per (sample, channel group) over every rank's
    rows; returns ``(normalised, mean, biased var)`` (the statistics ``[N, groups]``)."""
    n, channels = x.shape[:2]
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    grouped = wide.reshape(n, groups, -1)
    count = grouped.new_tensor([grouped.shape[-1]])
    totals = _sum_over_ranks(torch.cat([grouped.sum(-1).flatten(), count]), process_group)
    count = totals[-1]
    mean = totals[:-1].view(n, groups) / count
    centred = grouped - mean.unsqueeze(-1)
    var = _sum_over_ranks(centred.square().sum(-1), process_group) / count
    out = centred * torch.rsqrt(var + eps).unsqueeze(-1)
    return out.reshape(x.shape).to(x.dtype), mean, var * count / (count - 1).clamp_min(1)


def _affine(out: Tensor, weight, bias) -> Tensor:
    if weight is None:
        return out
    shape = [1, -1] + [1] * (out.dim() - 2)
    return out * weight.view(shape) + bias.view(shape)


class SpatialGroupNorm(SpatialLayer, nn.GroupNorm):
    """``nn.GroupNorm`` on this rank's rows (dim 2) of ``process_group``'s split image, with
    the statistics of the whole image; ``weight``/``bias`` whole on every rank, their grads
    summed. The same arguments, plus the keyword-only ``process_group`` and ``checks``."""

    _input_dims = (3, 5)  # [N, C, rows] to [N, C, rows, H, W]

    def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
        nn.GroupNorm.__init__(self, *args, **kwargs)
        self._set_group(process_group, checks, ConvRows(kernel=1), self.num_channels)

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        self._total_rows(x, self.weight)
        pg = self.process_group
        out, _, _ = normalize_over_ranks(x, self.num_groups, self.eps, pg)
        if not self.affine:
            return out
        return _affine(out, copy_to_ranks(self.weight, pg), copy_to_ranks(self.bias, pg))


class _SpatialInstanceNormNd(SpatialLayer):
    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        if not self.training and self.track_running_stats:
            return super().forward(x)  # the running statistics: nothing to exchange
        self._total_rows(x, self.weight)
        pg = self.process_group
        out, mean, unbiased = normalize_over_ranks(x, self.num_features, self.eps, pg)
        if self.training and self.track_running_stats:
            factor = 0.0 if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(
                    mean.mean(0).to(self.running_mean), alpha=factor
                )
                self.running_var.mul_(1 - factor).add_(
                    unbiased.mean(0).to(self.running_var), alpha=factor
                )
        if not self.affine:
            return out
        return _affine(out, copy_to_ranks(self.weight, pg), copy_to_ranks(self.bias, pg))


def _make(nn_type: type[nn.Module], dims: int):
    class SpatialInstanceNorm(_SpatialInstanceNormNd, nn_type):
        __doc__ = (
            f"``nn.{nn_type.__name__}`` on this rank's rows (dim 2) of ``process_group``'s "
            f"split image, with each instance's statistics over the whole image."
        )
        _dims = dims

        def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
            nn_type.__init__(self, *args, **kwargs)
            self._set_group(process_group, checks, ConvRows(kernel=1), self.num_features)

    SpatialInstanceNorm.__name__ = SpatialInstanceNorm.__qualname__ = f"Spatial{nn_type.__name__}"
    return SpatialInstanceNorm


SpatialInstanceNorm1d = _make(nn.InstanceNorm1d, 1)
SpatialInstanceNorm2d = _make(nn.InstanceNorm2d, 2)
SpatialInstanceNorm3d = _make(nn.InstanceNorm3d, 3)
