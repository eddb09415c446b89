"""Spatially split max and average pooling: ``nn.MaxPool1d/2d/3d`` and ``nn.AvgPool1d/2d/3d``
on this rank's block of rows along dim 2 (the layout of :mod:`mpgroups.layers.spatial_conv`).

A pooling reads a window of rows as a conv does, so it takes the same halo exchange; padding
rows are ``-inf`` for a max pool and zeros for an average. An average divides by what torch
divides by: along dim 2 that depends on where the window lies in the whole input (padding
counted or not, a ``ceil_mode`` window reaching past it), so the layer pools its window with
the whole kernel and rescales each output row by ``kernel / torch's divisor`` for that row.
With no process group, or one rank, the layers are ``torch.nn``'s, bit for bit.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.comm.process_groups import resolve_process_group
from mpgroups.layers.spatial_base import SpatialLayer
from mpgroups.sharding.spatial import AdaptiveRows, ConvRows

__all__ = [
    "SpatialAdaptiveAvgPool1d",
    "SpatialAdaptiveAvgPool2d",
    "SpatialAdaptiveAvgPool3d",
    "SpatialAdaptiveMaxPool1d",
    "SpatialAdaptiveMaxPool2d",
    "SpatialAdaptiveMaxPool3d",
    "SpatialAvgPool1d",
    "SpatialAvgPool2d",
    "SpatialAvgPool3d",
    "SpatialMaxPool1d",
    "SpatialMaxPool2d",
    "SpatialMaxPool3d",
]


def _per_dim(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class _SpatialPoolNd(SpatialLayer):
    def _geometry(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Kernel, stride and padding per spatial dim."""
        stride = self.stride if self.stride is not None else self.kernel_size
        return tuple(_per_dim(v, self._dims) for v in (self.kernel_size, stride, self.padding))

    def _pool_rows(self, dilation: int = 1) -> ConvRows:
        kernel, stride, padding = self._geometry()
        return ConvRows(
            kernel=kernel[0],
            stride=stride[0],
            dilation=dilation,
            pad_lo=padding[0],
            pad_hi=padding[0],
            ceil_mode=self.ceil_mode,
        )

    def _local_options(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Kernel, stride and padding for the window: no padding along dim 2 (the window
        holds it), the layer's own along the other dims."""
        kernel, stride, padding = self._geometry()
        return kernel, stride, (0, *padding[1:])


class _SpatialMaxPoolNd(_SpatialPoolNd):
    def _check_options(self) -> None:
        if self.return_indices and self.splits_rows:
            raise NotImplementedError(
                "return_indices=True with rows split: the indices would be this rank's; "
                "gather the rows (mpgroups.gather_spatial) and pool the whole input"
            )

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        window, _, _ = self._window(x, fill=-math.inf)
        kernel, stride, padding = self._local_options()
        dilation = _per_dim(self.dilation, self._dims)
        return self._pool(window, kernel, stride, padding, dilation, self.ceil_mode)


class _SpatialAvgPoolNd(_SpatialPoolNd):
    def _check_options(self) -> None:
        pass

    def _row_scale(self, plan, total: int, like: Tensor) -> Tensor:
        """Per output row: the window's kernel over the divisor torch uses along dim 2."""
        scale = self.__dict__.setdefault("_row_scales", {}).get(total)
        if scale is None:
            rows, (start, stop) = self.rows, plan.out_rows[plan.rank]
            scale = []
            for row in range(start, stop):
                first = row * rows.stride - rows.pad_lo
                last = min(first + rows.kernel, total + rows.pad_hi)
                counted = (
                    last - first if self.count_include_pad else min(last, total) - max(first, 0)
                )
                scale.append(rows.kernel / counted)
            self._row_scales[total] = scale
        shape = [1, 1, len(scale)] + [1] * (self._dims - 1)
        return torch.tensor(scale, dtype=like.dtype, device=like.device).view(shape)

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        window, plan, total = self._window(x)
        kernel, stride, padding = self._local_options()
        options = dict(ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad)
        override = getattr(self, "divisor_override", None)
        if override is not None:
            options["divisor_override"] = override
        out = self._pool(window, kernel, stride, padding, **options)
        return out if override is not None else out * self._row_scale(plan, total, out)


def _make(base: type[_SpatialPoolNd], nn_type: type[nn.Module], dims: int, functional):
    dilated = "dilation" in inspect.signature(nn_type.__init__).parameters

    class SpatialPool(base, nn_type):
        __doc__ = (
            f"``nn.{nn_type.__name__}`` on this rank's rows along dim 2 of ``process_group`` "
            f"(the module docstring has the layout); the same arguments, plus the keyword-only "
            f"``process_group`` and ``checks``."
        )
        _dims = dims

        def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
            nn_type.__init__(self, *args, **kwargs)
            dilation = _per_dim(self.dilation, dims)[0] if dilated else 1
            self._set_group(process_group, checks, self._pool_rows(dilation), None)
            self._check_options()

        @staticmethod
        def _pool(x, *args, **kwargs):
            return functional(x, *args, **kwargs)

        @classmethod
        def from_module(cls, module: nn.Module, process_group=None, *, checks=None):
            """The spatial twin of ``module`` (a ``torch.nn`` pooling of this kind)."""
            names = list(inspect.signature(nn_type.__init__).parameters)[1:]
            options = {n: getattr(module, n) for n in names if hasattr(module, n)}
            return cls(**options, process_group=process_group, checks=checks)

    SpatialPool.__name__ = SpatialPool.__qualname__ = f"Spatial{nn_type.__name__}"
    return SpatialPool


SpatialMaxPool1d = _make(_SpatialMaxPoolNd, nn.MaxPool1d, 1, F.max_pool1d)
SpatialMaxPool2d = _make(_SpatialMaxPoolNd, nn.MaxPool2d, 2, F.max_pool2d)
SpatialMaxPool3d = _make(_SpatialMaxPoolNd, nn.MaxPool3d, 3, F.max_pool3d)
SpatialAvgPool1d = _make(_SpatialAvgPoolNd, nn.AvgPool1d, 1, F.avg_pool1d)
SpatialAvgPool2d = _make(_SpatialAvgPoolNd, nn.AvgPool2d, 2, F.avg_pool2d)
SpatialAvgPool3d = _make(_SpatialAvgPoolNd, nn.AvgPool3d, 3, F.avg_pool3d)


class _SpatialAdaptivePoolNd(SpatialLayer):
    """An adaptive pooling to a size whose first entry (dim 2) the rows are split for: each
    rank pools, row by row, the input rows its output rows read (torch's adaptive windows of
    the whole input), and the other dims as torch does."""

    def _adaptive_rows(self) -> AdaptiveRows:
        size = _per_dim(self.output_size, self._dims)[0]
        if size is None:
            raise NotImplementedError(
                "an adaptive pooling that keeps dim 2 (output_size None there) with rows split"
            )
        return AdaptiveRows(size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        if getattr(self, "return_indices", False):
            raise NotImplementedError("return_indices=True with rows split")
        window, plan, total = self._window(x)
        first = self.rows.window(plan.out_rows[plan.rank], total)[0]
        rest = _per_dim(self.output_size, self._dims)[1:]
        rest = tuple(x.shape[3 + i] if n is None else n for i, n in enumerate(rest))
        start, stop = plan.out_rows[plan.rank]
        rows = []
        for row in range(start, stop):
            begin, end = self.rows.rows_of(row, total)
            rows.append(self._pool(window.narrow(2, begin - first, end - begin), (1, *rest)))
        return torch.cat(rows, dim=2)


def _make_adaptive(nn_type: type[nn.Module], dims: int, functional):
    class SpatialAdaptivePool(_SpatialAdaptivePoolNd, nn_type):
        __doc__ = (
            f"``nn.{nn_type.__name__}`` on this rank's rows along dim 2 of ``process_group`` "
            f"to a global size (its first entry at least the group's size); the same "
            f"arguments, plus the keyword-only ``process_group`` and ``checks``."
        )
        _dims = dims

        def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
            nn_type.__init__(self, *args, **kwargs)
            group = resolve_process_group(process_group)
            splits = group is not None and group.size() > 1
            rows = self._adaptive_rows() if splits else AdaptiveRows(1)
            self._set_group(group, checks, rows, None)

        @staticmethod
        def _pool(x, size):
            return functional(x, size)

        @classmethod
        def from_module(cls, module: nn.Module, process_group=None, *, checks=None):
            """The spatial twin of ``module`` (a ``torch.nn`` adaptive pooling of this kind)."""
            options = {"return_indices": module.return_indices} if "Max" in nn_type.__name__ else {}
            return cls(module.output_size, **options, process_group=process_group, checks=checks)

    SpatialAdaptivePool.__name__ = f"Spatial{nn_type.__name__}"
    SpatialAdaptivePool.__qualname__ = SpatialAdaptivePool.__name__
    return SpatialAdaptivePool


SpatialAdaptiveAvgPool1d = _make_adaptive(nn.AdaptiveAvgPool1d, 1, F.adaptive_avg_pool1d)
SpatialAdaptiveAvgPool2d = _make_adaptive(nn.AdaptiveAvgPool2d, 2, F.adaptive_avg_pool2d)
SpatialAdaptiveAvgPool3d = _make_adaptive(nn.AdaptiveAvgPool3d, 3, F.adaptive_avg_pool3d)
SpatialAdaptiveMaxPool1d = _make_adaptive(nn.AdaptiveMaxPool1d, 1, F.adaptive_max_pool1d)
SpatialAdaptiveMaxPool2d = _make_adaptive(nn.AdaptiveMaxPool2d, 2, F.adaptive_max_pool2d)
SpatialAdaptiveMaxPool3d = _make_adaptive(nn.AdaptiveMaxPool3d, 3, F.adaptive_max_pool3d)
