"""Project the step time of a group-parallel case to more ranks with an α–β link model.

Usage::

    python benchmarks/projection.py --results benchmarks/results/scaling.json --link nvlink4
    python benchmarks/projection.py --results ... --bandwidth 25 --latency 8 --world-sizes 2 4 8

Step time at P ranks = compute + communication, where

* compute: a rank's work at P without the wire: the group-parallel model itself, built over
  a process group that moves no data (``loopback``), less its time inside collectives. That
  is mpgroups' own code with the rank's shapes: every slice, layout copy, receive buffer
  and input check, and for the AlexNet step the pools, the replicated classifier and the SGD
  step. Where a run at P exists it is measured on all P ranks at once, slowest rank (so that
  sharing cores and memory bandwidth is in it; interleaved with the measured variants, so
  that the machine's noise hits both alike), else as rank 0 alone at one
  thread × max(1, P·t / cores);
* communication = Σ over the collectives the placement rule prescribes (``comm_model``)
  of (P-1)·α + bytes·(P-1)/P / busbw (nccl-tests' bus-bandwidth convention; 2(P-1) steps
  and 2(P-1)/P for an all-reduce), plus the per-call input-check exchanges. The collectives
  are those the run stored (measured P: the analytic list it checked against CommCounter;
  other P: the list it stored for the projection), else those of ``cases.py`` today.

:func:`project` is the projection to another link with one core per rank (the issue's
"NVLink 4, P = 8"): compute = rank 0's own work at P on one thread, and it reports the
**speedup** = the one-process step (one thread, timed the same way: the model at P = 1)
/ the projected step, and the **efficiency** = speedup / P (1 = perfect scaling).

``validate`` fits α and busbw to gloo's measured times of each collective the cases use (per
op and group size, at each P on this machine, at the message sizes the cases move) and
compares the prediction with the measured group-parallel step. As a diagnostic it also
prices each collective at gloo's measured time for its own size (:class:`MeasuredTimes`):
where that prediction is close and the fitted one is not, the straight α–β line is what
misses; where both miss, the step is not compute + communication (ranks waiting for each
other, cores shared by more ranks than there are cores).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, QUICK, analytic_collectives  # noqa: E402
from comm_model import (  # noqa: E402
    LINKS,
    Collective,
    Link,
    collective_seconds,
    ring_bytes_factor,
    ring_steps,
)


def fit_link(points: list[tuple[int, float]], op: str, group_size: int) -> Link:
    """Fit t = steps·α + bytes·factor / busbw to one collective's measured times.

    ``steps`` and ``factor`` are :func:`~comm_model.ring_steps` and
    :func:`~comm_model.ring_bytes_factor`, as in ``collective_seconds``.
    The line passes through the smallest message (which sets α, as latency is usually
    calibrated); its slope (1 / busbw) is the least-squares fit of the time added by the
    larger ones, floored at 0 (busbw = ∞: the times measured do not resolve a bandwidth).
    ``scaling.py`` times the messages the projection prices (the smallest is the input
    check's record exchange), so the line is fitted where it is used; the steps' collectives
    move megabytes, where the error in milliseconds is what counts.
    """
    steps = ring_steps(op, group_size)
    factor = ring_bytes_factor(op, group_size)
    smallest_bytes, smallest_seconds = min(points)
    x0 = smallest_bytes * factor
    dxs = [nbytes * factor - x0 for nbytes, _ in points]
    dys = [t - smallest_seconds for _, t in points]
    slope = sum(dx * dy for dx, dy in zip(dxs, dys, strict=True)) / sum(dx * dx for dx in dxs)
    # Time does not shrink with size: where noise makes the larger messages look faster than
    # the smallest, the slope is 0 (bandwidth not resolved), never a negative price per byte.
    slope = max(slope, 0.0)
    latency = max(0.0, smallest_seconds - x0 * slope) / steps
    busbw = 1 / slope if slope > 0 else math.inf
    return Link(f"gloo {op} over {group_size} (fit)", latency, busbw)


@dataclass(frozen=True)
class MeasuredTimes:
    """One collective's measured seconds by size: ``[(bytes, seconds), ...]``, sizes ascending.

    Prices a message by linear interpolation between the two measured sizes around it
    (beyond the ends, the nearest segment's line): an α–β line per segment.
    """

    points: tuple[tuple[int, float], ...]

    def seconds(self, nbytes: int) -> float:
        sizes = [b for b, _ in self.points]
        i = min(max(bisect.bisect_left(sizes, nbytes), 1), len(self.points) - 1)
        (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        return max(0.0, y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0))


Pricing = Link | MeasuredTimes


def _link_for(links: Pricing | dict[str, Pricing], op: str, group_size: int):
    """How to price ``op`` over ``group_size`` ranks: one preset, or that op's own entry."""
    if isinstance(links, Link | MeasuredTimes):
        return links
    return links[f"{op}/{group_size}"]


def _seconds(op: str, group_size: int, nbytes: int, pricing: Pricing) -> float:
    if isinstance(pricing, MeasuredTimes):
        return pricing.seconds(nbytes)
    return collective_seconds(op, group_size, nbytes, pricing)


def collectives_at(result: dict, case: str, world: int) -> list[Collective]:
    """The collectives of rank 0 at ``world`` ranks: stored by the run (the analytic list of
    a measured P, or the list stored for a projected P), else ``cases.py``'s today."""
    measured = result["runs"].get(str(world), {}).get("cases", {}).get(case)
    if measured is not None:
        return [Collective(**c) for c in measured["comm"]["collectives"]]
    one = result["runs"]["1"]["cases"][case]
    stored = one.get("projected_collectives", {}).get(str(world))
    if stored is not None:
        return [Collective(**c) for c in stored]
    cases = QUICK if result.get("quick") else CASES
    return analytic_collectives(cases[case], world, 0)


def _meta_ops(result: dict, case: str, world: int) -> int:
    """Input-check exchanges per step at ``world``: counted in the run at that P, else in
    rank 0's local work at that P (``local_meta_ops_per_step``), else 0."""
    measured = result["runs"].get(str(world), {}).get("cases", {}).get(case)
    if measured is not None:
        return measured.get("comm", {}).get("meta_ops_per_step", 0)
    local = result["runs"]["1"]["cases"][case].get("local_meta_ops_per_step", {})
    return local.get(str(world), 0)


def comm_seconds(result: dict, case: str, world: int, link: Pricing | dict[str, Pricing]) -> float:
    """Seconds in the data collectives and the input-check exchanges of one step."""
    comm = sum(
        _seconds(c.op, c.group_size, c.nbytes, _link_for(link, c.op, c.group_size))
        for c in collectives_at(result, case, world)
    )
    record_link = _link_for(link, "all_gather", world)
    # The record's length when the run was made (runs before it was stored: 12 integers).
    record_size = result.get("record_size", 12)
    record = _seconds("all_gather", world, world * record_size * 8, record_link)
    return comm + _meta_ops(result, case, world) * record


def predict(
    result: dict,
    case: str,
    world: int,
    link: Pricing | dict[str, Pricing],
    cores: int | None = None,
) -> dict[str, float]:
    """Compute, communication and step seconds of ``case`` at ``world`` ranks.

    ``link`` is one link for every collective (a preset), or per collective keyed ``"op/P"``
    (fitted :class:`Link` s, or :class:`MeasuredTimes`).
    """
    cores = cores or result["machine"]["cores"]
    threads = max(1, cores // world)
    oversubscribe = max(1.0, world * threads / cores)
    local = result["runs"]["1"]["cases"][case]["local_compute_1thread"]
    measured_run = result["runs"].get(str(world), {}).get("cases", {}).get(case, {})
    if "local_compute_concurrent" in measured_run and cores == result["machine"]["cores"]:
        compute = measured_run["local_compute_concurrent"]
    elif str(world) in local:
        compute = local[str(world)] * oversubscribe
    else:
        raise ValueError(
            f"no compute time for {case} at {world} ranks: the run timed rank 0's work at "
            f"{', '.join(sorted(local, key=int))} ranks"
        )
    comm = comm_seconds(result, case, world, link)
    return {"compute": compute, "comm": comm, "step": compute + comm}


def project(result: dict, case: str, world: int, link: Link) -> dict[str, float] | None:
    """``case`` at ``world`` ranks on ``link``, one core per rank: compute (rank 0's own work
    at ``world``, one thread), comm, step, the one-process step, speedup and efficiency
    (speedup / ``world``). ``None`` for a run that did not time the one-process step
    (``local_compute_1thread["1"]``, from format 2 on)."""
    local = result["runs"]["1"]["cases"][case]["local_compute_1thread"]
    if "1" not in local or str(world) not in local:
        return None
    compute = local[str(world)]
    comm = comm_seconds(result, case, world, link)
    step = compute + comm
    speedup = local["1"] / step
    return {
        "compute": compute,
        "comm": comm,
        "step": step,
        "one_process": local["1"],
        "speedup": speedup,
        "efficiency": speedup / world,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def validate(result: dict) -> dict:
    """Predicted vs measured group-parallel step time at each measured P > 1."""
    out = {"links": {}, "cases": {}}
    fits = {
        world: {
            key: fit_link(points, key.split("/")[0], int(key.split("/")[1]))
            for key, points in run["link"].items()
        }
        for world, run in result["runs"].items()
        if "link" in run
    }
    for world, links in fits.items():
        # Strict JSON has no infinity: an unresolved bandwidth is written as null.
        out["links"][world] = {
            key: {**fit.__dict__, "busbw_bytes_per_s": _finite_or_none(fit.busbw_bytes_per_s)}
            for key, fit in links.items()
        }
    for world, run in result["runs"].items():
        if world not in fits:
            continue
        link = fits[world]
        times = {key: MeasuredTimes(tuple(map(tuple, pts))) for key, pts in run["link"].items()}
        for case, data in run["cases"].items():
            prediction = predict(result, case, int(world), link)
            at_size = predict(result, case, int(world), times)
            measured = data["times"]["group_parallel"]["step"]["median"]
            out["cases"].setdefault(case, {})[world] = {
                **prediction,
                "measured": measured,
                "error": prediction["step"] / measured - 1,
                "comm_at_size": at_size["comm"],
                "error_at_size": at_size["step"] / measured - 1,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results/scaling.json")
    parser.add_argument("--link", choices=sorted(LINKS), default=None)
    parser.add_argument("--bandwidth", type=float, help="bus bandwidth, GB/s")
    parser.add_argument("--latency", type=float, help="latency per ring step, microseconds")
    parser.add_argument(
        "--world-sizes", type=int, nargs="+", default=[2, 4, 8],
        help="of those whose compute the run timed (2 4 8)",
    )  # fmt: skip
    parser.add_argument(
        "--cores", type=int, default=None, help="cores (default: one per rank of the largest P)"
    )
    args = parser.parse_args(argv)
    result = json.loads(Path(args.results).read_text())
    timed = next(iter(result["runs"]["1"]["cases"].values()))["local_compute_1thread"]
    untimed = [p for p in args.world_sizes if str(p) not in timed]
    if untimed:
        parser.error(f"no compute time at world sizes {untimed}; the run timed {', '.join(timed)}")
    if args.link:
        link = LINKS[args.link]
    elif args.bandwidth and args.latency:
        link = Link("custom", args.latency * 1e-6, args.bandwidth * 1e9)
    else:
        parser.error("give --link, or both --bandwidth and --latency")
    cores = args.cores or max(args.world_sizes)
    print(f"link: {link.name}, α = {link.latency_s * 1e6:.1f} µs, busbw = "
          f"{link.busbw_bytes_per_s / 1e9:.1f} GB/s; compute: this machine's one-thread times, "
          f"{cores} cores (one per rank)")  # fmt: skip
    print("speedup: the one-process step (one thread) / the step at P; efficiency: speedup / P "
          "(where the run timed the one-process step)")  # fmt: skip
    print(f"{'case':<20} {'P':>3} {'compute ms':>11} {'comm ms':>9} {'step ms':>9} "
          f"{'speedup':>8} {'efficiency':>10}")  # fmt: skip
    for case in result["runs"]["1"]["cases"]:
        for world in args.world_sizes:
            p = predict(result, case, world, link, cores)
            one = result["runs"]["1"]["cases"][case]["local_compute_1thread"].get("1")
            speedup = f"{one / p['step']:>7.2f}×" if one else f"{'–':>8}"
            efficiency = f"{one / p['step'] / world:>10.0%}" if one else f"{'–':>10}"
            print(f"{case:<20} {world:>3} {p['compute'] * 1e3:>11.2f} {p['comm'] * 1e3:>9.2f} "
                  f"{p['step'] * 1e3:>9.2f} {speedup} {efficiency}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
