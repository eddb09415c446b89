"""Spatially split convolutions: ``nn.Conv1d/2d/3d`` whose input and output rows along the
first spatial dim (dim 2) are split over the ranks, each computing its own block of rows.

Shapes on rank ``r`` of ``P`` (``l_r``: ``torch.tensor_split``'s block of ``L`` rows)::

    weight, bias   as nn.ConvNd's, whole on every rank (replicated; grads summed over ranks)
    input          [N, C_in, l_r, *rest]        rows of tensor_split(x, P, dim=2)[r]
    output         [N, C_out, l'_r, *rest_out]  rows of tensor_split(conv(x), P, dim=2)[r]

Each forward exchanges the halo: the rows of the neighbours' blocks this rank's output rows
read (:mod:`mpgroups.sharding.spatial`), every stride, dilation, padding (``"same"`` and
``"valid"`` too) and padding mode, point to point. The layer's output is the next layer's
input layout, so a chain of convs stays split. With no process group, or one rank, the layer
is ``nn.ConvNd``, bit for bit, with the same ``state_dict`` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.comm.collectives import copy_to_ranks_together
from mpgroups.comm.halo import assemble_windows, halo_pieces, split_windows_grad
from mpgroups.layers.spatial_base import SpatialLayer
from mpgroups.sharding.spatial import ConvRows, TransposedRows

__all__ = [
    "SpatialConv1d",
    "SpatialConv2d",
    "SpatialConv3d",
    "SpatialConvTranspose1d",
    "SpatialConvTranspose2d",
    "SpatialConvTranspose3d",
]


class _WindowConv(torch.autograd.Function):
    """A conv (or transposed conv) of this rank's window that saves its block and the halo
    pieces, not the window: the block is usually saved by the layer before (a ReLU's output)
    and a copy of it would double what the rank keeps for backward. The backward rebuilds
    the window (a transient), takes the conv's gradients from ``convolution_backward`` and
    splits the window's gradient into the block's and each halo piece's, by differentiable
    ops: double backward works. ``exchanges``: one per split dim (:func:`halo_pieces`);
    ``pieces``: theirs, flattened."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, exchanges, *pieces):
        grouped = _group_pieces(pieces, exchanges)
        window = assemble_windows(x, grouped, exchanges)
        ctx.layer, ctx.exchanges, ctx.has_bias = layer, exchanges, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, *pieces)
        return layer._local_conv(layer._pad_rest(window), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, *pieces = ctx.saved_tensors
        layer, exchanges = ctx.layer, ctx.exchanges
        grouped = _group_pieces(pieces, exchanges)
        window = assemble_windows(x, grouped, exchanges)
        stride, padding, dilation, transposed, output_padding = layer._conv_options()
        out_channels = weight.shape[1] * layer.groups if transposed else weight.shape[0]
        # Under autocast the forward computed in a lower precision: so does its backward
        compute = grad.dtype
        grad_window, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, layer._pad_rest(window).to(compute), weight.to(compute),
            [out_channels] if ctx.has_bias else None, stride, padding, dilation, transposed,
            output_padding, layer.groups, [True, True, ctx.has_bias],
        )  # fmt: skip
        grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        grad_window = layer._unpad_rest(window, grad_window.to(window.dtype))
        grad_x, piece_grads = split_windows_grad(grad_window, exchanges, x.shape, grouped)
        flat = [g for step in piece_grads for g in step]
        return (grad_x, grad_weight, grad_bias, None, None, *flat)


def _group_pieces(pieces, exchanges) -> list[list[Tensor]]:
    """``pieces`` (flattened) per exchange: a token and one tensor per peer received from."""
    grouped, start = [], 0
    for plan, _, _ in exchanges:
        count = 1 + len(plan.receives)
        grouped.append(list(pieces[start : start + count]))
        start += count
    return grouped


def _twin(cls, conv, process_group, checks, **arguments):
    """A ``cls`` with ``conv``'s arguments (and ``arguments``) and copies of its parameters."""
    twin = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device="meta",
        dtype=conv.weight.dtype,
        process_group=process_group,
        checks=checks,
        **arguments,
    )
    twin.weight = nn.Parameter(conv.weight.detach().clone(), conv.weight.requires_grad)
    if conv.bias is not None:
        twin.bias = nn.Parameter(conv.bias.detach().clone(), conv.bias.requires_grad)
    return twin


class _SpatialConvNd(SpatialLayer):
    """The spatial split over an ``nn.ConvNd`` subclass (mixed in before it)."""

    def _conv_rows(self, axis: int) -> ConvRows:
        """What the conv does along spatial dim ``axis`` (dim ``2 + axis``)."""
        pads = self._reversed_padding_repeated_twice  # last dim first
        at = 2 * (self._dims - 1 - axis)
        return ConvRows(
            kernel=self.kernel_size[axis],
            stride=self.stride[axis],
            dilation=self.dilation[axis],
            pad_lo=pads[at],
            pad_hi=pads[at + 1],
            padding_mode=self.padding_mode,
        )

    @property
    def _split_count(self) -> int:
        return len(self.row_split.dims)

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, process_group=None, *, checks=None):
        """The spatial twin of ``conv`` (an ``nn.ConvNd`` of the same dims), sharing nothing:
        parameters copied, so every rank must pass the same ``conv``."""
        return _twin(cls, conv, process_group, checks, padding_mode=conv.padding_mode)

    def _rest_padding(self) -> tuple[list[int], object]:
        """``(F.pad list for the dims not split, conv padding)``: zeros padded symmetrically
        go to the conv itself; anything else is padded first (the window holds the split
        dims' padding)."""
        split = self._split_count
        rest = list(self._reversed_padding_repeated_twice[: -2 * split])
        if not any(rest):
            return [], 0
        symmetric = all(rest[i] == rest[i + 1] for i in range(0, len(rest), 2))
        if self.padding_mode == "zeros" and symmetric:
            return [], (0,) * split + tuple(rest[::-2])
        return [*rest] + [0, 0] * split, 0

    def _pad_rest(self, rows: Tensor) -> Tensor:
        """The window padded along dims 3+ where the conv cannot pad it itself."""
        pad, _ = self._rest_padding()
        if not pad:
            return rows
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(rows, pad, mode=mode)

    def _unpad_rest(self, rows: Tensor, grad: Tensor) -> Tensor:
        """The gradient of :meth:`_pad_rest`'s input from its output's (linear in ``grad``,
        so differentiable again without ``rows``' values)."""
        if not self._rest_padding()[0]:
            return grad
        with torch.enable_grad():
            leaf = rows.detach().requires_grad_()
            (result,) = torch.autograd.grad(
                self._pad_rest(leaf), leaf, grad, create_graph=grad.requires_grad
            )
        return result

    def _conv_options(self):
        """``(stride, padding, dilation, transposed, output_padding)`` of the window's conv."""
        _, padding = self._rest_padding()
        padding = padding if padding else (0,) * self._dims
        return self.stride, padding, self.dilation, False, (0,) * self._dims

    def _local_conv(self, window: Tensor, weight: Tensor, bias) -> Tensor:
        stride, padding, dilation, _, _ = self._conv_options()
        return self._conv(window, weight, bias, stride, padding, dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if not self.splits_rows:
            return super().forward(x)
        exchanges = self._exchanges(self._total_rows(x, self.weight))
        pieces = [p for step in halo_pieces(x, exchanges) for p in step]
        weight, bias = copy_to_ranks_together([self.weight, self.bias], self.process_group)
        return _WindowConv.apply(x, weight, bias, self, exchanges, *pieces)


def _make(nn_type: type[nn.modules.conv._ConvNd], dims: int, functional):
    class SpatialConv(_SpatialConvNd, nn_type):
        __doc__ = (
            f"``nn.{nn_type.__name__}`` with its rows along dim 2 split over ``process_group`` "
            f"(the module docstring has the shapes); the same arguments, plus the keyword-only "
            f"``process_group`` (``ProcessGroup``, 1-D ``DeviceMesh`` or ``None``: the default "
            f"group if initialised) and ``checks`` (``None``: ``MPGROUPS_CHECKS``)."
        )
        _dims = dims

        def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
            nn_type.__init__(self, *args, **kwargs)
            self._set_group(process_group, checks, self._conv_rows, self.in_channels)

        @staticmethod
        def _conv(x, weight, bias, stride, padding, dilation, groups):
            return functional(x, weight, bias, stride, padding, dilation, groups)

    SpatialConv.__name__ = SpatialConv.__qualname__ = f"Spatial{nn_type.__name__}"
    return SpatialConv


SpatialConv1d = _make(nn.Conv1d, 1, F.conv1d)
SpatialConv2d = _make(nn.Conv2d, 2, F.conv2d)
SpatialConv3d = _make(nn.Conv3d, 3, F.conv3d)


class _SpatialConvTransposeNd(SpatialLayer):
    """The spatial split over an ``nn.ConvTransposeNd`` subclass (mixed in before it): the
    window is the input rows that add to this rank's output rows; the transposed conv of the
    window, with no padding along dim 2, covers a stretch of output rows around them, and the
    rank's block is cut from it (zero rows where no input row reaches: a stride longer than
    the kernel)."""

    def _conv_rows(self, axis: int) -> TransposedRows:
        return TransposedRows(
            kernel=self.kernel_size[axis],
            stride=self.stride[axis],
            dilation=self.dilation[axis],
            padding=self.padding[axis],
            output_padding=self.output_padding[axis],
        )

    def _pad_rest(self, rows: Tensor) -> Tensor:
        return rows

    def _unpad_rest(self, rows: Tensor, grad: Tensor) -> Tensor:
        return grad

    def _conv_options(self):
        """``(stride, padding, dilation, transposed, output_padding)`` of the window's conv:
        none of either padding along the split dims (the rank's rows are cut from the
        result)."""
        split = len(self.row_split.dims)
        padding = (0,) * split + tuple(self.padding[split:])
        output_padding = (0,) * split + tuple(self.output_padding[split:])
        return self.stride, padding, self.dilation, True, output_padding

    def _local_conv(self, window: Tensor, weight: Tensor, bias) -> Tensor:
        stride, padding, dilation, _, output_padding = self._conv_options()
        return self._conv_transpose(
            window, weight, bias, stride, padding, output_padding, self.groups, dilation
        )

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if not self.splits_rows:
            return super().forward(x, output_size)
        if output_size is not None:
            raise NotImplementedError(
                "output_size with rows split: give output_padding in the constructor instead"
            )
        totals = self._total_rows(x, self.weight)
        exchanges = self._exchanges(totals)
        weight, bias = copy_to_ranks_together([self.weight, self.bias], self.process_group)
        pieces = [p for step in halo_pieces(x, exchanges) for p in step]
        out = _WindowConv.apply(x, weight, None, self, exchanges, *pieces)
        pad = [0, 0] * self._dims  # F.pad's list, last dim first
        for axis, (rows, total, (start, stop)) in enumerate(
            zip(self.rows, totals, self._own_out(exchanges), strict=True)
        ):
            first = rows.window((start, stop), total)[0]
            covered = first * self.stride[axis] - self.padding[axis]  # out's first, globally
            at = 2 * (self._dims - 1 - axis)
            pad[at] = covered - start
            pad[at + 1] = stop - (covered + out.shape[2 + axis])
        out = F.pad(out, pad)
        if bias is None:
            return out
        return out + bias.view([1, -1] + [1] * self._dims)


def _make_transposed(nn_type: type[nn.Module], dims: int, functional):
    class SpatialConvTranspose(_SpatialConvTransposeNd, nn_type):
        __doc__ = (
            f"``nn.{nn_type.__name__}`` with its rows along dim 2 split over "
            f"``process_group``; the same arguments, plus the keyword-only ``process_group`` "
            f"and ``checks``. Weight and bias whole on every rank, grads summed."
        )
        _dims = dims

        def __init__(self, *args, process_group=None, checks: bool | None = None, **kwargs):
            nn_type.__init__(self, *args, **kwargs)
            self._set_group(process_group, checks, self._conv_rows, self.in_channels)

        @staticmethod
        def _conv_transpose(x, *args):
            return functional(x, *args)

        @classmethod
        def from_conv(cls, conv, process_group=None, *, checks=None):
            """The spatial twin of ``conv`` (an ``nn.ConvTransposeNd``), parameters copied."""
            return _twin(cls, conv, process_group, checks, output_padding=conv.output_padding)

    SpatialConvTranspose.__name__ = f"Spatial{nn_type.__name__}"
    SpatialConvTranspose.__qualname__ = SpatialConvTranspose.__name__
    return SpatialConvTranspose


SpatialConvTranspose1d = _make_transposed(nn.ConvTranspose1d, 1, F.conv_transpose1d)
SpatialConvTranspose2d = _make_transposed(nn.ConvTranspose2d, 2, F.conv_transpose2d)
SpatialConvTranspose3d = _make_transposed(nn.ConvTranspose3d, 3, F.conv_transpose3d)
