"""The same parallelized models under each value of one of mpgroups' environment switches,
side by side: what the input checks cost (``MPGROUPS_CHECKS``), what the backward's overlap
gives (``MPGROUPS_OVERLAP``).

Both switches are read at every call, so one model per case serves every value, timed
interleaved repetition by repetition in a rotating order (median of the slowest rank), over
one gloo group of ``P`` ranks with one thread each. ``MPGROUPS_CHECKS``:

* ``0``: no exchange;
* ``1`` (default): the model's root checks every forward, a layer only its first call with a
  new input signature (every later forward: one exchange, in flight while the model runs);
* ``detail``: every layer checks every call besides the root, as every forward of a
  parallelized model did before the default above (one exchange per communicating layer).

``MPGROUPS_OVERLAP``: ``1`` (default), a column-parallel layer's input-grad all-reduce runs
while its weight grads are computed; ``0``, after them (the composed path).

For each value it reports the step, the share of it spent inside the checks and inside the
data collectives (``CommCounter``: record, exchange and comparison for a check; for an
overlapped all-reduce the time not hidden; waits for the slower rank included), and the
check exchanges per step. Cases (``cases.py``): the batch-1 inference of AlexNet and of the
ResNeXt block, the AlexNet step and the block's step.

Writes ``OUT/switches.json`` and ``OUT/switches.md`` (``--out``; by default
``benchmarks/out/switches/``, which git ignores)::

    python benchmarks/switches.py                                  # MPGROUPS_CHECKS 0 1 detail
    python benchmarks/switches.py --switch MPGROUPS_OVERLAP --values 0 1 \
        --cases alexnet_step resnext50_block
    python benchmarks/switches.py --quick                          # tiny cases, 2 repetitions
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, QUICK, build_parallel, make_input, step_and_forward  # noqa: E402
from cases import labels as batch_labels  # noqa: E402
from harness import HERE, max_over_ranks, ms, prepare_out, publish, run_interleaved, summary  # noqa: E402
from harness import barrier as world_barrier  # noqa: E402
from harness import parser as benchmark_parser  # noqa: E402

import mpgroups  # noqa: E402

DEFAULT_OUT = HERE / "out" / "switches"
CASE_NAMES = ("alexnet_b1", "resnext50_block_b1", "alexnet_step", "resnext50_block")
WORLD = 2


def _rank(rank: int, world: int, args) -> dict:
    cases = QUICK if args.quick else CASES
    measured: dict[str, dict] = {}
    values = list(args.values)
    for name in args.cases:
        case = cases[name]
        model = build_parallel(case, torch.distributed.group.WORLD)
        step = step_and_forward(model, make_input(case, case.batch), batch_labels(case),
                                case.inference)[0]  # fmt: skip
        times = {value: [] for value in values}
        in_checks = {value: [] for value in values}
        in_data = {value: [] for value in values}
        exchanges = {}
        for rep in range(args.warmup + args.reps):
            shift = rep % len(values)
            for value in values[shift:] + values[:shift]:
                os.environ[args.switch] = value
                world_barrier(world)
                with mpgroups.CommCounter() as comm:
                    start = time.perf_counter()
                    step()
                    elapsed = time.perf_counter() - start
                if rep >= args.warmup:
                    times[value].append(max_over_ranks(elapsed, world))
                    checks = comm.seconds("input_check", kind="check") / elapsed
                    in_checks[value].append(max_over_ranks(checks, world))
                    in_data[value].append(max_over_ranks(comm.seconds() / elapsed, world))
                    exchanges[value] = comm.count("input_check", kind="check")
        del os.environ[args.switch]
        measured[name] = {
            "times": times, "in_checks": in_checks, "in_data": in_data, "exchanges": exchanges,
        }  # fmt: skip
    return measured


def table_lines(result: dict) -> list[str]:
    values, first = result["values"], result["values"][0]
    lines = [
        f"`{result['switch']}` = {', '.join(values)}, P = {result['world']} (gloo, one thread "
        f"per rank), {result['reps']} interleaved repetitions; `{result['command']}`",
        "",
        "| case | " + " | ".join(f"{v}: ms" for v in values) + " | "
        + " | ".join(f"{v} / {first}" for v in values[1:]) + " | "
        + " | ".join(f"{v}: in checks / in data collectives" for v in values)
        + " | check exchanges per step |",
        "|---|" + "---|" * (3 * len(values)),
    ]  # fmt: skip
    for name, row in result["summary"].items():
        t = {value: row[value]["median"] for value in values}
        lines.append(
            f"| {name} | " + " | ".join(ms(t[v]) for v in values) + " | "
            + " | ".join(f"{t[v] / t[first]:.3f}" for v in values[1:]) + " | "
            + " | ".join(f"{row['in_checks'][v]:.2%} / {row['in_data'][v]:.2%}" for v in values)
            + " | " + " / ".join(str(row["exchanges"][v]) for v in values) + " |"
        )  # fmt: skip
    lines += [
        "",
        "Times: median of the slowest rank. *In checks*, *in data collectives*: the median "
        "share of the step spent inside them (waits for the slower rank included; for an "
        "overlapped all-reduce, the time it was not hidden), slowest rank.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="switches.json and switches.md",
        reps=30, timeout=1800, quick="tiny cases, 2 repetitions",
    )  # fmt: skip
    parser.add_argument("--switch", default="MPGROUPS_CHECKS",
                        choices=("MPGROUPS_CHECKS", "MPGROUPS_OVERLAP"))  # fmt: skip
    parser.add_argument("--values", nargs="+", default=None,
                        help="the switch's values, the first the reference (default: "
                        "0 1 detail for the checks, 0 1 for the overlap)")  # fmt: skip
    parser.add_argument("--cases", nargs="+", default=list(CASE_NAMES), choices=CASE_NAMES)
    args = parser.parse_args(argv)
    if args.values is None:
        args.values = ["0", "1", "detail"] if args.switch == "MPGROUPS_CHECKS" else ["0", "1"]
    if args.quick:
        args.reps, args.warmup = 2, 1
    prepare_out(args.out, ["switches.json", "switches.md"])
    measured, head = run_interleaved(_rank, WORLD, args, argv, "switches")
    result = {
        **head, "switch": args.switch, "values": args.values, "measured": measured,
        "summary": {},
    }  # fmt: skip
    for name, case in measured.items():
        row = {value: summary(values) for value, values in case["times"].items()}
        row["in_checks"] = {v: summary(t)["median"] for v, t in case["in_checks"].items()}
        row["in_data"] = {v: summary(t)["median"] for v, t in case["in_data"].items()}
        row["exchanges"] = case["exchanges"]
        result["summary"][name] = row
    print(publish(args.out, "switches", result, table_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
