"""A small U-Net (Ronneberger et al., 2015) in 1-D, 2-D or 3-D: an encoder of conv blocks and
poolings, a decoder of upsamplings (transposed convs, or ``nn.Upsample`` and a 1×1 conv)
whose outputs are concatenated with the encoder's on channels, and a 1×1 head.

Built as a plain ``torch.nn`` model; ``mpgroups.parallelize(model, group, plan="spatial")``
splits its rows over the ranks (the input's rows must halve ``levels`` times into blocks
every rank can hold). Each block: conv 3 → norm (BatchNorm, GroupNorm or InstanceNorm) →
ReLU → conv 3 (reflect padding) → GroupNorm → SiLU.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet"]


def _block(cin: int, cout: int, dims: int, norm: str) -> nn.Sequential:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    norms = {
        "batch": lambda c: (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](c),
        "group": lambda c: nn.GroupNorm(2, c),
        "instance": lambda c: (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1](
            c, affine=True
        ),
    }
    return nn.Sequential(
        conv(cin, cout, 3, padding=1), norms[norm](cout), nn.ReLU(),
        conv(cout, cout, 3, padding=1, padding_mode="reflect"), nn.GroupNorm(2, cout), nn.SiLU(),
    )  # fmt: skip


class UNet(nn.Module):
    """A U-Net of ``dims`` spatial dims with ``levels`` poolings.

    Args:
        in_channels, out_channels: of the input and of the head.
        width: channels of the first level (doubled at each level down).
        up: ``"transpose"`` (2×2 transposed convs) or ``"upsample"`` (``nn.Upsample``
            by 2, linear, then a 1×1 conv).
        norm: the first norm of each block: ``"batch"``, ``"group"`` or ``"instance"``.

    Shapes: ``[N, in_channels, *spatial]`` → ``[N, out_channels, *spatial]``; each spatial
    size must halve evenly ``levels`` times for the skips to fit (a multiple of
    ``2**levels``), as in any U-Net without cropping.
    """

    def __init__(
        self,
        dims: int = 2,
        levels: int = 2,
        up: str = "transpose",
        norm: str = "batch",
        *,
        in_channels: int = 2,
        out_channels: int = 3,
        width: int = 4,
    ) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
        pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dims - 1]
        linear = ("linear", "bilinear", "trilinear")[dims - 1]
        widths = [width * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for width in widths[:-1]:
            self.down.append(_block(cin, width, dims, norm))
            cin = width
        self.pool = pool(2)
        self.middle = _block(widths[-2], widths[-1], dims, norm)
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for wide, narrow in zip(widths[:0:-1], widths[-2::-1], strict=True):
            if up == "transpose":
                self.ups.append(transposed(wide, narrow, 2, stride=2))
            else:
                resize = nn.Upsample(scale_factor=2, mode=linear)
                self.ups.append(nn.Sequential(resize, conv(wide, narrow, 1)))
            self.up_blocks.append(_block(2 * narrow, narrow, dims, norm))
        self.head = conv(widths[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.middle(x)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)
