"""Elementwise dropout on this rank's rows (dim 2) of a split image, dropping exactly what
one device drops: with every rank seeded alike, each rank draws the mask of the whole image
(the same draws ``F.dropout`` makes for it) and keeps its own rows of it.

The channel dropouts (``nn.Dropout1d/2d/3d``) need nothing of the kind: their mask is per
sample and channel, the same draws on every rank whatever its rows. The whole mask is a
transient of the whole image's size on every rank: the price of one device's numbers. (On
a GPU torch draws its mask another way: the same distribution, other elements.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mpgroups.comm.collectives import dense_order
from mpgroups.layers.spatial_base import SpatialLayer, pointwise_rows
from mpgroups.sharding.spatial import row_blocks

__all__ = ["SpatialDropout"]


class SpatialDropout(SpatialLayer, nn.Dropout):
    """``nn.Dropout`` on this rank's block (dim 2, and dim 3 on a 2-D mesh) of
    ``process_group``'s split input; the same arguments, plus the keyword-only
    ``process_group`` and ``checks``. Every rank must hold the same random state (seed
    every rank alike)."""

    _input_dims = (3, 5)

    def __init__(self, p: float = 0.5, inplace: bool = False, *, process_group=None, checks=None):
        nn.Dropout.__init__(self, p, inplace)
        self._set_group(process_group, checks, pointwise_rows, None)

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows or not self.training or self.p == 0:
            return super().forward(x)
        totals = self._total_rows(x)
        shape = list(x.shape)
        for (dim, _), total in zip(self.row_split.axes, totals, strict=True):
            shape[dim] = total
        if self.p == 1:
            return x * 0
        # laid out as the input (torch draws its mask with empty_like: in memory order)
        whole = torch.empty_permuted(shape, dense_order(x), dtype=x.dtype, device=x.device)
        keep = whole.bernoulli_(1 - self.p)
        for (dim, group), total in zip(self.row_split.axes, totals, strict=True):
            start, stop = row_blocks(total, group.size())[dist.get_rank(group)]
            keep = keep.narrow(dim, start, stop - start)
        return x * keep.div_(1 - self.p)

    @classmethod
    def from_module(cls, module: nn.Dropout, process_group=None, *, checks=None):
        return cls(module.p, module.inplace, process_group=process_group, checks=checks)
