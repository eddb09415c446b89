"""What DTensor parameters cost a step: the same parallel model with them and without.

Since parameters became DTensors (``clip_grad_norm_``, ``GradScaler`` and DCP see the
single-device model), every module of a parallelized model shadows its DTensor attributes
with their local tensors around ``forward``, gradients arrive as DTensors, and the optimizer
steps DTensors. This benchmark times that against the model as it computed before: the same
``build_parallel`` model with each DTensor parameter replaced by its local tensor (its rows)
and the shadowing hooks removed, which is exactly the plain local parameters of the layers
before the change. Both live in the same processes, over the same gloo group of ``P`` ranks
(one thread each), and are timed interleaved repetition by repetition in a rotating order
(median and quartiles of the slowest rank), so the ratio comes from one run.

Cases (``cases.py``): ``alexnet_step`` (the 2012 split, cross-entropy and SGD with
momentum: the optimizer steps DTensors) and ``resnext50_block`` (the stage-3 bottleneck under
``plan="auto"``, forward and backward), plus their batch-1 inference cases.

Writes ``OUT/dtensor_params.json`` and ``OUT/dtensor_params.md`` (``--out``; by default
``benchmarks/out/dtensor_params/``, which git ignores)::

    python benchmarks/dtensor_params.py            # P = 2, 20 repetitions
    python benchmarks/dtensor_params.py --quick    # tiny cases, 2 repetitions
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, QUICK, build_parallel, make_input, step_and_forward  # noqa: E402
from cases import labels as batch_labels  # noqa: E402
from harness import (  # noqa: E402
    HERE,
    max_over_ranks,
    ms_spread,
    prepare_out,
    publish,
    run_interleaved,
    summary,  # noqa: E402
)
from harness import barrier as world_barrier  # noqa: E402
from harness import parser as benchmark_parser  # noqa: E402

from mpgroups.layers.dtensor_state import LOCAL_FORWARD_HOOKS, own_rows  # noqa: E402

DEFAULT_OUT = HERE / "out" / "dtensor_params"
CASE_NAMES = ("alexnet_step", "resnext50_block", "alexnet_b1", "resnext50_block_b1")
WORLD = 2


def plain_parameters(model: nn.Module) -> nn.Module:
    """``model`` (parallelized) with every DTensor parameter and buffer replaced by the
    tensor its module computes on (a split one's rows), and the shadowing hooks removed:
    the layers' plain local parameters of before, in place."""
    for module in model.modules():
        whole_rows = getattr(module, "_mpgroups_whole_rows", {})
        for entries in (module._parameters, module._buffers):
            for name, value in list(entries.items()):
                if not isinstance(value, DTensor):
                    continue
                local = value.to_local().detach()
                if name in whole_rows:
                    local = own_rows(value, *whole_rows[name]).detach().clone()
                if isinstance(value, nn.Parameter):
                    local = nn.Parameter(local, requires_grad=value.requires_grad)
                entries[name] = local
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in LOCAL_FORWARD_HOOKS]:
                del hooks[key]
        module.__dict__.pop("_mpgroups_whole_rows", None)
    return model


def _closures(model: nn.Module, x: torch.Tensor, labels, inference: bool):
    """``(step, forward)``: the benchmark's step, and an eval forward returning the output."""
    step = step_and_forward(model, x, labels, inference)[0]

    def forward() -> torch.Tensor:
        training = model.training
        model.eval()
        with torch.no_grad():
            out = model(x)
        model.train(training)
        return out

    return step, forward


def _rank(rank: int, world: int, args) -> dict:
    cases = QUICK if args.quick else CASES
    times: dict[str, dict[str, list[float]]] = {}
    for name in CASE_NAMES:
        case = cases[name]
        x = make_input(case, case.batch)
        labels = batch_labels(case)
        steps, forwards = {}, {}
        for variant in ("dtensor", "plain"):
            model = build_parallel(case, torch.distributed.group.WORLD)
            if variant == "plain":
                plain_parameters(model)
            steps[variant], forwards[variant] = _closures(model, x, labels, case.inference)
        # The two compute the same numbers (else the comparison would be of two models).
        if not torch.equal(forwards["dtensor"](), forwards["plain"]()):
            raise RuntimeError(f"{name}: the two variants' outputs differ")
        times[name] = {variant: [] for variant in steps}
        order = list(steps)
        for rep in range(args.warmup + args.reps):
            for variant in order[rep % 2 :] + order[: rep % 2]:
                world_barrier(world)
                start = time.perf_counter()
                steps[variant]()
                elapsed = max_over_ranks(time.perf_counter() - start, world)
                if rep >= args.warmup:
                    times[name][variant].append(elapsed)
    return times


def table_lines(result: dict) -> list[str]:
    lines = [
        f"DTensor parameters against plain local ones, P = {result['world']} (gloo, one "
        f"thread per rank), {result['reps']} interleaved repetitions; `{result['command']}`",
        "",
        "| case | DTensor ms (p25–p75) | plain ms (p25–p75) | DTensor / plain |",
        "|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        d, p = row["dtensor"], row["plain"]
        lines.append(f"| {name} | {ms_spread(d)} | {ms_spread(p)} | {row['ratio']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="dtensor_params.json and dtensor_params.md",
        reps=20, timeout=1800, quick="tiny cases, 2 repetitions",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 2, 1
    prepare_out(args.out, ["dtensor_params.json", "dtensor_params.md"])
    times, head = run_interleaved(_rank, WORLD, args, argv, "dtensor_params")
    result = {**head, "times": times, "summary": {}}
    for name, variants in times.items():
        row = {variant: summary(values) for variant, values in variants.items()}
        row["ratio"] = row["dtensor"]["median"] / row["plain"]["median"]
        result["summary"][name] = row
    print(publish(args.out, "dtensor_params", result, table_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
