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

    def _pool_rows(self, axis: int) -> ConvRows:
        """What the pooling does along spatial dim ``axis`` (dim ``2 + axis``)."""
        kernel, stride, padding = self._geometry()
        dilation = _per_dim(getattr(self, "dilation", 1), self._dims)
        return ConvRows(
            kernel=kernel[axis],
            stride=stride[axis],
            dilation=dilation[axis],
            pad_lo=padding[axis],
            pad_hi=padding[axis],
            ceil_mode=self.ceil_mode,
        )

    def _local_options(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Kernel, stride and padding for the window: no padding along the split dims (the
        window holds it), the layer's own along the other dims."""
        kernel, stride, padding = self._geometry()
        split = len(self.row_split.dims)
        return kernel, stride, (0,) * split + tuple(padding[split:])


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

    def _row_scale(self, exchanges, totals: tuple[int, ...], like: Tensor) -> Tensor:
        """Per output element: the window's kernel over the divisor torch uses along the
        split dims (torch's divisor is a product over the dims, each of its own)."""
        cache = self.__dict__.setdefault("_row_scales", {})
        own = tuple(self._own_out(exchanges))
        scales = cache.get((totals, own))
        if scales is None:
            scales = []
            for rows, total, (start, stop) in zip(self.rows, totals, own, strict=True):
                scale = []
                for row in range(start, stop):
                    first = row * rows.stride - rows.pad_lo
                    last = min(first + rows.kernel, total + rows.pad_hi)
                    counted = (
                        last - first if self.count_include_pad else min(last, total) - max(first, 0)
                    )
                    scale.append(rows.kernel / counted)
                scales.append(scale)
            cache[(totals, own)] = scales
        factor = None
        for axis, scale in enumerate(scales):
            shape = [1, 1] + [1] * self._dims
            shape[2 + axis] = len(scale)
            along = torch.tensor(scale, dtype=like.dtype, device=like.device).view(shape)
            factor = along if factor is None else factor * along
        return factor

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        window, exchanges, totals = self._window(x)
        kernel, stride, padding = self._local_options()
        options = dict(ceil_mode=self.ceil_mode, count_include_pad=self.count_include_pad)
        override = getattr(self, "divisor_override", None)
        if override is not None:
            options["divisor_override"] = override
        out = self._pool(window, kernel, stride, padding, **options)
        return out if override is not None else out * self._row_scale(exchanges, totals, out)


def _make(base: type[_SpatialPoolNd], nn_type: type[nn.Module], dims: int, functional):
    class SpatialPool(base, nn_type):
        __doc__ = (
            f"``nn.{nn_type.__name__}`` on this rank's rows along dim 2 of ``process_group`` "
            f"(the module docstring has the layout); the same arguments, plus the keyword-only "
            f"``process_group`` and ``checks``."
        )
        _dims = dims

        def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
            nn_type.__init__(self, *args, **kwargs)
            self._set_group(process_group, checks, self._pool_rows, None)
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

    def _adaptive_rows(self, axis: int) -> AdaptiveRows:
        size = _per_dim(self.output_size, self._dims)[axis]
        if size is None:
            raise NotImplementedError(
                f"an adaptive pooling that keeps dim {2 + axis} (output_size None there) with "
                f"that dim split"
            )
        return AdaptiveRows(size)

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        if getattr(self, "return_indices", False):
            raise NotImplementedError("return_indices=True with rows split")
        window, exchanges, totals = self._window(x)
        # Average and max over a box are those over each of its dims in turn: along each
        # split dim, every output row pools its own stretch of the window (torch's adaptive
        # stretches of the whole input) to one row, the other dims kept (None)
        split = len(exchanges)
        for axis, (rows, total, (start, stop)) in enumerate(
            zip(self.rows, totals, self._own_out(exchanges), strict=True)
        ):
            first = rows.window((start, stop), total)[0]
            keep: list[int | None] = [None] * self._dims
            keep[axis] = 1
            pooled = []
            for row in range(start, stop):
                begin, end = rows.rows_of(row, total)
                pooled.append(self._pool(window.narrow(2 + axis, begin - first, end - begin), keep))
            window = torch.cat(pooled, dim=2 + axis)
        rest = _per_dim(self.output_size, self._dims)[split:]
        if all(n is None for n in rest):
            return window
        return self._pool(window, (None,) * split + tuple(rest))


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
            self._set_group(process_group, checks, self._adaptive_rows, None)

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
