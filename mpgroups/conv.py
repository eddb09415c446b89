"""Group-parallel convolutions: ``nn.Conv1d/2d/3d`` whose conv groups live on different ranks.

Shapes on rank ``r`` of ``P`` (``C_in_r``/``C_out_r`` from :func:`mpgroups.placement.place`)::

    weight            [C_out_r, C_in / G, *kernel_size]    rows out_slice of nn.ConvNd's weight
    bias              [C_out_r]
    input  replicated [N, C_in, *spatial]                  sharded: [N, C_in_shard_r, *spatial]
    output replicated [N, C_out, *spatial_out]             sharded: [N, C_out_r, *spatial_out]

With no process group, or a group of one rank, the layer computes exactly what ``nn.ConvNd``
computes, bit for bit, with the same parameters and ``state_dict`` keys. Outputs keep the
input's memory format (channels_last in, channels_last out) in every layout.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpgroups.collectives import (
    all_gather_channels,
    all_gather_channels_partial,
    slice_channels,
    slice_group_channels,
)
from mpgroups.conv_conversion import ConvConversion, conv_arguments
from mpgroups.input_checks import (
    BAD_CHANNELS,
    BAD_DEVICE,
    BAD_DTYPE,
    InputGuard,
    Problem,
    tensor_problem,
)
from mpgroups.layout import (
    LAYOUTS,
    NOT_PICKLABLE,
    ChannelShards,
    check_layout,
    communicates,
    layer_shards,
)
from mpgroups.placement import Placement
from mpgroups.process_groups import rank_and_world_size, resolve_process_group, team_subgroup

__all__ = ["GroupParallelConv1d", "GroupParallelConv2d", "GroupParallelConv3d", "LAYOUTS"]

# What nn.ConvNd derives from its arguments; the layers take these from a meta-device ConvNd.
_CONV_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class _GroupParallelConvNd(ConvConversion, nn.Module):
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
        check_layout("input_layout", input_layout)
        check_layout("output_layout", output_layout)
        # nn.ConvNd itself checks and normalises the arguments (on the meta device: no memory).
        try:
            spec = self._nn_type(
                in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                bias, padding_mode, device="meta",
            )  # fmt: skip
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}: {err} (got in_channels={in_channels}, "
                f"out_channels={out_channels}, groups={groups}, stride={stride}, "
                f"padding={padding!r}, padding_mode={padding_mode!r})"
            ) from err
        for name in _CONV_ATTRIBUTES:
            setattr(self, name, getattr(spec, name))
        self.input_layout = input_layout
        self.output_layout = output_layout

        pg = resolve_process_group(process_group)
        self.rank, self.world_size = rank_and_world_size(pg)
        self.shards = layer_shards(
            in_channels, out_channels, groups, self.world_size, self.rank, pg
        )
        self._team_shards: ChannelShards | None = None
        if self.placement.filter_split:
            self._team_shards = self.shards.team(team_subgroup(pg, self.placement.team))
        self._communicates = communicates(self.placement, input_layout, output_layout)
        # Each rank's expected input channels and what they are, for the checks' messages.
        expected = [self._expected_channels(r) for r in range(self.world_size)]
        self._input_channels = [channels for channels, _ in expected]
        self._input_notes = [note for _, note in expected]
        config = (type(self).__name__, conv_arguments(spec), input_layout, output_layout)
        self.input_guard = InputGuard(
            self._name(), config, pg, channel_dim=-self._dims - 1, checks=checks
        )
        self.state_guard = InputGuard(
            f"{self._name()} gathering its parameters",
            ("state", *config),
            pg,
            channel_dim=0,
            checks=checks,
        )

        factory_kwargs = {"device": device, "dtype": dtype}
        local_out = self.placement.local_out_channels
        self.weight = nn.Parameter(
            torch.empty((local_out, in_channels // groups, *self.kernel_size), **factory_kwargs)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out, **factory_kwargs))
        else:
            self.register_parameter("bias", None)
        if _init_weights:
            self.reset_parameters()

    # Copies as nn.Module's own (which go through __reduce_ex__), sharing the process groups.
    def __copy__(self) -> _GroupParallelConvNd:
        twin = type(self).__new__(type(self))
        twin.__setstate__(self.__getstate__())
        return twin

    def __deepcopy__(self, memo) -> _GroupParallelConvNd:
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return twin

    def __reduce_ex__(self, protocol):
        if self.process_group is not None:
            raise TypeError(NOT_PICKLABLE)
        return super().__reduce_ex__(protocol)

    @property
    def placement(self) -> Placement:
        return self.shards.placement

    @property
    def process_group(self):
        """The ``ProcessGroup`` the layer runs over, or ``None`` on a single device."""
        return self.shards.outputs.process_group

    @property
    def _mpgroups_row_shards(self) -> ChannelShards:
        """How ``weight`` and ``bias`` split along dim 0 (see ``channel_modules.row_shards``)."""
        return self.shards.outputs

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
        return self.shards.inputs.own

    @property
    def output_shard(self) -> tuple[int, int]:
        """Channels of the output this rank holds when ``output_layout="sharded"``."""
        return self.shards.outputs.own

    def reset_parameters(self) -> None:
        """Initialise as ``nn.ConvNd`` does on the full weight, then keep this rank's rows.

        Builds the full ``nn.ConvNd`` (which draws exactly the random numbers
        ``nn.ConvNd.__init__`` draws), so with the same seed every rank holds exactly its slice
        of the single-device initialisation.
        """
        full = self._nn_type(*self._arguments(), device=self.weight.device, dtype=self.weight.dtype)
        start, stop = self.out_slice
        with torch.no_grad():
            self.weight.copy_(full.weight[start:stop])
            if self.bias is not None:
                self.bias.copy_(full.bias[start:stop])

    def _expected_channels(self, rank: int) -> tuple[int, str]:
        """The channel count of ``rank``'s input, and what it is, for messages."""
        if self.input_layout == "replicated":
            return self.in_channels, "replicated input"
        start, stop = self.shards.inputs.slices[rank]
        note = f"sharded input: its shard {start}..{stop} of {self.in_channels} channels"
        return stop - start, f"{note}, groups={self.groups}"

    def _check_input(self, x) -> None:
        rank = self.rank
        self.input_guard(
            x,
            problem=_input_problem(
                x, self._dims, self._input_channels[rank], self._input_notes[rank], self.weight
            ),
            expected_channels=self._input_channels,
            channels_note=self._input_notes,
            weight=self.weight,
            communicates=self._communicates,
        )

    def _arguments(self) -> tuple:
        """The positional arguments of the equivalent ``nn.ConvNd`` (device and dtype aside)."""
        return conv_arguments(self)

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
        placement, shards = self.placement, self.shards
        if self.world_size > 1 and self.input_layout == "replicated":
            if placement.filter_split:
                x = slice_group_channels(x, placement.in_slice, self._team_shards, shards.inputs)
            else:
                x = slice_channels(x, shards.inputs)
        elif placement.filter_split:
            x = all_gather_channels_partial(x, self._team_shards)
        y = self._conv_forward(x)
        if self.output_layout == "replicated":
            y = all_gather_channels(y, shards.outputs)
        return y

    def _conv_forward(self, x: Tensor) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self._dims - 1]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return conv(
            x, self.weight, self.bias, self.stride, padding, self.dilation, self.local_groups
        )

    def extra_repr(self) -> str:
        s = nn.modules.conv._ConvNd.extra_repr(self)
        s += (
            f", rank={self.rank}/{self.world_size}, local_groups={self.local_groups}"
            f", in_slice={self.in_slice}, out_slice={self.out_slice}"
        )
        if self.placement.filter_split:
            s += f", team={self.placement.team}"
        if (self.input_layout, self.output_layout) != ("replicated", "replicated"):
            s += f", layout={self.input_layout}->{self.output_layout}"
        return s


def _input_problem(x, dims: int, channels: int, note: str, weight: Tensor) -> Problem | None:
    """``(code, message)`` when ``x`` cannot be this rank's input, found without
    communication; ``None`` when it can."""
    expects = f"a {dims + 2}-D input [N, C, *spatial] (or {dims + 1}-D unbatched)"
    problem = tensor_problem(x, expects, dims + 1, dims + 2)
    if problem is not None:
        return problem
    if x.shape[-dims - 1] != channels:
        return BAD_CHANNELS, (
            f"input has {x.shape[-dims - 1]} channels, the layer expects {channels} ({note})"
        )
    # Under autocast the conv casts its input itself, as nn.ConvNd does.
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return BAD_DTYPE, f"input dtype {x.dtype} does not match the weight's {weight.dtype}"
    if x.device != weight.device:
        return BAD_DEVICE, f"input is on {x.device}, the weight on {weight.device}"
    return None


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
