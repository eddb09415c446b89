"""Group-parallel convolutions: ``nn.Conv1d/2d/3d`` whose conv groups live on different ranks.

Shapes on rank ``r`` of ``P`` (``C_in_r``/``C_out_r`` from :func:`mpgroups.placement.place`)::

    weight            [C_out_r, C_in / G, *kernel_size]    rows out_slice of nn.ConvNd's weight
    bias              [C_out_r]
    input  replicated [N, C_in, *spatial]                  sharded: [N, C_in_shard_r, *spatial]
    output replicated [N, C_out, *spatial_out]             sharded: [N, C_out_r, *spatial_out]

With no process group, or a group of one rank, the layer computes exactly what ``nn.ConvNd``
computes, bit for bit, with the same parameters and ``state_dict`` keys.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.utils import _ntuple, _reverse_repeat_tuple

from mpgroups.collectives import (
    ChannelShards,
    all_gather_channels,
    all_gather_channels_partial,
    slice_channels,
    slice_group_channels,
)
from mpgroups.groups import resolve_process_group, team_subgroup
from mpgroups.placement import Placement, place, shard_slice
from mpgroups.validation import (
    BAD_CHANNELS,
    BAD_DEVICE,
    BAD_DIMS,
    BAD_DTYPE,
    NO_TENSOR,
    check_across_ranks,
    checks_enabled,
    fingerprint,
)

__all__ = ["GroupParallelConv1d", "GroupParallelConv2d", "GroupParallelConv3d", "LAYOUTS"]

LAYOUTS = ("replicated", "sharded")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _GroupParallelConvNd(nn.Module):
    _dims: int
    _nn_type: type[nn.modules.conv._ConvNd]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        process_group=None,
        input_layout: str = "replicated",
        output_layout: str = "replicated",
        checks: bool | None = None,
        _init_weights: bool = True,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        ntuple = _ntuple(self._dims)
        if groups <= 0:
            raise ValueError(f"groups must be a positive integer, got {groups}")
        if in_channels % groups != 0:
            raise ValueError(f"in_channels={in_channels} must be divisible by groups={groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels={out_channels} must be divisible by groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        for name, layout in (("input_layout", input_layout), ("output_layout", output_layout)):
            if layout not in LAYOUTS:
                raise ValueError(f"{name} must be one of {LAYOUTS}, got {layout!r}")
        kernel_size, stride, dilation = ntuple(kernel_size), ntuple(stride), ntuple(dilation)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding must be 'valid', 'same' or ints, got {padding!r}")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        else:
            padding = ntuple(padding)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.transposed = False
        self.output_padding = ntuple(0)
        self.groups = groups
        self.padding_mode = padding_mode
        self.input_layout = input_layout
        self.output_layout = output_layout
        self.checks = checks
        self._calls = 0
        self._reversed_padding_repeated_twice = _reversed_padding(padding, kernel_size, dilation)

        self.process_group = resolve_process_group(process_group)
        pg = self.process_group
        self.world_size = 1 if pg is None else pg.size()
        self.rank = 0 if pg is None else dist.get_rank(pg)
        self.placement: Placement = place(
            in_channels, out_channels, groups, self.world_size, self.rank
        )
        self._build_shards()
        self._fingerprint = fingerprint(
            type(self).__name__,
            in_channels,
            out_channels,
            groups,
            kernel_size,
            stride,
            padding,
            dilation,
            input_layout,
            output_layout,
        )

        self.weight = nn.Parameter(
            torch.empty(
                (self.placement.local_out_channels, in_channels // groups, *kernel_size),
                **factory_kwargs,
            )
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.placement.local_out_channels, **factory_kwargs)
            )
        else:
            self.register_parameter("bias", None)
        if _init_weights:
            self.reset_parameters()

    def _build_shards(self) -> None:
        """The channel splits that the collectives of this layer use."""
        pl, pg, world = self.placement, self.process_group, self.world_size
        groups = self.groups
        # Output sharded layout: exactly each rank's out_slice.
        self._out_shards = ChannelShards(
            pg,
            tuple(
                place(self.in_channels, self.out_channels, groups, world, r).out_slice
                for r in range(world)
            ),
            self.rank,
        )
        # Input sharded layout: the same rule applied to C_in channels.
        self._in_shards = ChannelShards(
            pg,
            tuple(shard_slice(self.in_channels, groups, world, r) for r in range(world)),
            self.rank,
        )
        self._team_shards = None
        if pl.filter_split:
            team_group = team_subgroup(pg, pl.team)
            team_slices = self._in_shards.slices[pl.team[0] : pl.team[1]]
            self._team_shards = ChannelShards.relative(team_group, team_slices, pl.team_rank)

    @property
    def _mpgroups_row_shards(self) -> ChannelShards:
        """How ``weight`` and ``bias`` split along dim 0 (see ``channel_modules.row_shards``)."""
        return self._out_shards

    @property
    def local_groups(self) -> int:
        """Conv groups of the local op (1 when this rank holds a piece of one group)."""
        return self.placement.local_groups

    @property
    def in_slice(self) -> tuple[int, int]:
        """Input channels this rank's conv reads."""
        return self.placement.in_slice

    @property
    def out_slice(self) -> tuple[int, int]:
        """Output channels this rank writes (its rows of the full weight)."""
        return self.placement.out_slice

    @property
    def input_shard(self) -> tuple[int, int]:
        """Channels of the input this rank holds when ``input_layout="sharded"``."""
        return self._in_shards.own

    @property
    def output_shard(self) -> tuple[int, int]:
        """Channels of the output this rank holds when ``output_layout="sharded"``."""
        return self._out_shards.own

    def reset_parameters(self) -> None:
        """Initialise as ``nn.ConvNd`` does on the full weight, then keep this rank's rows.

        Draws the same random numbers as ``nn.ConvNd.reset_parameters``, so with the same seed
        every rank holds exactly its slice of the single-device initialisation.
        """
        full_weight = torch.empty(
            (self.out_channels, self.in_channels // self.groups, *self.kernel_size),
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        init.kaiming_uniform_(full_weight, a=math.sqrt(5))
        start, stop = self.out_slice
        with torch.no_grad():
            self.weight.copy_(full_weight[start:stop])
            if self.bias is not None:
                fan_in, _ = init._calculate_fan_in_and_fan_out(full_weight)
                bound = 1 / math.sqrt(fan_in) if fan_in != 0 else 0
                full_bias = torch.empty(
                    self.out_channels, device=self.bias.device, dtype=self.bias.dtype
                )
                init.uniform_(full_bias, -bound, bound)
                self.bias.copy_(full_bias[start:stop])

    def _conv_forward(self, x: Tensor) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self._dims - 1]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = _ntuple(self._dims)(0)
        else:
            padding = self.padding
        return conv(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.local_groups
        )

    def _local_problem(self, x) -> tuple[int, str] | None:
        """``(code, message)`` when ``x`` cannot be this rank's input, found without
        communication; ``None`` when it can."""
        if not isinstance(x, Tensor):
            return NO_TENSOR, f"expects a Tensor, got {type(x).__name__}"
        dims = self._dims
        if x.dim() not in (dims + 1, dims + 2):
            return BAD_DIMS, (
                f"expects a {dims + 2}-D input [N, C, *spatial] (or {dims + 1}-D unbatched), "
                f"got {x.dim()}-D of shape {tuple(x.shape)}"
            )
        channels = x.shape[-dims - 1]
        expected = self._expected_channels(self.rank)
        if channels != expected:
            return BAD_CHANNELS, (
                f"input has {channels} channels, the layer expects {expected} "
                f"({self._channels_note(self.rank)})"
            )
        if x.dtype != self.weight.dtype:
            return BAD_DTYPE, (
                f"input dtype {x.dtype} does not match the weight's {self.weight.dtype}"
            )
        if x.device != self.weight.device:
            return BAD_DEVICE, f"input is on {x.device}, the weight on {self.weight.device}"
        return None

    def _expected_channels(self, rank: int) -> int:
        if self.input_layout == "sharded":
            start, stop = self._in_shards.slices[rank]
            return stop - start
        return self.in_channels

    def _channels_note(self, rank: int) -> str:
        if self.input_layout == "sharded":
            start, stop = self._in_shards.slices[rank]
            return (
                f"sharded input: its shard {start}..{stop} of {self.in_channels} channels, "
                f"groups={self.groups}"
            )
        return "replicated input"

    def _check_input(self, x) -> None:
        """Raise before any data moves when ``x`` cannot be this rank's input.

        With checks on and a collective to come, every rank first exchanges a record of its
        input (see :mod:`mpgroups.validation`), so a problem on any rank raises on all.
        """
        problem = self._local_problem(x)
        if self._communicates() and checks_enabled(self.checks):
            self._calls += 1
            check_across_ranks(
                x,
                process_group=self.process_group,
                rank=self.rank,
                layer=self._name(),
                layer_id=self._fingerprint,
                call=self._calls,
                problem=problem,
                channel_dim=x.dim() - self._dims - 1 if isinstance(x, Tensor) else 1,
                expected_channels=[self._expected_channels(r) for r in range(self.world_size)],
                channels_note=[self._channels_note(r) for r in range(self.world_size)],
                weight=self.weight,
            )
        elif problem is not None:
            error = TypeError if not isinstance(x, Tensor) else ValueError
            raise error(f"{self._name()} on rank {self.rank} of {self.world_size}: {problem[1]}")

    def _communicates(self) -> bool:
        """Whether a call can issue a collective, forward or backward (DESIGN §3's table).

        Only then can ranks that disagree hang, so only then do they exchange records; a
        sharded → sharded layer holding whole groups computes alone and checks locally.
        Decided from the configuration alone, never from the input: every rank must agree
        on whether to exchange. A replicated → sharded layer communicates only in backward
        (it gathers the input grad), yet exchanges on every call, so that ranks that
        disagree on recording that backward (``torch.no_grad()`` on one) raise together.
        """
        if self.world_size == 1:
            return False
        if self.input_layout == "sharded" and self.output_layout == "sharded":
            return self.placement.filter_split
        return True

    def _name(self) -> str:
        return (
            f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
            f"groups={self.groups}, {self.input_layout}->{self.output_layout})"
        )

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` (layout ``input_layout``) into an output of layout ``output_layout``.

        Accepts ``[N, C, *spatial]`` or unbatched ``[C, *spatial]``, as ``nn.ConvNd`` does.
        """
        self._check_input(x)
        if x.dim() == self._dims + 1:
            return self._forward_batched(x.unsqueeze(0)).squeeze(0)
        return self._forward_batched(x)

    def _forward_batched(self, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return self._conv_forward(x)
        pl = self.placement
        if self.input_layout == "replicated":
            if pl.filter_split:
                x = slice_group_channels(x, pl.in_slice, self._team_shards, self._in_shards)
            else:
                x = slice_channels(x, self._in_shards)
        elif pl.filter_split:
            x = all_gather_channels_partial(x, self._team_shards)
        y = self._conv_forward(x)
        if self.output_layout == "replicated":
            y = all_gather_channels(y, self._out_shards)
        return y

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        s = s.format(**self.__dict__)
        s += (
            f", rank={self.rank}/{self.world_size}, local_groups={self.local_groups}"
            f", in_slice={self.in_slice}, out_slice={self.out_slice}"
        )
        if self.placement.filter_split:
            s += f", team={self.placement.team}"
        if (self.input_layout, self.output_layout) != ("replicated", "replicated"):
            s += f", layout={self.input_layout}->{self.output_layout}"
        return s

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
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            dtype=conv.weight.dtype,
            process_group=process_group,
            input_layout=input_layout,
            output_layout=output_layout,
            checks=checks,
            _init_weights=False,
        )
        start, stop = layer.out_slice
        layer.weight = _param_copy(conv.weight, start, stop)
        if conv.bias is not None:
            layer.bias = _param_copy(conv.bias, start, stop)
        layer.train(conv.training)
        return layer

    def to_conv(self) -> nn.modules.conv._ConvNd:
        """The whole layer as a plain ``nn.ConvNd`` (a collective: every rank must call it)."""
        conv = self._nn_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
            dtype=self.weight.dtype,
        )
        conv.weight = _param_copy(self.full_weight(), 0, self.out_channels, self.weight)
        if self.bias is not None:
            conv.bias = _param_copy(self.full_bias(), 0, self.out_channels, self.bias)
        conv.train(self.training)
        return conv

    def full_weight(self) -> Tensor:
        """``[C_out, C_in / G, *kernel_size]``, gathered from every rank (collective)."""
        with torch.no_grad():
            return all_gather_channels(self.weight.detach(), self._out_shards, dim=0)

    def full_bias(self) -> Tensor | None:
        """``[C_out]`` gathered from every rank (collective), or ``None`` without bias."""
        if self.bias is None:
            return None
        with torch.no_grad():
            return all_gather_channels(self.bias.detach(), self._out_shards, dim=0)


def _reversed_padding(padding, kernel_size, dilation) -> list[int]:
    """``F.pad`` amounts for non-zero padding modes, computed as ``nn.ConvNd`` does."""
    if isinstance(padding, str):
        result = [0, 0] * len(kernel_size)
        if padding == "same":
            for d, k, i in zip(
                dilation, kernel_size, range(len(kernel_size) - 1, -1, -1), strict=True
            ):
                total = d * (k - 1)
                left = total // 2
                result[2 * i] = left
                result[2 * i + 1] = total - left
        return result
    return list(_reverse_repeat_tuple(padding, 2))


def _param_copy(source: Tensor, start: int, stop: int, like: Tensor | None = None) -> nn.Parameter:
    requires_grad = (like if like is not None else source).requires_grad
    return nn.Parameter(source.detach()[start:stop].clone(), requires_grad=requires_grad)


class GroupParallelConv1d(_GroupParallelConvNd):
    """``nn.Conv1d`` with its conv groups placed over ``process_group`` (see module docstring)."""

    _dims = 1
    _nn_type = nn.Conv1d


class GroupParallelConv2d(_GroupParallelConvNd):
    """``nn.Conv2d`` with its conv groups placed over ``process_group``.

    Args:
        in_channels ... dtype: as ``nn.Conv2d``.
        process_group: ``ProcessGroup``, 1-D ``DeviceMesh``, or ``None`` for the default group
            when ``torch.distributed`` is initialised (else a single-device layer).
        input_layout, output_layout: ``"replicated"`` (every rank holds the whole activation)
            or ``"sharded"`` (each rank holds its channels, see ``input_shard``/``output_shard``).
        checks: exchange a small record of every input between the ranks before the data
            moves, so that a mismatch raises on every rank instead of hanging (default:
            ``MPGROUPS_CHECKS``, on unless set to ``0``).

    Raises:
        ValueError: bad conv arguments, as ``nn.Conv2d``; ``PlacementError`` (a ``ValueError``)
            when ``groups`` cannot be placed on the group's size.
    """

    _dims = 2
    _nn_type = nn.Conv2d


class GroupParallelConv3d(_GroupParallelConvNd):
    """``nn.Conv3d`` with its conv groups placed over ``process_group`` (see module docstring)."""

    _dims = 3
    _nn_type = nn.Conv3d
