"""A whole network's training step: torchvision's ResNeXt-50 split over ``P`` ranks by each
``auto_plan`` objective, beside the same model in one process.

Cases: ``resnext50_32x4d`` (1000 classes), batch 8, 128×128, cross-entropy, SGD with
momentum. Variants, timed interleaved repetition by repetition in a rotating order, over one
gloo group of ``P`` ranks with one thread each:

* ``one process``: the plain model on rank 0, the other ranks waiting at a barrier (one
  process with one rank's threads);
* ``collectives``: ``parallelize(model, group, plan=auto_plan(model, group))`` (the
  default objective: one all-reduce per block forward and one backward; the stem, downsample
  convs, classifier and everything between blocks replicated);
* ``memory``: ``auto_plan(..., objective="memory")`` (every dense layer split, what lies
  between blocks sharded: reduce-scatters forward, all-gathers backward).

For each it reports the step (median of the slowest rank), the speed-up over one process, the
share of the step inside data collectives (``CommCounter``, waits included), the data
collectives per step and the MiB they move per rank, the parameters each rank holds as a
share of the model's, and the bytes a training forward saves for backward per rank against
one process (``saved_tensors_hooks``, counted as ``activation_memory.py`` counts them). The
model's code is torchvision's (``torchvision.models`` when it is installed, else the faithful
copy the tests use, ``tests/tv_models.py``); every variant holds the same weights, and the
parallel models are checked against the plain one first.

Writes ``OUT/whole_model.json`` and ``OUT/whole_model.md`` (``--out``; by default
``benchmarks/out/whole_model/``, which git ignores)::

    python benchmarks/whole_model.py                 # about 3 minutes at --reps 15
    python benchmarks/whole_model.py --quick         # four blocks, batch 2, 32×32, 2 repetitions
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_memory import saved_bytes  # noqa: E402
from harness import (  # noqa: E402
    HERE,
    max_over_ranks,
    mib,
    ms_spread,
    prepare_out,
    publish,
    run_interleaved,
    summary,  # noqa: E402
)
from harness import barrier as world_barrier  # noqa: E402
from harness import parser as benchmark_parser  # noqa: E402

import mpgroups  # noqa: E402
from mpgroups.layers.dtensor_state import local_tensor  # noqa: E402

DEFAULT_OUT = HERE / "out" / "whole_model"
ONE = "one process"
OBJECTIVES = ("collectives", "memory")
WORLD = 2


def _resnext(quick: bool) -> torch.nn.Module:
    """torchvision's ResNeXt-50 32x4d; with ``quick`` its classes with one block per stage,
    8 groups of 4 channels (four blocks, each with a downsample conv) and 10 classes."""
    try:
        from torchvision.models import resnet as models
    except ImportError:
        sys.path.insert(0, str(HERE.parent / "tests"))
        import tv_models as models
    if quick:
        return models.ResNet(models.Bottleneck, [1, 1, 1, 1], 10, groups=8, width_per_group=4)
    return models.resnext50_32x4d()


def _step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def _rank(rank: int, world: int, args) -> dict:
    group = dist.group.WORLD
    batch, size = (2, 32) if args.quick else (8, 128)
    torch.manual_seed(0)
    plain = _resnext(args.quick)
    total = sum(p.numel() for p in plain.parameters())
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, plain.fc.out_features, (batch,))
    with torch.no_grad():
        expected = plain.eval()(x)
    plain.train()
    one_activations = saved_bytes(plain, x, labels)["activations"]
    plain.zero_grad(set_to_none=True)
    steps, facts = {}, {}
    for objective in OBJECTIVES:
        torch.manual_seed(0)
        model = _resnext(args.quick)
        plan = mpgroups.auto_plan(model, group, objective=objective)
        mpgroups.parallelize(model, group, plan=plan)
        with torch.no_grad():
            error = (model.eval()(x) - expected).abs().max().item()
        if error > 1e-3:
            raise RuntimeError(f"the {objective} model leaves the plain one by {error:.3g}")
        model.train()
        activations = saved_bytes(model, x, labels)["activations"] / one_activations
        model.zero_grad(set_to_none=True)
        steps[objective] = _step(model, x, labels)
        with mpgroups.CommCounter() as comm:
            steps[objective]()
        facts[objective] = {
            "params_share": max_over_ranks(
                sum(local_tensor(p).numel() for p in model.parameters()) / total, world
            ),
            "activations_share": max_over_ranks(activations, world),
            "collectives": comm.count(),
            "mib": comm.bytes() / 2**20,
            "ops": dict(comm.ops()),
        }
    if rank == 0:
        steps[ONE] = _step(plain, x, labels)
    variants = [ONE, *OBJECTIVES]
    times = {v: [] for v in variants}
    in_data = {v: [] for v in OBJECTIVES}
    for rep in range(args.warmup + args.reps):
        shift = rep % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            world_barrier(world)
            with mpgroups.CommCounter() as comm:
                start = time.perf_counter()
                if variant != ONE or rank == 0:
                    steps[variant]()
                elapsed = time.perf_counter() - start
            world_barrier(world)
            if rep < args.warmup:
                continue
            times[variant].append(max_over_ranks(elapsed, world))
            if variant != ONE:
                in_data[variant].append(max_over_ranks(comm.seconds() / elapsed, world))
    return {"times": times, "in_data": in_data, "facts": facts, "batch": batch, "size": size}


def table_lines(result: dict) -> list[str]:
    rows = result["summary"]
    one = rows[ONE]["median"]
    lines = [
        f"torchvision's ResNeXt-50 32x4d, batch {result['batch']}, {result['size']}×"
        f"{result['size']}, SGD step, P = {result['world']} (gloo, one thread per rank), "
        f"{result['reps']} interleaved repetitions; `{result['command']}`",
        "",
        "| variant | step ms (p25–p75) | vs one process | in data collectives | data "
        "collectives per step | MiB moved per rank | params per rank | activations per rank |",
        "|---|---|---|---|---|---|---|---|",
        f"| {ONE} | {ms_spread(rows[ONE])} | 1.00× | – | – | – | 1.000 | 1.000 |",
    ]
    for objective in OBJECTIVES:
        row, facts = rows[objective], result["facts"][objective]
        lines.append(
            f'| `objective="{objective}"` | {ms_spread(row)} | {one / row["median"]:.2f}× | '
            f"{row['in_data']:.1%} | "
            f"{facts['collectives']} | {mib(facts['mib'] * 2**20)} | {facts['params_share']:.3f} | "
            f"{facts['activations_share']:.3f} |"
        )
    lines += [
        "",
        "Times: median of the slowest rank (one process: rank 0, the others idle). *In data "
        "collectives*: the median share of the step inside them, waits for the slower rank "
        "included. *Params per rank*: the largest rank's share of the model's parameters; "
        "*activations per rank*: of the bytes a training forward saves for backward "
        "(`activation_memory.saved_bytes`), the largest rank's against one process.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="whole_model.json and whole_model.md",
        reps=15, timeout=1800, quick="one block per stage, 8 groups, batch 2, 32×32, 2 repetitions",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 2, 1
    prepare_out(args.out, ["whole_model.json", "whole_model.md"])
    measured, head = run_interleaved(_rank, WORLD, args, argv, "whole_model")
    result = {**head, **{k: measured[k] for k in ("batch", "size", "facts")}, "summary": {}}
    result["measured"] = {"times": measured["times"], "in_data": measured["in_data"]}
    for variant, times in measured["times"].items():
        result["summary"][variant] = summary(times)
        if variant in measured["in_data"]:
            result["summary"][variant]["in_data"] = summary(measured["in_data"][variant])["median"]
    print(publish(args.out, "whole_model", result, table_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
