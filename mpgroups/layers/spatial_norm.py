"""Normalisations whose statistics span the whole image while each rank holds a block of its
rows (dim 2): ``nn.GroupNorm`` and ``nn.InstanceNorm1d/2d/3d``.

Each rank sums its rows per (sample, group); one all-reduce makes the sums (and counts) of
the whole image, the mean first and then the centred squares, as one device computes them.
Every rank's output depends on every rank's rows, so the backward all-reduces the two sums
its gradient needs (:class:`_Normalize`, which saves what torch's own norms save).
BatchNorm over the split image is the global-batch norm of :mod:`mpgroups.plans.global_batch`
(the same statistics over the batch dim too), its parameters' grads summed over the group
(``sync_batch_norms``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mpgroups.comm.collectives import all_reduce_sum, copy_to_ranks_together
from mpgroups.layers.spatial_base import SpatialLayer, pointwise_rows

__all__ = [
    "SpatialGroupNorm",
    "SpatialInstanceNorm1d",
    "SpatialInstanceNorm2d",
    "SpatialInstanceNorm3d",
    "normalize_over_ranks",
]


class _Normalize(torch.autograd.Function):
    """Forward: ``(v - mean) / sqrt(var + eps)`` for each ``k`` of ``v`` ``[A, K, B]``, the
    statistics over dims 0 and 2 of every rank's ``v`` (one all-reduce of the sums and the
    count, then one of the centred squares, as one device computes them); also returns the
    mean, the biased variance and the count. Backward: the analytic gradient, its two sums
    all-reduced in one call. It saves the normalised tensor alone, as torch's fused norms
    save one tensor of the input's size (a composite of autograd ops would save three).
    Not differentiable twice."""

    @staticmethod
    def forward(ctx, v, eps, process_group):
        k = v.shape[1]
        local = torch.cat([v.sum((0, 2)), v.new_tensor([v.shape[0] * v.shape[2]])])
        totals = all_reduce_sum(local, process_group)
        count = totals[-1]
        mean = totals[:-1] / count
        centred = v - mean.view(1, k, 1)
        var = all_reduce_sum(centred.square().sum((0, 2)), process_group) / count
        rstd = torch.rsqrt(var + eps)
        out = centred.mul_(rstd.view(1, k, 1))
        ctx.save_for_backward(out, rstd)
        ctx.count, ctx.process_group = count, process_group
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_):
        out, rstd = ctx.saved_tensors
        k = out.shape[1]
        local = torch.cat([grad.sum((0, 2)), (grad * out).sum((0, 2))])
        means = all_reduce_sum(local, ctx.process_group) / ctx.count
        grad_mean, grad_out_mean = means[:k].view(1, k, 1), means[k:].view(1, k, 1)
        return (grad - grad_mean - out * grad_out_mean) * rstd.view(1, k, 1), None, None


def normalize_over_ranks(
    v: Tensor, eps: float, process_group
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``v`` ``[A, K, B]`` normalised for each ``k`` over dims 0 and 2 of every rank's ``v``
    (in float32 at least); returns ``(normalised, mean [K], biased var [K], count)``.
    GroupNorm views its input as ``[1, N·G, rest]``, InstanceNorm as ``[1, N·C, rest]``,
    BatchNorm as ``[N, C, rest]``."""
    wide = v.to(torch.promote_types(v.dtype, torch.float32))
    return _Normalize.apply(wide, eps, process_group)


def _unbiased(var: Tensor, count: Tensor) -> Tensor:
    return var * count / (count - 1).clamp_min(1)


def _affine(out: Tensor, weight, bias) -> Tensor:
    """``out`` scaled and shifted per channel, in ``out``'s dtype (a bfloat16 activation
    under autocast stays bfloat16, as torch's norms leave it)."""
    if weight is None:
        return out
    shape = [1, -1] + [1] * (out.dim() - 2)
    return (out * weight.view(shape) + bias.view(shape)).to(out.dtype)


class SpatialGroupNorm(SpatialLayer, nn.GroupNorm):
    """``nn.GroupNorm`` on this rank's rows (dim 2) of ``process_group``'s split image, with
    the statistics of the whole image; ``weight``/``bias`` whole on every rank, their grads
    summed. The same arguments, plus the keyword-only ``process_group`` and ``checks``."""

    _input_dims = (3, 5)  # [N, C, rows] to [N, C, rows, H, W]

    def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
        nn.GroupNorm.__init__(self, *args, **kwargs)
        self._set_group(process_group, checks, pointwise_rows, self.num_channels)

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        self._total_rows(x, self.weight)
        pg = self.process_group
        grouped = x.reshape(1, x.shape[0] * self.num_groups, -1)
        out = normalize_over_ranks(grouped, self.eps, pg)[0].reshape(x.shape).to(x.dtype)
        if not self.affine:
            return out
        return _affine(out, *copy_to_ranks_together([self.weight, self.bias], pg))


class _SpatialInstanceNormNd(SpatialLayer):
    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        if not self.training and self.track_running_stats:
            # the running statistics: nothing to exchange but the affine grads' sum
            weight, bias = copy_to_ranks_together([self.weight, self.bias], self.process_group)
            return F.instance_norm(
                x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps
            )
        self._total_rows(x, self.weight)
        pg = self.process_group
        n, channels = x.shape[:2]
        out, mean, var, count = normalize_over_ranks(x.reshape(1, n * channels, -1), self.eps, pg)
        out = out.reshape(x.shape).to(x.dtype)
        if self.training and self.track_running_stats:
            factor = 0.0 if self.momentum is None else self.momentum
            mean, unbiased = mean.view(n, channels), _unbiased(var, count).view(n, channels)
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(
                    mean.mean(0).to(self.running_mean), alpha=factor
                )
                self.running_var.mul_(1 - factor).add_(
                    unbiased.mean(0).to(self.running_var), alpha=factor
                )
        if not self.affine:
            return out
        return _affine(out, *copy_to_ranks_together([self.weight, self.bias], pg))


def _make(nn_type: type[nn.Module], dims: int):
    class SpatialInstanceNorm(_SpatialInstanceNormNd, nn_type):
        __doc__ = (
            f"``nn.{nn_type.__name__}`` on this rank's rows (dim 2) of ``process_group``'s "
            f"split image, with each instance's statistics over the whole image."
        )
        _dims = dims

        def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
            nn_type.__init__(self, *args, **kwargs)
            self._set_group(process_group, checks, pointwise_rows, self.num_features)

    SpatialInstanceNorm.__name__ = SpatialInstanceNorm.__qualname__ = f"Spatial{nn_type.__name__}"
    return SpatialInstanceNorm


SpatialInstanceNorm1d = _make(nn.InstanceNorm1d, 1)
SpatialInstanceNorm2d = _make(nn.InstanceNorm2d, 2)
SpatialInstanceNorm3d = _make(nn.InstanceNorm3d, 3)
