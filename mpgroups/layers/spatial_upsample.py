"""Spatially split upsampling: ``nn.Upsample`` on this rank's block of rows along dim 2.

By a whole scale along dim 2, output rows ``[a, b)`` read a contiguous stretch of input rows
(one more for linear modes); a stretch starting at row ``w`` upsamples to the output rows
from ``w·scale`` on, exactly as the whole input does there, so the layer upsamples its
window and keeps its own rows. The stretch starts one row early where linear interpolation
would otherwise clamp at the window's edge (the whole input clamps only at its own).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.layers.spatial_base import SpatialLayer
from mpgroups.sharding.spatial import UpsampleRows

__all__ = ["SpatialUpsample"]

_LINEAR = ("linear", "bilinear", "trilinear")


class SpatialUpsample(SpatialLayer, nn.Upsample):
    """``nn.Upsample`` on this rank's rows (dim 2, and dim 3 on a 2-D mesh) of
    ``process_group``'s split input; the same arguments, plus the keyword-only
    ``process_group`` and ``checks``. With rows split, the scale along each split dim must
    be a whole number (``scale_factor``; ``size`` is not taken) and linear modes need
    ``align_corners=False``."""

    def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
        nn.Upsample.__init__(self, *args, **kwargs)
        self._set_group(process_group, checks, self._upsample_rows, None)

    @property
    def _input_dims(self) -> tuple[int, int]:
        return 3, 5

    def _upsample_rows(self, axis: int) -> UpsampleRows:
        scale = self.scale_factor
        scale = scale[axis] if isinstance(scale, (tuple, list)) else scale
        whole = scale is not None and float(scale).is_integer()
        if self.mode not in ("nearest", "nearest-exact", *_LINEAR):
            problem = f"mode={self.mode!r} (nearest, nearest-exact and linear modes are)"
        elif self.size is not None or not whole:
            problem = f"a scale along dim {2 + axis} that is not a whole scale_factor"
        elif self.mode in _LINEAR and self.align_corners:
            problem = "align_corners=True"
        else:
            mode = "linear" if self.mode in _LINEAR else self.mode
            return UpsampleRows(int(scale), mode)
        raise NotImplementedError(f"SpatialUpsample with rows split does not take {problem}")

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        window, exchanges, totals = self._window(x)
        out = F.interpolate(
            window,
            scale_factor=self.scale_factor,
            mode=self.mode,
            align_corners=self.align_corners,
            recompute_scale_factor=self.recompute_scale_factor,
        )
        for axis, (rows, total, (start, stop)) in enumerate(
            zip(self.rows, totals, self._own_out(exchanges), strict=True)
        ):
            first = rows.window((start, stop), total)[0]
            out = out.narrow(2 + axis, start - first * rows.scale, stop - start)
        return out

    @classmethod
    def from_module(cls, module: nn.Upsample, process_group=None, *, checks=None):
        """The spatial twin of ``module`` (an ``nn.Upsample``)."""
        return cls(
            size=module.size,
            scale_factor=module.scale_factor,
            mode=module.mode,
            align_corners=module.align_corners,
            recompute_scale_factor=module.recompute_scale_factor,
            process_group=process_group,
            checks=checks,
        )
