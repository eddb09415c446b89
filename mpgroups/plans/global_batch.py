"""Data parallelism that computes what one device computes on the global batch.

Data parallel replicas (FSDP2 over the ``dp`` dim of a mesh, or DDP of a plain model) each see
their part of the global batch; :func:`match_global_batch` makes the batch-dependent modules of
a model behave as they would on the whole batch on one device, so a (dp, gp) run trains exactly
as the single-device model does (the loss being the global batch's mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.comm.collectives import all_gather_records, copy_to_ranks_together
from mpgroups.comm.process_groups import rank_and_world_size, resolve_process_group
from mpgroups.layers.channel_modules import DROPOUTS, ShardedDropout
from mpgroups.layers.spatial_norm import normalize_over_ranks
from mpgroups.sharding.layout import NOT_PICKLABLE

__all__ = ["match_global_batch", "sync_batch_norms"]


class _Replicas:
    """The data-parallel group a module synchronises over. Copies of the module share it
    (``copy.deepcopy`` returns this object); pickling raises, as for a parallel layer."""

    def __init__(self, process_group, sum_parameter_grads: bool = False) -> None:
        self.process_group = process_group
        self.rank, self.size = rank_and_world_size(process_group)
        # Whether the modules sum their parameters' grads over the group themselves (a split
        # image's rows); data parallelism leaves that to FSDP2 or DDP.
        self.sum_parameter_grads = sum_parameter_grads

    def __deepcopy__(self, memo) -> _Replicas:
        return self

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_PICKLABLE)


class _GlobalBatchNorm:
    """BatchNorm whose batch statistics are those of the global batch: per-channel sums and
    counts all-reduced over the data-parallel ranks (mean first, then the centred squares,
    as one device computes them), the running statistics updated from them. Mixed into the
    ``nn.BatchNorm*d`` class of the module :func:`match_global_batch` converts in place."""

    _replicas: _Replicas

    def forward(self, x: Tensor) -> Tensor:
        replicas = self._replicas
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if replicas.size == 1:
            return super().forward(x)
        if not batch_stats:
            if not (self.affine and replicas.sum_parameter_grads):
                return super().forward(x)
            # running statistics (frozen BatchNorm): local, but the affine grads are partial
            weight, bias = copy_to_ranks_together([self.weight, self.bias], replicas.process_group)
            return F.batch_norm(
                x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps
            )
        self._check_input_dim(x)
        group = replicas.process_group
        shape = [1, -1] + [1] * (x.dim() - 2)
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        out, mean, var, count = normalize_over_ranks(rows, self.eps, group)
        out = out.reshape(x.shape)
        if self.affine:
            weight, bias = self.weight, self.bias
            if replicas.sum_parameter_grads:
                weight, bias = copy_to_ranks_together([weight, bias], group)
            out = out * weight.view(shape) + bias.view(shape)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum
            if factor is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1)  # torch's running_var
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var), alpha=factor)
        return out.to(x.dtype)


class _GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    pass


class _GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    pass


class _GlobalBatchNorm3d(_GlobalBatchNorm, nn.BatchNorm3d):
    pass


_GLOBAL_BATCH_NORMS = {
    nn.BatchNorm1d: _GlobalBatchNorm1d,
    nn.BatchNorm2d: _GlobalBatchNorm2d,
    nn.BatchNorm3d: _GlobalBatchNorm3d,
}


class _GlobalBatchDropout:
    """Hooks around a dropout module (``nn.Dropout*`` or mpgroups' ``ShardedDropout``): before
    it, this rank's rows are put in their place in a zero tensor of the global batch, so the
    module draws the mask one device draws for the whole batch; after it, this rank's rows
    of the output are kept. Costs one tiny all-gather of batch sizes per call."""

    def __init__(self, replicas: _Replicas) -> None:
        self.replicas = replicas
        self.rows: tuple[int, int] | None = None

    def before(self, module: nn.Module, args):
        replicas = self.replicas
        if not module.training or module.p == 0 or replicas.size == 1:
            return None
        x = args[0]
        sizes = all_gather_records(torch.tensor([x.shape[0]]), replicas.process_group)
        sizes = sizes[:, 0].tolist()
        start, total = sum(sizes[: replicas.rank]), sum(sizes)
        self.rows = (start, x.shape[0])
        after = total - start - x.shape[0]
        whole = torch.cat([x.new_zeros(start, *x.shape[1:]), x, x.new_zeros(after, *x.shape[1:])])
        return (whole, *args[1:])

    def after(self, module: nn.Module, args, output):
        if self.rows is None:
            return None
        (start, length), self.rows = self.rows, None
        return output.narrow(0, start, length)


def match_global_batch(model: nn.Module, process_group) -> nn.Module:
    """Make data parallelism over ``process_group`` compute, in place, what one device computes
    on the global batch (the ranks' batches concatenated in rank order); returns ``model``.

    * ``nn.BatchNorm1d/2d/3d`` normalise with the global batch's statistics (two small
      all-reduces forward, two backward), as ``nn.SyncBatchNorm`` does on GPUs; parameters,
      buffers, hooks and (for a parallelized model) the channel shards stay as they were.
    * Dropout (``nn.Dropout*`` and the sharded dropout of a parallelized model) draws the mask
      of the global batch and keeps this rank's rows. With the same seed on every rank, which
      group-parallel dropout needs, each sample is then dropped as one device drops it; plain
      data parallelism would give every replica the same masks for its rows.

    Apply it to the model before wrapping it in ``fully_shard`` or DDP (the data-parallel loss
    must be the global batch's mean: with unequal parts, weight each rank's mean by its part).
    ``process_group``: a ``ProcessGroup`` or 1-D ``DeviceMesh`` (``mesh["dp"]``).
    """
    replicas = _Replicas(resolve_process_group(process_group))
    sync_batch_norms(model, replicas)
    for module in model.modules():
        if isinstance(module, (*DROPOUTS, ShardedDropout)):
            old = getattr(module, "_mpgroups_global_batch", None)
            if old is not None:
                old.replicas = replicas
                continue
            hooks = _GlobalBatchDropout(replicas)
            module.register_forward_pre_hook(hooks.before)
            module.register_forward_hook(hooks.after)
            module._mpgroups_global_batch = hooks
    return model


def sync_batch_norms(model: nn.Module, replicas) -> nn.Module:
    """Make every ``nn.BatchNorm1d/2d/3d`` of ``model`` normalise with the statistics of all
    ranks of ``replicas`` (a :class:`_Replicas`, or a process group: its parameters' grads
    then summed over it too, as a split image's rows need), in place; returns ``model``."""
    if not isinstance(replicas, _Replicas):
        replicas = _Replicas(resolve_process_group(replicas), sum_parameter_grads=True)
    for module in model.modules():
        if type(module) in _GLOBAL_BATCH_NORMS:
            module.__class__ = _GLOBAL_BATCH_NORMS[type(module)]
        if isinstance(module, _GlobalBatchNorm):
            module._replicas = replicas
    return model
