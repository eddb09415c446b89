"""Space: the U-Nets under ``plan="spatial"`` against one process, step time and activation
memory per rank, at two input sizes, P = 1, 2, 4.

For each U-Net (``mpgroups.models.UNet``: 2-D, and 3-D) and input size, P ranks of one
thread each (P = 4: two ranks per core on a 2-core machine) train it split along dim 2 and
one process trains the plain model:

* **step**: forward, backward and an SGD step, medians of ``--reps`` after ``--warmup``;
* **activation bytes per rank**: what one training forward saves for backward
  (``activation_memory.saved_bytes``: distinct storages, parameters apart), the largest rank;
* **halo and all-reduce bytes** of a step and the time inside them on this machine;
* **NVLink 4 projection**: the slowest rank's work outside the exchanges and checks, plus
  each exchange priced α–β (a point-to-point halo message at one latency and the link's
  bandwidth; the all-reduces of norms and gradients as ring all-reduces) and each check at
  one latency;
* **the largest input in a fixed budget**: per P, activation bytes per rank fitted as
  ``a + b·volume`` through the two sizes, and the volume that fills one device's bytes at
  the larger size.

Writes ``OUT/spatial.json``, ``OUT/spatial.md`` and ``OUT/spatial.png`` (``--out``; by
default ``benchmarks/out/spatial/``, which git ignores)::

    python benchmarks/spatial.py              # about two minutes on 2 cores
    python benchmarks/spatial.py --quick      # tiny inputs, seconds
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from activation_memory import saved_bytes  # noqa: E402
from comm_model import LINKS, collective_seconds  # noqa: E402
from harness import (  # noqa: E402
    HERE,
    max_over_ranks,
    mib,
    ms,
    prepare_out,
    publish,
    run_header,
    run_ranks,
    summary,
)
from harness import parser as benchmark_parser  # noqa: E402

import mpgroups  # noqa: E402
from mpgroups.models import UNet  # noqa: E402

DEFAULT_OUT = HERE / "out" / "spatial"
WORLD_SIZES = (1, 2, 4)
# name: (UNet arguments, batch, channels, (smaller size, larger size)); quick sizes apart
CASES = {
    "unet2d": (dict(dims=2, levels=2, up="transpose", norm="batch", width=8), 2, 2,
               ((96, 96), (192, 192))),
    "unet3d": (dict(dims=3, levels=2, up="upsample", norm="instance", width=4), 1, 2,
               ((24, 24, 24), (40, 40, 40))),
}  # fmt: skip
QUICK_SIZES = {"unet2d": ((16, 8), (32, 8)), "unet3d": ((16, 8, 8), (32, 8, 8))}


def _model(options: dict, world: int):
    torch.manual_seed(0)
    plain = UNet(**options)
    if world == 1:
        return plain
    return mpgroups.parallelize(copy.deepcopy(plain), None, plan="spatial")


def _rank_run(rank: int, world: int, options: dict, shape: tuple, reps: int, warmup: int) -> dict:
    model = _model(options, world)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    block = mpgroups.spatial_shard(x) if world > 1 else x
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad()
        model(block).square().mean().backward()
        optimizer.step()

    memory = saved_bytes(model, block, None)["activations"]
    for _ in range(warmup):
        step()
    times, local = [], []
    for _ in range(reps):
        if world > 1:
            torch.distributed.barrier()
        with mpgroups.CommCounter() as comm:
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
        times.append(max_over_ranks(seconds, world))
        # this step's own work: the slowest rank's time outside the exchanges and the checks
        # (a check's record counts its own exchange: the "meta" records inside it are not
        # taken off twice)
        outside = seconds - comm.seconds(kind="data") - comm.seconds(kind="check")
        local.append(max_over_ranks(outside, world))
    ops: dict[str, list[int]] = {}
    for record in comm.records:
        if record.kind == "data":
            ops.setdefault(record.op, []).append(record.nbytes)
    return {
        "step": summary(times),
        "activations": max_over_ranks(memory, world),
        "local": summary(local),
        "checks": comm.count(kind="check"),
        "ops": ops,
    }


def _projected(row: dict, world: int) -> float:
    """The step on NVLink 4: measured less its communication, plus the exchanges priced."""
    link = LINKS["nvlink4"]
    priced = 0.0
    for op, sizes in row["ops"].items():
        for nbytes in sizes:
            if op == "halo_exchange":
                priced += link.latency_s + nbytes / link.busbw_bytes_per_s
            else:
                priced += collective_seconds(op, world, nbytes, link)
    # each input check: one exchange of a few integers (on the host side group: a latency)
    return row["local"]["median"] + priced + row["checks"] * link.latency_s


def _volume(size) -> int:
    volume = 1
    for extent in size:
        volume *= extent
    return volume


def measure(name: str, args) -> dict:
    options, batch, channels, sizes = CASES[name]
    if args.quick:
        sizes = QUICK_SIZES[name]
    rows = {}
    for size in sizes:
        shape = (batch, channels, *size)
        for world in args.world_sizes:
            row = run_ranks(
                _rank_run, world, options, shape, args.reps, args.warmup,
                threads=1, timeout=args.timeout, what=f"{name} {size} P={world}",
            )  # fmt: skip
            row["projected_nvlink4"] = _projected(row, world) if world > 1 else None
            rows[f"{'x'.join(map(str, size))}/P={world}"] = {**row, "size": size, "world": world}
    return {"options": options, "batch": batch, "channels": channels, "rows": rows}


def budget(case: dict) -> dict:
    """Per P, the largest input volume whose activation bytes per rank fit the one-device
    bytes at the larger size (a + b·volume through the two sizes)."""
    rows = list(case["rows"].values())
    big = max(rows, key=lambda r: _volume(r["size"]))
    limit = next(r["activations"] for r in rows if r["world"] == 1 and r["size"] == big["size"])
    result = {}
    for world in sorted({r["world"] for r in rows}):
        points = sorted((_volume(r["size"]), r["activations"]) for r in rows if r["world"] == world)
        (v0, b0), (v1, b1) = points[0], points[-1]
        slope = (b1 - b0) / (v1 - v0)
        result[str(world)] = (limit - (b0 - slope * v0)) / slope
    return result


def table_lines(result: dict) -> list[str]:
    lines = [
        f"`{result['command']}`",
        "",
        "| U-Net | input | P | step ms (p25–p75) | vs 1 process | activations per rank MiB "
        "| / one device | halo MiB per step | all-reduce MiB | in communication | NVLink 4 "
        "projected ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in result["cases"].items():
        rows = case["rows"]
        for row in rows.values():
            size = "x".join(map(str, row["size"]))
            one = rows[f"{size}/P=1"]
            step = row["step"]["median"]
            halo = sum(row["ops"].get("halo_exchange", []))
            reduce = sum(row["ops"].get("all_reduce", []))
            projected = row["projected_nvlink4"]
            lines.append(
                f"| {name} | {size} | {row['world']} | {ms(step)} ({ms(row['step']['p25'])}–"
                f"{ms(row['step']['p75'])}) | {one['step']['median'] / step:.2f}× | "
                f"{mib(row['activations'])} | {row['activations'] / one['activations']:.3f} | "
                f"{mib(halo)} | {mib(reduce)} | {1 - row['local']['median'] / step:.0%} | "
                f"{'–' if projected is None else ms(projected)} |"
            )
    lines += [
        "",
        "Largest input volume whose activations per rank fit one device's at the larger size "
        "(fitted a + b·volume per P), relative to one device:",
        "",
        "| U-Net | " + " | ".join(f"P = {w}" for w in result["world_sizes"]) + " |",
        "|---|" + "---|" * len(result["world_sizes"]),
    ]
    for name, case in result["cases"].items():
        fits = case["budget"]
        ratios = [f"{fits[str(w)] / fits['1']:.2f}×" for w in result["world_sizes"]]
        lines.append(f"| {name} | " + " | ".join(ratios) + " |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = result["world_sizes"]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name, case in result["cases"].items():
        sizes = sorted({tuple(r["size"]) for r in case["rows"].values()})
        for size in sizes:
            label = f"{name} {'x'.join(map(str, size))}"
            rows = [case["rows"][f"{'x'.join(map(str, size))}/P={w}"] for w in worlds]
            one = rows[0]
            memory.plot(worlds, [r["activations"] / one["activations"] for r in rows],
                        marker="o", label=label)  # fmt: skip
            speed.plot(worlds, [one["step"]["median"] / r["step"]["median"] for r in rows],
                       marker="o", label=label)  # fmt: skip
    memory.plot(worlds, [1 / w for w in worlds], "k--", label="1/P")
    memory.set(xlabel="ranks P", ylabel="activation bytes per rank / one device", xticks=worlds)
    speed.set(xlabel="ranks P (P = 4: two per core)", ylabel="speedup vs one process",
              xticks=worlds)  # fmt: skip
    for axis in (memory, speed):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("plan='spatial' on this machine (gloo, one thread per rank)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="spatial.json, spatial.md and spatial.png",
        reps=10, timeout=600, quick="tiny inputs",
    )  # fmt: skip
    parser.add_argument(
        "--world-sizes", type=int, nargs="+", default=None,
        help=f"ranks to run (default {WORLD_SIZES}; --quick: 1 2); 1 is the reference",
    )  # fmt: skip
    parser.add_argument("--cases", nargs="+", default=list(CASES), help=f"of {list(CASES)}")
    args = parser.parse_args(argv)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; of {list(CASES)}")
    if args.world_sizes is None:
        args.world_sizes = (1, 2) if args.quick else WORLD_SIZES
    if 1 not in args.world_sizes:
        parser.error("--world-sizes must include 1 (the reference)")
    if args.quick:
        args.reps, args.warmup = 2, 1
    names = ["spatial.json", "spatial.md", "spatial.png"]
    prepare_out(args.out, names)
    result = {
        **run_header(argv, args.cores), "quick": args.quick, "reps": args.reps,
        "world_sizes": sorted(args.world_sizes), "cases": {},
    }  # fmt: skip
    for name in args.cases:
        case = measure(name, args)
        case["budget"] = budget(case)
        result["cases"][name] = case
    print(publish(args.out, "spatial", result, table_lines(result)))
    plot(result, args.out / "spatial.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
