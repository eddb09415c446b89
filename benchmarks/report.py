"""Markdown table and plots from ``scaling.json`` (see ``scaling.py``).

``scaling.py`` calls this at the end of a run. To render a stored run again (after a change
to the projection or the table, say), from the repository root::

    python benchmarks/report.py benchmarks/results/scaling.json --out /tmp/render

The JSON is only read: the projection is computed again in memory, and ``table.md``,
``scaling.png`` and ``comm_share.png`` go to ``--out`` (by default ``benchmarks/out/``,
which git ignores).

A run of format 2 (``scaling.json``'s ``"format"``) also gets rows for the other
group-parallel variants of a case (``alexnet_step [towers]``, ``resnext50_block [dropin]``),
the share of each step in collectives per op, the issue's targets and the projection to
NVLink 4 with its efficiency; older runs render as they did.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import HERE, mib, ms, ms_spread, prepare_out  # noqa: E402

DEFAULT_OUT = HERE / "out"  # ignored by git
MAIN = "group_parallel"
PROJECTION_LINK = "nvlink4"
PROJECTION_WORLD_SIZES = (2, 4, 8)


def _repetitions(result: dict) -> str:
    if not result["min_time"]:
        return f"{result['reps']} timed repetitions"
    forward = result.get("forward_min_time", result["min_time"])
    phases = "" if forward == result["min_time"] else f"; a training case's forward: {forward:g} s"
    return (
        f"{result['reps']} to {result['max_reps']} timed repetitions (enough for the slowest "
        f"variant of a case to run {result['min_time']:g} s in all{phases})"
    )


def _commit_line(result: dict) -> list[str]:
    """``Commit: sha`` (and whether the code differed from it), for a run that recorded it."""
    commit = result.get("commit")
    if commit is None:
        return []
    changed = " with uncommitted changes" if commit["uncommitted_changes"] else ""
    return [f"Commit: {commit['sha'][:12]}{changed}  "]


def _busbw(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "busbw not resolved (the larger messages were not slower)"
    return f"busbw = {bytes_per_s / 1e9:.2f} GB/s"


def write_table(result: dict, path: Path) -> str:
    """The per-case table (times are medians over interleaved repetitions)."""
    lines = [
        f"Command: `{result['command']}`  ",
        *_commit_line(result),
        f"Machine: {result['machine']['cores']} cores, {result['machine']['platform']}, "
        f"torch {result['machine']['torch']}; {_repetitions(result)} after "
        f"{result['warmup']} warm-up, variants interleaved.",
        "",
        "Step = forward + backward (input grad included; AlexNet: + SGD step). Speedups are "
        "ratios of medians from the same run. `1p×t`: one process with one rank's threads; "
        "`1p×P·t`: one process with all ranks' threads. Bytes per step per rank, "
        "CommCounter's convention (nccl-tests size).",
        "",
        "| case | P | thr/rank | GP fwd ms | GP step ms (p25–p75) | 1p×t step ms | GP vs 1p×t "
        "| GP vs 1p×P·t | DDP step ms | GP vs DDP | bytes measured | bytes analytic "
        "| comm share | params+opt MiB GP | DDP | GP/DDP |",
        "|" + "---|" * 16,
    ]
    worlds = sorted(result["runs"], key=int)
    names = list(result["runs"][worlds[0]]["cases"])
    for name in names:
        for variant in _gp_variants(result, name):
            for world in worlds:
                lines.append(_row(result, name, world, variant))
    lines.append("")
    lines.append("`*`: ranks × threads exceed the cores, so ranks share cores.")
    lines += _variant_notes(result, names)
    checks = []
    for world in worlds:
        for name in names:
            data = result["runs"][world]["cases"][name]
            if "group_parallel_nochecks" in data["times"]:
                checks.append((world, data))
    if checks:
        lines += [
            "",
            "Cost of the input checks in the AlexNet step. *Cost*: one check timed with the "
            "ranks in step × checks per step / step time. *In-step*: time inside the checks "
            "during real steps, an upper bound (it also holds the wait for a slower rank, "
            "which without checks moves to the next collective). *On/off*: difference of the "
            "interleaved medians with and without checks (noisy).",
            "",
        ]
        for world, data in checks:
            times = data["times"]
            on = times["group_parallel"]["step"]["median"]
            off = times["group_parallel_nochecks"]["step"]["median"]
            cost = data["check_seconds"] * data["comm"]["meta_ops_per_step"] / on
            lines.append(
                f"- P={world}: cost {cost:.2%} ({data['comm']['meta_ops_per_step']} checks of "
                f"{data['check_seconds'] * 1e3:.2f} ms); in-step "
                f"{data['comm']['checks_share_of_step']:.2%}; on/off {ms(on)} vs {ms(off)} ms "
                f"({on / off - 1:+.1%})"
            )
    projection = result["projection"]["cases"]
    if projection:
        lines += [
            "",
            "Projection (α–β fit of gloo on this machine) vs measured group-parallel step. "
            "*At size*: the same with each collective priced at gloo's measured time for its "
            "size instead of the fitted line (a diagnostic: it separates the line's error from "
            "the rest).",
            "",
            "| case | P | compute ms | comm ms | predicted ms | measured ms | error "
            "| comm ms at size | error at size |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, by_world in projection.items():
            for world, p in sorted(by_world.items(), key=lambda kv: int(kv[0])):
                lines.append(
                    f"| {name} | {world} | {ms(p['compute'])} | {ms(p['comm'])} | "
                    f"{ms(p['step'])} | {ms(p['measured'])} | {p['error']:+.0%} | "
                    f"{ms(p['comm_at_size'])} | {p['error_at_size']:+.0%} |"
                )
        for world, links in sorted(result["projection"]["links"].items()):
            fits = "; ".join(
                f"{key.replace('/', ' over ')}: α = {link['latency_s'] * 1e6:.0f} µs, "
                + _busbw(link["busbw_bytes_per_s"])
                for key, link in links.items()
            )
            lines.append(
                f"\nFitted gloo links at P={world} (per ring step; bus bandwidth): {fits}."
            )
    if result.get("format", 1) >= 2:
        lines += _comm_by_op(result, names)
        lines += _nvlink_projection(result, names)
        lines += _targets(result)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _gp_variants(result: dict, name: str) -> list[str]:
    """The case's group-parallel variants: the main one, then those the run measured."""
    found = []
    for run in result["runs"].values():
        for variant in run["cases"][name].get("variant_comm", {}):
            if variant not in found:
                found.append(variant)
    return [MAIN, *found]


def _label(name: str, variant: str) -> str:
    return name if variant == MAIN else f"{name} [{variant.removeprefix(MAIN + '_')}]"


def _comm(case: dict, variant: str) -> dict:
    return case["comm"] if variant == MAIN else case["variant_comm"][variant]


def _row(result: dict, name: str, world: str, variant: str) -> str:
    """One row of the table: ``variant`` of case ``name`` at ``world`` ranks."""
    run = result["runs"][world]
    c = run["cases"][name]
    t = c["times"]
    gp = t[variant]["step"]
    single = t["single_t"]["step"]["median"]
    total = t.get("single_T", t["single_t"])["step"]["median"]
    ddp = t.get("ddp", {}).get("step", {}).get("median")
    mem = c.get("param_and_optimizer_bytes", {})
    comm = _comm(c, variant)
    threads = f"{run['threads_per_rank']}" + ("*" if run["oversubscribed"] else "")
    row = [
        _label(name, variant),
        world,
        threads,
        ms(t[variant]["forward"]["median"]),
        ms_spread(gp),
        ms(single),
        f"{single / gp['median']:.2f}×",
        f"{total / gp['median']:.2f}×",
        ms(ddp) if ddp else "–",
        f"{ddp / gp['median']:.2f}×" if ddp else "–",
        f"{comm['measured_bytes']:,}",
        f"{comm['analytic_bytes']:,}",
        f"{comm['share_of_step']:.0%}",
        mib(mem[variant]) if variant in mem else "–",
        mib(mem["ddp"]) if "ddp" in mem else "–",
        f"{mem[variant] / mem['ddp']:.0%}" if "ddp" in mem and variant in mem else "–",
    ]
    return "| " + " | ".join(str(v) for v in row) + " |"


def _variant_notes(result: dict, names: list[str]) -> list[str]:
    """What the variant rows and the inference rows are (only for runs that have them)."""
    first = result["runs"][min(result["runs"], key=int)]["cases"]
    notes = []
    if any(len(_gp_variants(result, n)) > 1 for n in names):
        notes.append(
            "`[towers]`: the same AlexNet with `split_classifier=False` (towers only, "
            "classifier replicated, all-gather after pool5); `[dropin]`: the same block with "
            "only its grouped conv parallel, replicated → replicated (`parallelize(block)`). "
            "Unmarked rows: AlexNet split as in 2012, the block by `plan='auto'` (column → "
            "grouped → row). Ratios against the same run's interleaved 1p×t, 1p×P·t and DDP."
        )
    inference = [n for n in names if first[n].get("inference")]
    if inference:
        params = []
        for n in inference:
            for world, run in sorted(result["runs"].items(), key=lambda kv: int(kv[0])):
                mem = run["cases"][n]["parameter_bytes"]
                params.append(f"{n} P={world}: {mib(mem[MAIN])} / {mib(mem['single'])}")
        notes.append(
            f"Inference rows ({', '.join(inference)}): batch 1, one eval forward under "
            f"`torch.no_grad` (the step columns are that forward's latency); DDP cannot split "
            f"a batch of 1 (–); no optimizer: parameters per rank, GP / one process, MiB: "
            f"{'; '.join(params)}."
        )
    return ["", *notes] if notes else []


def _comm_by_op(result: dict, names: list[str]) -> list[str]:
    """Share of each group-parallel step inside collectives, per op (P > 1)."""
    lines = [
        "",
        "Share of the group-parallel step inside collectives (`CommCounter.seconds()`: the "
        "wall time of each gloo call on rank 0, medians of 5 steps), per op, and inside the "
        "input checks (slowest rank).",
        "",
        "| case | P | GP step ms | in collectives | all_gather | reduce_scatter | all_reduce "
        "| input checks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for variant in _gp_variants(result, name):
            for world in sorted(result["runs"], key=int):
                if world == "1":
                    continue
                c = result["runs"][world]["cases"][name]
                comm = _comm(c, variant)
                by_op = comm.get("share_by_op", {})
                step = c["times"][variant]["step"]["median"]
                lines.append(
                    f"| {_label(name, variant)} | {world} | {ms(step)} | "
                    f"{comm['share_of_step']:.0%} | "
                    + " | ".join(
                        f"{by_op[op]:.0%}" if op in by_op else "–"
                        for op in ("all_gather", "reduce_scatter", "all_reduce")
                    )
                    + f" | {comm['checks_share_of_step']:.1%} |"
                )
    return lines


def _nvlink_projection(result: dict, names: list[str]) -> list[str]:
    """Each case projected to P = 2, 4, 8 on NVLink 4, one core per rank, with speedup and
    efficiency (``projection.project``)."""
    from comm_model import LINKS
    from projection import project

    link = LINKS[PROJECTION_LINK]
    rows = []
    for name in names:
        for world in PROJECTION_WORLD_SIZES:
            p = project(result, name, world, link)
            if p is None:
                continue
            rows.append(
                f"| {name} | {world} | {ms(p['compute'])} | {p['comm'] * 1e3:.2f} | "
                f"{ms(p['step'])} | {ms(p['one_process'])} | {p['speedup']:.2f}× | "
                f"{p['efficiency']:.0%} |"
            )
    if not rows:
        return []
    return [
        "",
        f"Projection to {link.name} (α = {link.latency_s * 1e6:.0f} µs per ring step, busbw = "
        f"{link.busbw_bytes_per_s / 1e9:.0f} GB/s), one core per rank: compute = rank 0's own "
        "work at P (the group-parallel model over a group that moves no data, one thread, "
        "less its time in collectives), comm = the analytic collectives and input-check "
        "exchanges priced α–β. *1p ms*: the one-process step timed the same way. *Speedup* "
        "= 1p / step; *efficiency* = speedup / P.",
        "",
        "| case | P | compute ms | comm ms | step ms | 1p ms | speedup | efficiency |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def _ratio(result: dict, name: str, world: str, reference: str) -> float | None:
    """``reference``'s step / the main group-parallel step (above 1: GP is faster)."""
    times = result["runs"].get(world, {}).get("cases", {}).get(name, {}).get("times", {})
    if MAIN not in times or reference not in times:
        return None
    return times[reference]["step"]["median"] / times[MAIN]["step"]["median"]


def _memory_share(result: dict, name: str, world: str) -> float | None:
    """Parameters + momentum per rank, GP / DDP."""
    case = result["runs"].get(world, {}).get("cases", {}).get(name, {})
    mem = case.get("param_and_optimizer_bytes", {})
    return mem[MAIN] / mem["ddp"] if MAIN in mem and "ddp" in mem else None


def _efficiency(result: dict, name: str, world: int) -> float | None:
    """Projected efficiency on NVLink 4 (``projection.project``)."""
    if name not in result["runs"]["1"]["cases"]:
        return None
    from comm_model import LINKS
    from projection import project

    p = project(result, name, world, LINKS[PROJECTION_LINK])
    return None if p is None else p["efficiency"]


# (target, how to read it from a run, bound: ">= x" or "<= x" or None for a figure without one)
TARGETS = (
    ("AlexNet step, GP vs 1p×t, P=2", lambda r: _ratio(r, "alexnet_step", "2", "single_t"),
     ">=", 1.8, "×"),
    ("AlexNet step, GP vs DDP, P=2", lambda r: _ratio(r, "alexnet_step", "2", "ddp"),
     ">=", 1.5, "×"),
    ("AlexNet params+momentum per rank, GP / DDP, P=2",
     lambda r: _memory_share(r, "alexnet_step", "2"), "<=", 0.52, "%"),
    ("AlexNet params+momentum per rank, GP / DDP, P=4",
     lambda r: _memory_share(r, "alexnet_step", "4"), "<=", 0.27, "%"),
    ("ResNeXt block (N=8), GP vs 1p×t, P=2",
     lambda r: _ratio(r, "resnext50_block", "2", "single_t"), ">=", 1.6, "×"),
    ("ResNeXt block (N=8), GP vs DDP, P=2 (below 1×: DDP wins)",
     lambda r: _ratio(r, "resnext50_block", "2", "ddp"), None, None, "×"),
    ("AlexNet batch-1 inference (224x224), GP vs 1p×t, P=2",
     lambda r: _ratio(r, "alexnet_b1", "2", "single_t"), ">=", 1.5, "×"),
    ("ResNeXt block batch-1 inference, GP vs 1p×t, P=2",
     lambda r: _ratio(r, "resnext50_block_b1", "2", "single_t"), ">=", 1.5, "×"),
    ("AlexNet step efficiency, projected to NVLink 4, P=8",
     lambda r: _efficiency(r, "alexnet_step", 8), ">=", 0.85, "%"),
)  # fmt: skip


def _targets(result: dict) -> list[str]:
    """The issue's targets (P = 2 × 1 thread vs one process × 1 thread), met or not."""

    def show(value: float, unit: str) -> str:
        return f"{value:.0%}" if unit == "%" else f"{value:.2f}×"

    rows = []
    for what, read, relation, bound, unit in TARGETS:
        value = read(result)
        if value is None:
            continue
        if relation is None:
            wanted, verdict = "–", "–"
        else:
            met = value >= bound if relation == ">=" else value <= bound
            wanted = f"{'≥' if relation == '>=' else '≤'} {show(bound, unit)}"
            verdict = "yes" if met else "**no**"
        rows.append(f"| {what} | {show(value, unit)} | {wanted} | {verdict} |")
    if not rows:
        return []
    quick = " A --quick run: tiny sizes, the figures say nothing." if result.get("quick") else ""
    return [
        "",
        "Targets of issue 14 (this run; P = 2 × 1 thread against one process × 1 thread)." + quick,
        "",
        "| target | measured | wanted | met |",
        "|---|---|---|---|",
        *rows,
    ]


def write_plots(result: dict, out: Path) -> list[Path]:
    """``scaling.png`` (speedup vs P) and ``comm_share.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(result["runs"], key=int)
    names = list(result["runs"][worlds[0]]["cases"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        others = [(v, "^-.") for v in _gp_variants(result, name)[1:]]
        for variant, style in (("group_parallel", "o-"), ("ddp", "s--"), *others):
            xs, ys = [], []
            for world in worlds:
                t = result["runs"][world]["cases"][name]["times"]
                if variant in t:
                    xs.append(int(world))
                    ys.append(t["single_t"]["step"]["median"] / t[variant]["step"]["median"])
            if xs:
                label = variant.replace(MAIN + "_", "GP ").replace("_", " ")
                ax.plot(xs, ys, style, label=label)
        ax.plot([1, int(worlds[-1])], [1, int(worlds[-1])], ":", color="grey", label="ideal")
        ax.legend(fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("processes")
        ax.set_xticks([int(w) for w in worlds])
    axes[0][0].set_ylabel("speedup vs 1 process × t threads")
    fig.tight_layout()
    paths = [out / "scaling.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    bars = [(n, v) for n in names for v in _gp_variants(result, n)]
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(bars)), 3.2))
    width = 0.8 / max(1, len(worlds) - 1)
    for i, world in enumerate(w for w in worlds if w != "1"):
        cases = result["runs"][world]["cases"]
        shares = [_comm(cases[n], v)["share_of_step"] for n, v in bars]
        ax.bar([j + i * width for j in range(len(bars))], shares, width, label=f"P={world}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bars))])
    ax.set_xticklabels([_label(n, v) for n, v in bars], rotation=20, fontsize=7, ha="right")
    ax.set_ylabel("share of step in collectives")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "comm_share.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render a stored scaling.json again.")
    parser.add_argument("results", type=Path, help="scaling.json written by scaling.py")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help="folder for table.md and the plots (default: benchmarks/out/)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from projection import validate

    result = json.loads(args.results.read_text())
    result["projection"] = validate(result)
    prepare_out(args.out, ["table.md", "scaling.png", "comm_share.png"])
    print(write_table(result, args.out / "table.md"))
    write_plots(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
