"""Conversion between a group-parallel conv and the ``torch.nn`` conv it stands for.

:class:`ConvConversion` gives the layers ``from_conv`` (shard an ``nn.ConvNd``), ``to_conv``
(gather it back) and ``full_weight``/``full_bias``. Gathering is a collective over the
layer's process group, checked like any other (see :mod:`mpgroups.input_checks`).
"""

from __future__ import annotations

from torch import Tensor, nn

from mpgroups.collectives import gather_rows

__all__ = ["ConvConversion", "conv_arguments"]


class ConvConversion:
    """Mixed into ``_GroupParallelConvNd`` (which provides ``_nn_type``, ``shards``,
    ``state_guard``, ``weight`` and ``bias``)."""

    @classmethod
    def from_conv(
        cls,
        conv: nn.modules.conv._ConvNd,
        process_group=None,
        *,
        input_layout: str = "replicated",
        output_layout: str = "replicated",
        checks: bool | None = None,
    ):
        """Shard an existing ``nn.ConvNd``: this rank keeps its rows of the weight and bias.

        The new parameters are copies on ``conv``'s device and dtype, with its
        ``requires_grad``; ``conv`` itself is left as it was.
        """
        if type(conv) is not cls._nn_type:
            raise TypeError(
                f"{cls.__name__}.from_conv expects an {cls._nn_type.__name__}, "
                f"got {type(conv).__name__}"
            )
        layer = cls(
            *conv_arguments(conv),
            device="meta",
            dtype=conv.weight.dtype,
            process_group=process_group,
            input_layout=input_layout,
            output_layout=output_layout,
            checks=checks,
            _init_weights=False,
        )
        start, stop = layer.out_slice
        layer.weight = _param_rows(conv.weight, start, stop, conv.weight.requires_grad)
        if conv.bias is not None:
            layer.bias = _param_rows(conv.bias, start, stop, conv.bias.requires_grad)
        layer.train(conv.training)
        return layer

    def to_conv(self) -> nn.modules.conv._ConvNd:
        """The whole layer as a plain ``nn.ConvNd`` (a collective: every rank must call it)."""
        conv = self._nn_type(*self._arguments(), device="meta", dtype=self.weight.dtype)
        conv.weight = _param_rows(
            self.full_weight(), 0, self.out_channels, self.weight.requires_grad
        )
        if self.bias is not None:
            conv.bias = _param_rows(self.full_bias(), 0, self.out_channels, self.bias.requires_grad)
        conv.train(self.training)
        return conv

    def full_weight(self) -> Tensor:
        """``[C_out, C_in / G, *kernel_size]``, gathered from every rank (collective)."""
        return self._gather_rows(self.weight)

    def full_bias(self) -> Tensor | None:
        """``[C_out]`` gathered from every rank (collective), or ``None`` without bias."""
        return None if self.bias is None else self._gather_rows(self.bias)

    def _gather_rows(self, local: Tensor) -> Tensor:
        widths = self.shards.outputs.widths
        self.state_guard(
            local,
            problem=None,
            expected_channels=widths,
            channels_note=[f"its {w} rows of the full tensor" for w in widths],
        )
        return gather_rows(local, self.shards.outputs)


def conv_arguments(conv) -> tuple:
    """``nn.ConvNd``'s positional arguments, from a ConvNd or a group-parallel layer."""
    return (
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )


def _param_rows(source: Tensor, start: int, stop: int, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(source.detach()[start:stop].clone(), requires_grad=requires_grad)
