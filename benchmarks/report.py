"""Markdown table and plots from ``scaling.json`` (see ``scaling.py``).

``scaling.py`` calls this at the end of a run. To render a stored run again (after a change
to the projection or the table, say), from the repository root::

    python benchmarks/report.py benchmarks/results/scaling.json --out /tmp/render

The JSON is only read: the projection is computed again in memory, and ``table.md``,
``scaling.png`` and ``comm_share.png`` go to ``--out`` (by default ``benchmarks/out/``,
which git ignores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"  # ignored by git


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _repetitions(result: dict) -> str:
    if not result["min_time"]:
        return f"{result['reps']} timed repetitions"
    return (
        f"{result['reps']} to {result['max_reps']} timed repetitions (enough for the slowest "
        f"variant of a case to run {result['min_time']:g} s in all)"
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


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


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
        for world in worlds:
            run = result["runs"][world]
            c = run["cases"][name]
            t = c["times"]
            gp = t["group_parallel"]["step"]
            single = t["single_t"]["step"]["median"]
            total = t.get("single_T", t["single_t"])["step"]["median"]
            ddp = t.get("ddp", {}).get("step", {}).get("median")
            mem = c["param_and_optimizer_bytes"]
            threads = f"{run['threads_per_rank']}" + ("*" if run["oversubscribed"] else "")
            row = [
                name,
                world,
                threads,
                _ms(t["group_parallel"]["forward"]["median"]),
                f"{_ms(gp['median'])} ({_ms(gp['p25'])}–{_ms(gp['p75'])})",
                _ms(single),
                f"{single / gp['median']:.2f}×",
                f"{total / gp['median']:.2f}×",
                _ms(ddp) if ddp else "–",
                f"{ddp / gp['median']:.2f}×" if ddp else "–",
                f"{c['comm']['measured_bytes']:,}",
                f"{c['comm']['analytic_bytes']:,}",
                f"{c['comm']['share_of_step']:.0%}",
                _mb(mem["group_parallel"]),
                _mb(mem["ddp"]) if "ddp" in mem else "–",
                f"{mem['group_parallel'] / mem['ddp']:.0%}" if "ddp" in mem else "–",
            ]
            lines.append("| " + " | ".join(str(v) for v in row) + " |")
    lines.append("")
    lines.append("`*`: ranks × threads exceed the cores, so ranks share cores.")
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
                f"{data['comm']['checks_share_of_step']:.2%}; on/off {_ms(on)} vs {_ms(off)} ms "
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
                    f"| {name} | {world} | {_ms(p['compute'])} | {_ms(p['comm'])} | "
                    f"{_ms(p['step'])} | {_ms(p['measured'])} | {p['error']:+.0%} | "
                    f"{_ms(p['comm_at_size'])} | {p['error_at_size']:+.0%} |"
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
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plots(result: dict, out: Path) -> list[Path]:
    """``scaling.png`` (speedup vs P) and ``comm_share.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(result["runs"], key=int)
    names = list(result["runs"][worlds[0]]["cases"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for variant, style in (("group_parallel", "o-"), ("ddp", "s--")):
            xs, ys = [], []
            for world in worlds:
                t = result["runs"][world]["cases"][name]["times"]
                if variant in t:
                    xs.append(int(world))
                    ys.append(t["single_t"]["step"]["median"] / t[variant]["step"]["median"])
            if xs:
                ax.plot(xs, ys, style, label=variant.replace("_", " "))
        ax.plot([1, int(worlds[-1])], [1, int(worlds[-1])], ":", color="grey", label="ideal")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("processes")
        ax.set_xticks([int(w) for w in worlds])
    axes[0][0].set_ylabel("speedup vs 1 process × t threads")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "scaling.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(worlds) - 1)
    for i, world in enumerate(w for w in worlds if w != "1"):
        shares = [result["runs"][world]["cases"][n]["comm"]["share_of_step"] for n in names]
        ax.bar([j + i * width for j in range(len(names))], shares, width, label=f"P={world}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=20, fontsize=7)
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
    sys.path.insert(0, str(HERE))
    from projection import validate

    result = json.loads(args.results.read_text())
    result["projection"] = validate(result)
    args.out.mkdir(parents=True, exist_ok=True)
    print(write_table(result, args.out / "table.md"))
    write_plots(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
