"""The benchmark cases: grouped-conv blocks from real networks, and a whole AlexNet step.

A block case is a chain of convolutions with their layouts; its single-device model is the
chain of ``nn.Conv2d``, its group-parallel model the same chain built with ``from_conv``
(identical weights), its data-parallel model DDP around the single-device chain. Built over
a process group that moves no data (``loopback``), the group-parallel model is a rank's local
work without communication: what the projection takes as the compute of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from comm_model import Collective, layer_collectives, spatial_out
from torch import nn

from mpgroups.conv import GroupParallelConv2d
from mpgroups.placement import shard_slice

R, S = "replicated", "sharded"


@dataclass(frozen=True)
class Conv:
    cin: int
    cout: int
    kernel: int
    padding: int
    groups: int
    layouts: tuple[str, str] = (R, R)


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    batch: int
    size: int
    convs: tuple[Conv, ...] = field(default_factory=tuple)
    alexnet: dict | None = None  # AlexNet keyword arguments for the whole-step case

    @property
    def input_channels(self) -> int:
        return self.convs[0].cin if self.convs else self.alexnet.get("in_channels", 3)


CASES = {
    "alexnet_conv2": Case(
        "alexnet_conv2", "AlexNet conv2: 96→256, 5x5, G=2, 27x27, drop-in", 32, 27,
        (Conv(96, 256, 5, 2, 2),),
    ),
    "alexnet_conv4": Case(
        "alexnet_conv4", "AlexNet conv4: 384→384, 3x3, G=2, 13x13, drop-in", 32, 13,
        (Conv(384, 384, 3, 1, 2),),
    ),
    "alexnet_conv5": Case(
        "alexnet_conv5", "AlexNet conv5: 384→256, 3x3, G=2, 13x13, drop-in", 32, 13,
        (Conv(384, 256, 3, 1, 2),),
    ),
    "alexnet_towers": Case(
        "alexnet_towers", "AlexNet towers conv4→conv5 kept sharded, 13x13", 64, 13,
        (Conv(384, 384, 3, 1, 2, (S, S)), Conv(384, 256, 3, 1, 2, (S, S))),
    ),
    "resnext50_stage3": Case(
        "resnext50_stage3", "ResNeXt-50 32x4d stage 3: 512→512, 3x3, G=32, 14x14, drop-in", 32, 14,
        (Conv(512, 512, 3, 1, 32),),
    ),
    "depthwise": Case(
        "depthwise", "Depthwise 3x3, 384 channels (G=384), 14x14, drop-in", 32, 14,
        (Conv(384, 384, 3, 1, 384),),
    ),
    "alexnet_step": Case(
        "alexnet_step", "mpgroups.models.AlexNet training step (SGD), 127x127, 100 classes",
        32, 127,
        alexnet={"num_classes": 100, "in_channels": 3},
    ),
}  # fmt: skip

QUICK = {
    "alexnet_towers": Case(
        "alexnet_towers", "towers (tiny)", 4, 9,
        (Conv(16, 16, 3, 1, 2, (S, S)), Conv(16, 8, 3, 1, 2, (S, S))),
    ),
    "resnext50_stage3": Case(
        "resnext50_stage3", "G=8 drop-in (tiny)", 4, 8, (Conv(32, 32, 3, 1, 8),)
    ),
    "alexnet_step": Case(
        "alexnet_step", "AlexNet step (tiny)", 4, 32,
        alexnet={"num_classes": 10, "in_channels": 3, "channels": (16, 32, 48, 48, 32),
                 "hidden": 64},
    ),
}  # fmt: skip


def build_single(case: Case) -> nn.Module:
    """The single-device model (seeded: every rank builds the same weights)."""
    torch.manual_seed(0)
    if case.alexnet is not None:
        from mpgroups.models import AlexNet

        return AlexNet(parallel=False, **case.alexnet)
    return nn.Sequential(
        *(
            nn.Conv2d(c.cin, c.cout, c.kernel, padding=c.padding, groups=c.groups)
            for c in case.convs
        )
    )


def build_parallel(case: Case, process_group) -> nn.Module:
    """The group-parallel model with the single-device model's weights."""
    if case.alexnet is not None:
        from mpgroups.models import AlexNet

        torch.manual_seed(0)
        return AlexNet(process_group=process_group, **case.alexnet)
    single = build_single(case)
    return nn.Sequential(
        *(
            GroupParallelConv2d.from_conv(
                conv, process_group, input_layout=c.layouts[0], output_layout=c.layouts[1]
            )
            for conv, c in zip(single, case.convs, strict=True)
        )
    )


def make_input(case: Case, batch: int, model: nn.Module | None = None) -> torch.Tensor:
    """``[batch, C, size, size]``; the rank's channel shard when the group-parallel ``model``
    is given and its first layer takes a sharded input."""
    torch.manual_seed(1)
    x = torch.randn(batch, case.input_channels, case.size, case.size)
    if model is not None and case.convs and case.convs[0].layouts[0] == S:
        start, stop = model[0].input_shard
        x = x[:, start:stop].contiguous()
    return x


def analytic_collectives(case: Case, world_size: int, rank: int) -> list[Collective]:
    """The data collectives DESIGN §3 prescribes for one step of ``case`` on ``rank``."""
    if case.alexnet is not None:
        return _alexnet_collectives(case, world_size, rank)
    out, size = [], case.size
    for c in case.convs:
        next_size = spatial_out(size, c.kernel, 1, c.padding)
        out += layer_collectives(
            c.cin, c.cout, c.groups, world_size, rank, c.layouts, case.batch,
            size * size, next_size * next_size, 4,
        )  # fmt: skip
        size = next_size
    return out


def _alexnet_collectives(case: Case, world: int, rank: int) -> list[Collective]:
    """AlexNet's data collectives per step, from its tower plan and its geometry."""
    a = {"channels": (96, 256, 384, 384, 256), **case.alexnet}
    c1, c2, c3, c4, c5 = a["channels"]
    n, s = case.batch, case.size
    s1 = spatial_out(s, 11, 4, 2)
    p1 = spatial_out(s1, 3, 2, 0)
    p2 = spatial_out(p1, 3, 2, 0)
    sharded = (S, S)
    out = layer_collectives(
        a["in_channels"], c1, 1, world, rank, (R, S), n, s * s, s1 * s1, 4,
        input_requires_grad=False,
    )  # fmt: skip
    out += layer_collectives(c1, c2, 2, world, rank, sharded, n, p1 * p1, p1 * p1, 4)
    for cin, cout, groups in ((c2, c3, 1), (c3, c4, 2), (c4, c5, 2)):
        out += layer_collectives(cin, cout, groups, world, rank, sharded, n, p2 * p2, p2 * p2, 4)
    if world > 1:
        widths = [b - a for a, b in (shard_slice(c5, 2, world, r) for r in range(world))]
        out.append(Collective("all_gather", world, world * max(widths) * 36 * n * 4, "forward"))
    return out
