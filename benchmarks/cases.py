"""The benchmark cases: grouped-conv layers and blocks from real networks, whole models.

A case is one of:

* a chain of convolutions with their layouts (``convs``): its single-device model is the chain
  of ``nn.Conv2d``, its group-parallel model the same chain built with ``from_conv``;
* ``mpgroups.models.AlexNet`` (``alexnet``: its keyword arguments), a training step with
  cross-entropy and SGD; group-parallel split as in 2012 (towers and classifier), variant
  ``group_parallel_towers`` with ``split_classifier=False`` (classifier replicated);
* a ResNeXt bottleneck block (``block``: :class:`Bottleneck`'s arguments), group-parallel by
  ``parallelize(block, plan="auto")`` (conv1 column → conv2 grouped → conv3 row), variant
  ``group_parallel_dropin`` by ``parallelize(block)`` (only the grouped conv, replicated →
  replicated: the per-layer drop-in).

With ``inference`` a case times a forward in eval mode under ``torch.no_grad`` (batch-1
latency) instead of a training step. Every model is seeded: the single-device, data-parallel
and group-parallel models hold identical weights. Built over a process group that moves no
data (``loopback``), the group-parallel model is a rank's local work without communication:
what the projection takes as the compute of a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from comm_model import Collective, layer_collectives, model_collectives, spatial_out
from torch import nn

import mpgroups
from mpgroups.layers.conv import GroupParallelConv2d
from mpgroups.plans.styles import ChannelLocal, ParallelLayer

R, S = "replicated", "sharded"
MAIN = "group_parallel"  # the variant every case has: the projection, the targets


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
    alexnet: dict | None = None  # AlexNet keyword arguments for a whole-model case
    block: dict | None = None  # Bottleneck keyword arguments for a block case
    inference: bool = False  # time an eval forward under no_grad (latency), not a step
    variants: tuple[str, ...] = ()  # group-parallel variants besides MAIN (see VARIANTS)

    @property
    def input_channels(self) -> int:
        if self.convs:
            return self.convs[0].cin
        if self.block is not None:
            return self.block["inplanes"]
        return self.alexnet.get("in_channels", 3)

    @property
    def is_step(self) -> bool:
        """A training step with labels, cross-entropy and SGD (AlexNet)."""
        return self.alexnet is not None and not self.inference

    @property
    def gp_variants(self) -> tuple[str, ...]:
        return (MAIN, *self.variants)


VARIANTS = {
    MAIN: "the case's plan",
    "group_parallel_towers": "AlexNet towers only (split_classifier=False: classifier replicated, "
    "all-gather after pool5)",
    "group_parallel_dropin": "per-layer drop-in: only the grouped conv parallel, replicated → "
    "replicated",
}


class Bottleneck(nn.Module):
    """torchvision's ResNeXt ``Bottleneck`` as its source writes it (module names, one
    ``self.relu`` called three times, ``out += identity``), without a downsample
    (``inplanes == planes * 4``): ``width = planes · base_width / 64 · groups``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, groups: int = 32, base_width: int = 4) -> None:
        super().__init__()
        if inplanes != planes * self.expansion:
            raise ValueError("a block without downsample needs inplanes == planes * 4")
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


# torchvision resnext50_32x4d, layer3 (stage 3), a block after the first: 1024 → 512 (1x1),
# 512 → 512 (3x3, G=32), 512 → 1024 (1x1), 14x14 at a 224x224 input.
RESNEXT50_STAGE3 = {"inplanes": 1024, "planes": 256, "groups": 32, "base_width": 4}
ALEXNET_STEP = {"num_classes": 100, "in_channels": 3}

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
        "alexnet_step", "mpgroups.models.AlexNet training step (SGD), 127x127, 100 classes, "
        "split as in 2012 (towers + classifier)", 32, 127,
        alexnet=ALEXNET_STEP, variants=("group_parallel_towers",),
    ),
    "resnext50_block": Case(
        "resnext50_block", "ResNeXt-50 32x4d stage-3 bottleneck 1024→512→512 (G=32)→1024, "
        "14x14, forward + backward, planned column → grouped → row (plan='auto')", 8, 14,
        block=RESNEXT50_STAGE3, variants=("group_parallel_dropin",),
    ),
    "alexnet_b1": Case(
        "alexnet_b1", "AlexNet inference, batch 1, 224x224, 1000 classes (eval, no_grad), "
        "split as in 2012", 1, 224,
        alexnet={"num_classes": 1000, "in_channels": 3}, inference=True,
    ),
    "resnext50_block_b1": Case(
        "resnext50_block_b1", "ResNeXt-50 stage-3 bottleneck inference, batch 1, 14x14 (eval, "
        "no_grad), plan='auto'", 1, 14,
        block=RESNEXT50_STAGE3, inference=True,
    ),
}  # fmt: skip

_TINY_ALEXNET = {"in_channels": 3, "channels": (16, 32, 48, 48, 32), "hidden": 64}
_TINY_BLOCK = {"inplanes": 64, "planes": 16, "groups": 8, "base_width": 16}

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
        alexnet={"num_classes": 10, **_TINY_ALEXNET}, variants=("group_parallel_towers",),
    ),
    "resnext50_block": Case(
        "resnext50_block", "bottleneck 64→32→32 (G=8)→64 (tiny)", 4, 8,
        block=_TINY_BLOCK, variants=("group_parallel_dropin",),
    ),
    "alexnet_b1": Case(
        "alexnet_b1", "AlexNet inference, batch 1 (tiny)", 1, 32,
        alexnet={"num_classes": 10, **_TINY_ALEXNET}, inference=True,
    ),
    "resnext50_block_b1": Case(
        "resnext50_block_b1", "bottleneck inference, batch 1 (tiny)", 1, 8,
        block=_TINY_BLOCK, inference=True,
    ),
}  # fmt: skip


def build_single(case: Case) -> nn.Module:
    """The single-device model (seeded: every rank builds the same weights); in eval mode
    for an inference case."""
    torch.manual_seed(0)
    if case.alexnet is not None:
        from mpgroups.models import AlexNet

        model = AlexNet(parallel=False, **case.alexnet)
    elif case.block is not None:
        model = Bottleneck(**case.block)
    else:
        model = nn.Sequential(
            *(
                nn.Conv2d(c.cin, c.cout, c.kernel, padding=c.padding, groups=c.groups)
                for c in case.convs
            )
        )
    return model.train(not case.inference)


def block_plan(case: Case, variant: str, world_size: int) -> dict:
    """The plan of a block case's ``variant`` at ``world_size`` ranks: ``auto_plan``'s for
    MAIN (checked to be column → grouped → row, so that a planner that falls back is not
    measured as the planned block), ``{}`` (the drop-in) for ``group_parallel_dropin``."""
    if variant == "group_parallel_dropin":
        return {}
    if variant != MAIN:
        raise ValueError(f"{case.name} has no variant {variant!r}")
    with torch.device("meta"):
        model = Bottleneck(**case.block)
    plan = mpgroups.auto_plan(model, world_size=world_size)
    groups = case.block["groups"]
    shard_groups = None if groups == 1 else groups
    expected = {
        "conv1": ParallelLayer(output_layout=S, shard_groups=shard_groups),
        "conv2": ParallelLayer(S, S),
        "conv3": ParallelLayer(S, R, split="rowwise", shard_groups=shard_groups),
    }
    found = {name: plan.get(name) for name in expected}
    locals_ = all(isinstance(plan.get(n), ChannelLocal) for n in ("bn1", "bn2"))
    if world_size > 1 and (found != expected or not locals_):
        raise RuntimeError(
            f"auto_plan does not pair column → grouped → row in the bottleneck at "
            f"{world_size} ranks: {plan}"
        )
    return plan


def build_parallel(case: Case, process_group, variant: str = MAIN) -> nn.Module:
    """The group-parallel model (``variant`` of :data:`VARIANTS`) with the single-device
    model's weights."""
    if variant not in case.gp_variants:
        raise ValueError(f"{case.name} has no variant {variant!r}; it has {case.gp_variants}")
    if case.alexnet is not None:
        from mpgroups.models import AlexNet

        torch.manual_seed(0)
        split = variant != "group_parallel_towers"
        model = AlexNet(process_group=process_group, split_classifier=split, **case.alexnet)
        return model.train(not case.inference)
    if case.block is not None:
        world = 1 if process_group is None else process_group.size()
        plan = block_plan(case, variant, world)
        return mpgroups.parallelize(build_single(case), process_group, plan=plan)
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


def analytic_collectives(
    case: Case, world_size: int, rank: int, variant: str = MAIN
) -> list[Collective]:
    """The data collectives docs/design.md §3 and §3b prescribe for one step (an inference case: one
    forward) of ``case``'s ``variant`` on ``rank``.

    A block's input requires grad (as inside a network), AlexNet's (an image) does not.
    Whole models follow their plan (:func:`comm_model.model_collectives`), placed by
    ``mpgroups.sharding.layout.layer_shards``: the single source of truth the layers use.
    """
    if case.alexnet is not None or case.block is not None:
        return _model_collectives(case, world_size, rank, variant)
    out, size = [], case.size
    for i, c in enumerate(case.convs):
        next_size = spatial_out(size, c.kernel, 1, c.padding)
        out += layer_collectives(
            c.cin, c.cout, c.groups, world_size, rank, c.layouts, case.batch,
            size * size, next_size * next_size, 4, layer=str(i),
        )  # fmt: skip
        size = next_size
    return out


def _model_collectives(case: Case, world: int, rank: int, variant: str) -> list[Collective]:
    if variant not in case.gp_variants:
        raise ValueError(f"{case.name} has no variant {variant!r}; it has {case.gp_variants}")
    shape = (case.batch, case.input_channels, case.size, case.size)
    with torch.device("meta"):
        if case.alexnet is not None:
            from mpgroups.models import AlexNet

            model = AlexNet(parallel=False, **case.alexnet)
            plan = AlexNet.parallel_plan(
                case.alexnet.get("batch_norm", False),
                split_classifier=variant != "group_parallel_towers",
            )
        else:
            model = Bottleneck(**case.block)
    if case.block is not None:
        plan = block_plan(case, variant, world) if world > 1 else {}
    return model_collectives(
        model, plan, shape, world, rank, training=not case.inference,
        input_requires_grad=case.block is not None,
    )  # fmt: skip


def labels(case: Case) -> torch.Tensor | None:
    """The class labels of a training step's batch (seeded), or ``None`` for a block."""
    if not case.is_step:
        return None
    torch.manual_seed(2)
    return torch.randint(0, case.alexnet["num_classes"], (case.batch,))


def step_and_forward(
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    inference: bool = False,
):
    """``(step, forward)`` closures over ``model`` and its input.

    A block case's step is forward + backward of ``out.pow(2).mean()`` with the input grad
    (as inside a network); with ``labels`` (the AlexNet step) it is cross-entropy, backward
    and an SGD step. ``step(keep_grads=True)`` leaves the gradients for an optimizer. With
    ``inference`` both are the forward under ``torch.no_grad`` (the model in eval mode).
    """
    if inference:

        def forward_only(keep_grads: bool = False):
            with torch.no_grad():
                model(x)

        return forward_only, forward_only
    is_step = labels is not None
    x = x.detach().requires_grad_(not is_step)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if is_step else None

    def step(keep_grads: bool = False):
        out = model(x)
        loss = F.cross_entropy(out, labels) if is_step else out.float().pow(2).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        if not keep_grads:
            model.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad():
            model(x)

    return step, forward
