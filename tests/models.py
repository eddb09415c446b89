"""Small models with the structure of real grouped-conv networks, in plain torch.nn."""

from __future__ import annotations

import torch
from torch import nn


def randomize_norms(model: nn.Module) -> None:
    """Trained-looking BatchNorm state, so a misplaced shard of it cannot go unnoticed."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)


class Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1 -> grouped 3x3 (G=32) -> 1x1, BatchNorm, residual."""

    def __init__(self, channels: int, width: int, groups: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + x)


class TinyResNeXt(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 32, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.layer1 = nn.Sequential(Bottleneck(channels, width), Bottleneck(channels, width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> depthwise 3x3 -> 1x1 project, residual."""

    def __init__(self, channels: int, expand: int = 6) -> None:
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.block(x)


class TinyMobileNet(nn.Module):
    """A depthwise-with-multiplier stem (8 -> 16, groups=8), then inverted residuals."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False),  # depthwise, multiplier 2
            nn.BatchNorm2d(16),
            nn.ReLU6(inplace=True),
        )
        self.blocks = nn.Sequential(InvertedResidual(16), InvertedResidual(16, expand=4))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm over channels, MLP, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        out = self.dwconv(x).permute(0, 2, 3, 1)
        out = self.pwconv2(self.act(self.pwconv1(self.norm(out))))
        return x + (self.gamma * out).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 10, dim: int = 24) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.stages = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((-2, -1)))


class SqueezeExcitation(nn.Module):
    """RegNetY's channel attention: global pool, two 1x1 convs, a sigmoid gate."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class RegNetBlock(nn.Module):
    """RegNetY bottleneck: 1x1 -> grouped 3x3 (fixed group width, maybe strided) -> SE -> 1x1,
    with a strided 1x1 projection on the residual when the shape changes."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.proj = None
        if stride != 1 or channels_in != channels_out:
            self.proj = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )
        groups = channels_out // group_width
        self.a = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
        )
        self.b = nn.Sequential(
            nn.Conv2d(
                channels_out, channels_out, 3, stride=stride, padding=1, groups=groups, bias=False
            ),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
        )
        self.se = SqueezeExcitation(channels_out, channels_in // 4)
        self.c = nn.Sequential(
            nn.Conv2d(channels_out, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.relu(shortcut + self.c(self.se(self.b(self.a(x)))))


class TinyRegNet(nn.Module):
    """A RegNetY stage (group width 8: 4 groups of 8 channels), the first block strided."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        self.stage = nn.Sequential(
            RegNetBlock(16, 32, stride=2, group_width=8),
            RegNetBlock(32, 32, stride=1, group_width=8),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.head(self.stage(self.stem(x)))
