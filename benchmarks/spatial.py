"""Space: the U-Nets under ``plan="spatial"`` against one process, step time and activation
memory per rank, at two input sizes, P = 1, 2, 4; and a ResNeXt bottleneck split by rows,
by channel groups, and both ways.

For each model and input size, P ranks of one thread each (P = 4: two ranks per core on a
2-core machine) train it in each of its layouts and one process trains the plain model.
The layouts: ``rows`` (dim 2 over P ranks), ``grid`` (a 2 × P/2 ``("sp_h", "sp_w")`` mesh:
dims 2 and 3), ``groups`` (``plan="auto"``: channel groups over P ranks) and ``both`` (a
P/2 × 2 ``("sp", "gp")`` mesh: rows and channel groups). Per layout:

* **step**: forward, backward and an SGD step, medians of ``--reps`` after ``--warmup``;
* **activation bytes per rank**: what one training forward saves for backward
  (``activation_memory.saved_bytes``: distinct storages, parameters apart), the largest rank;
  and the **parameter bytes** a rank holds;
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
from cases import Bottleneck  # noqa: E402
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
from mpgroups.layers.dtensor_state import local_tensor  # noqa: E402
from mpgroups.models import UNet  # noqa: E402

DEFAULT_OUT = HERE / "out" / "spatial"
WORLD_SIZES = (1, 2, 4)
# name: (model, arguments, batch, channels, (smaller size, larger size), layouts); quick
# sizes apart
CASES = {
    "unet2d": ("unet", dict(dims=2, levels=2, up="transpose", norm="batch", width=8), 2, 2,
               ((96, 96), (192, 192)), ("rows", "grid")),
    "unet3d": ("unet", dict(dims=3, levels=2, up="upsample", norm="instance", width=4), 1, 2,
               ((24, 24, 24), (40, 40, 40)), ("rows",)),
    # ResNeXt-50's stage-1 bottleneck (256 → 128 (G=32) → 256)
    "resnext_block": ("bottleneck", dict(inplanes=256, planes=64), 2, 256, ((28, 28), (56, 56)),
                      ("rows", "groups", "both")),
}  # fmt: skip
QUICK_SIZES = {
    "unet2d": ((16, 8), (32, 8)),
    "unet3d": ((16, 8, 8), (32, 8, 8)),
    "resnext_block": ((8, 8), (16, 8)),
}
QUICK_BLOCK = dict(inplanes=64, planes=16)  # width 32, G=32


def _model(kind: str, options: dict, world: int, layout: str):
    """``(model, where the input's rows split)`` for ``layout`` over the default group."""
    torch.manual_seed(0)
    plain = UNet(**options) if kind == "unet" else Bottleneck(**options)
    if world == 1:
        return plain, None
    if layout == "groups":
        return mpgroups.parallelize(copy.deepcopy(plain), None, plan="auto"), False
    from torch.distributed.device_mesh import init_device_mesh

    where = None
    if layout == "grid":
        where = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("sp_h", "sp_w"))
    elif layout == "both":
        where = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("sp", "gp"))
    model = mpgroups.parallelize(copy.deepcopy(plain), where, plan="spatial")
    return model, where["sp"] if layout == "both" else where


def _rank_run(
    rank: int, world: int, kind: str, options: dict, layout: str, shape: tuple, reps: int,
    warmup: int,
) -> dict:  # fmt: skip
    model, rows = _model(kind, options, world, layout)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    block = mpgroups.spatial_shard(x, rows) if world > 1 and rows is not False else x
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    params = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())

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
        "parameters": max_over_ranks(params, world),
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


def _layouts(world: int, layouts: tuple[str, ...]) -> tuple[str, ...]:
    """The layouts a case runs at ``world`` ranks (a mesh needs 2 × 2 at least)."""
    if world == 1:
        return ("one",)
    return tuple(layout for layout in layouts if layout in ("rows", "groups") or world >= 4)


def measure(name: str, args) -> dict:
    kind, options, batch, channels, sizes, layouts = CASES[name]
    if args.quick:
        sizes = QUICK_SIZES[name]
        if kind == "bottleneck":
            options, channels = QUICK_BLOCK, QUICK_BLOCK["inplanes"]
    rows = {}
    for size in sizes:
        shape = (batch, channels, *size)
        for world in args.world_sizes:
            for layout in _layouts(world, layouts):
                row = run_ranks(
                    _rank_run, world, kind, options, layout, shape, args.reps, args.warmup,
                    threads=1, timeout=args.timeout, what=f"{name} {size} P={world} {layout}",
                )  # fmt: skip
                row["projected_nvlink4"] = _projected(row, world) if world > 1 else None
                key = f"{'x'.join(map(str, size))}/P={world}/{layout}"
                rows[key] = {**row, "size": size, "world": world, "layout": layout}
    return {"options": options, "batch": batch, "channels": channels, "rows": rows}


def budget(case: dict) -> dict:
    """Per P and layout, the largest input volume whose activation bytes per rank fit the
    one-device bytes at the larger size (a + b·volume through the two sizes)."""
    rows = list(case["rows"].values())
    big = max(rows, key=lambda r: _volume(r["size"]))
    limit = next(r["activations"] for r in rows if r["world"] == 1 and r["size"] == big["size"])
    result = {}
    for world, layout in dict.fromkeys((r["world"], r["layout"]) for r in rows):
        points = sorted(
            (_volume(r["size"]), r["activations"])
            for r in rows
            if (r["world"], r["layout"]) == (world, layout)
        )
        (v0, b0), (v1, b1) = points[0], points[-1]
        slope = (b1 - b0) / (v1 - v0)
        result[f"{world}/{layout}"] = (limit - (b0 - slope * v0)) / slope
    return result


def table_lines(result: dict) -> list[str]:
    lines = [
        f"`{result['command']}`",
        "",
        "| model | input | P | layout | step ms (p25–p75) | vs 1 process | activations per "
        "rank MiB | / one device | parameters per rank / one device | halo MiB per step | "
        "all-reduce MiB | in communication | NVLink 4 projected ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in result["cases"].items():
        rows = case["rows"]
        for row in rows.values():
            size = "x".join(map(str, row["size"]))
            one = rows[f"{size}/P=1/one"]
            step = row["step"]["median"]
            halo = sum(row["ops"].get("halo_exchange", []))
            reduce = sum(row["ops"].get("all_reduce", []))
            projected = row["projected_nvlink4"]
            lines.append(
                f"| {name} | {size} | {row['world']} | {row['layout']} | {ms(step)} "
                f"({ms(row['step']['p25'])}–{ms(row['step']['p75'])}) | "
                f"{one['step']['median'] / step:.2f}× | {mib(row['activations'])} | "
                f"{row['activations'] / one['activations']:.3f} | "
                f"{row['parameters'] / one['parameters']:.3f} | {mib(halo)} | {mib(reduce)} | "
                f"{1 - row['local']['median'] / step:.0%} | "
                f"{'–' if projected is None else ms(projected)} |"
            )
    lines += [
        "",
        "Largest input volume whose activations per rank fit one device's at the larger size "
        "(fitted a + b·volume per P and layout), relative to one device:",
        "",
        "| model | P and layout | largest volume / one device's |",
        "|---|---|---|",
    ]
    for name, case in result["cases"].items():
        fits = case["budget"]
        for key, volume in fits.items():
            if key != "1/one":
                world, layout = key.split("/")
                lines.append(f"| {name} | {world}, {layout} | {volume / fits['1/one']:.2f}× |")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = result["world_sizes"]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name, case in result["cases"].items():
        sizes = sorted({tuple(r["size"]) for r in case["rows"].values()})
        layouts = dict.fromkeys(r["layout"] for r in case["rows"].values() if r["world"] > 1)
        for size, layout in ((size, layout) for size in sizes for layout in layouts):
            label = f"{name} {'x'.join(map(str, size))} {layout}"
            keyed = {(r["world"], r["layout"]): r for r in case["rows"].values()
                     if tuple(r["size"]) == size}  # fmt: skip
            one = keyed[(1, "one")]
            points = [(w, keyed[(w, layout)]) for w in worlds if (w, layout) in keyed]
            points = [(1, one), *points]
            marker = {"rows": "o", "grid": "s", "groups": "^", "both": "D"}[layout]
            memory.plot([w for w, _ in points],
                        [r["activations"] / one["activations"] for _, r in points],
                        marker=marker, label=label)  # fmt: skip
            speed.plot([w for w, _ in points],
                       [one["step"]["median"] / r["step"]["median"] for _, r in points],
                       marker=marker, label=label)  # fmt: skip
    memory.plot(worlds, [1 / w for w in worlds], "k--", label="1/P")
    memory.set(xlabel="ranks P", ylabel="activation bytes per rank / one device", xticks=worlds)
    speed.set(xlabel="ranks P (P = 4: two per core)", ylabel="speedup vs one process",
              xticks=worlds)  # fmt: skip
    for axis in (memory, speed):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("rows, grid, groups and both on this machine (gloo, one thread per rank)")
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
