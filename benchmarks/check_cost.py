"""What the input checks cost a parallelized model: checks off, at their default, and in
detail, side by side.

``MPGROUPS_CHECKS`` is read at every call, so one model per case serves all three settings,
timed interleaved repetition by repetition in a rotating order (median and quartiles of the
slowest rank), over one gloo group of ``P`` ranks with one thread each:

* ``off`` (``MPGROUPS_CHECKS=0``): no exchange;
* ``default`` (``1``): the model's root checks every forward, a layer only its first call with
  a new input signature (every later forward: one exchange);
* ``detail``: every layer checks every call besides the root, as every forward of a
  parallelized model did before the default above (one exchange per communicating layer).

For each it reports the step and the share of it spent inside the checks (``CommCounter``'s
``"check"`` records: record, exchange and comparison, waits for the slower rank included),
and the check exchanges per step. Cases (``cases.py``): the batch-1 inference of AlexNet and
of the ResNeXt block (where a check weighs most), the AlexNet step and the block's step.

Writes ``OUT/check_cost.json`` and ``OUT/check_cost.md`` (``--out``; by default
``benchmarks/out/check_cost/``, which git ignores)::

    python benchmarks/check_cost.py            # P = 2, 30 repetitions
    python benchmarks/check_cost.py --quick    # tiny cases, 2 repetitions
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
from harness import HERE, max_over_ranks, ms, prepare_out, publish, run_header, run_ranks, summary  # noqa: E402
from harness import barrier as world_barrier  # noqa: E402
from harness import parser as benchmark_parser  # noqa: E402

import mpgroups  # noqa: E402

DEFAULT_OUT = HERE / "out" / "check_cost"
CASE_NAMES = ("alexnet_b1", "resnext50_block_b1", "alexnet_step", "resnext50_block")
SETTINGS = {"off": "0", "default": "1", "detail": "detail"}
WORLD = 2


def _rank(rank: int, world: int, args) -> dict:
    cases = QUICK if args.quick else CASES
    measured: dict[str, dict] = {}
    for name in CASE_NAMES:
        case = cases[name]
        model = build_parallel(case, torch.distributed.group.WORLD)
        step = step_and_forward(model, make_input(case, case.batch), batch_labels(case),
                                case.inference)[0]  # fmt: skip
        times = {setting: [] for setting in SETTINGS}
        shares = {setting: [] for setting in SETTINGS}
        exchanges = {}
        order = list(SETTINGS)
        for rep in range(args.warmup + args.reps):
            for setting in order[rep % 3 :] + order[: rep % 3]:
                os.environ["MPGROUPS_CHECKS"] = SETTINGS[setting]
                world_barrier(world)
                with mpgroups.CommCounter() as comm:
                    start = time.perf_counter()
                    step()
                    elapsed = time.perf_counter() - start
                if rep >= args.warmup:
                    times[setting].append(max_over_ranks(elapsed, world))
                    share = comm.seconds("input_check", kind="check") / elapsed
                    shares[setting].append(max_over_ranks(share, world))
                    exchanges[setting] = comm.count("input_check", kind="check")
        del os.environ["MPGROUPS_CHECKS"]
        measured[name] = {"times": times, "shares": shares, "exchanges": exchanges}
    return measured


def table_lines(result: dict) -> list[str]:
    lines = [
        f"Input checks off, at their default and in detail, P = {result['world']} (gloo, one "
        f"thread per rank), {result['reps']} interleaved repetitions; `{result['command']}`",
        "",
        "| case | off ms | default ms | detail ms | default / off | detail / off "
        "| in checks: default | in checks: detail | exchanges per step: default / detail |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        t = {setting: row[setting]["median"] for setting in SETTINGS}
        lines.append(
            f"| {name} | {ms(t['off'])} | {ms(t['default'])} | {ms(t['detail'])} | "
            f"{t['default'] / t['off']:.3f} | {t['detail'] / t['off']:.3f} | "
            f"{row['share']['default']:.2%} | {row['share']['detail']:.2%} | "
            f"{row['exchanges']['default']} / {row['exchanges']['detail']} |"
        )
    lines += [
        "",
        "Times: median of the slowest rank. *In checks*: the median share of the step spent "
        "inside the checks (record, exchange, comparison; waits for the slower rank "
        "included), slowest rank.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="check_cost.json and check_cost.md",
        reps=30, timeout=1800, quick="tiny cases, 2 repetitions",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 2, 1
    prepare_out(args.out, ["check_cost.json", "check_cost.md"])
    loadavg_before = os.getloadavg()
    measured = run_ranks(_rank, WORLD, args, timeout=args.timeout, what="check_cost")
    result = {
        **run_header(argv, os.cpu_count()),
        "world": WORLD,
        "quick": args.quick,
        "reps": args.reps,
        "warmup": args.warmup,
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "measured": measured,
        "summary": {},
    }
    for name, case in measured.items():
        row = {setting: summary(values) for setting, values in case["times"].items()}
        row["share"] = {s: summary(v)["median"] for s, v in case["shares"].items()}
        row["exchanges"] = case["exchanges"]
        result["summary"][name] = row
    print(publish(args.out, "check_cost", result, table_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
