"""Project the step time of a group-parallel case to more ranks with an α–β link model.

Usage::

    python benchmarks/projection.py --results benchmarks/results/scaling.json --link nvlink4
    python benchmarks/projection.py --results ... --bandwidth 25 --latency 8 --world-sizes 2 4 8

Step time at P ranks = compute + communication, where

* compute: for a block of layers, rank 0's local work at P (its convolutions with the copies
  its layouts make, ``scaling._local_compute_time``), measured without communication on all
  P ranks at once where a run at P exists (so that sharing cores and memory bandwidth is in
  it), else measured alone at one thread × max(1, P·t / cores). For the
  AlexNet step, T_shard / P + T_replicated: T_shard is the one-thread time of what group
  parallelism splits, T_replicated of what every rank repeats (the classifier);
* communication = Σ over the collectives the placement rule prescribes (``mpgroups.comm_model``)
  of (P-1)·α + bytes·(P-1)/P / busbw (nccl-tests' bus-bandwidth convention), plus the
  per-call validation exchanges.

``validate`` fits α and busbw to gloo's measured all-gather times at each P on this machine
and compares the prediction with the measured group-parallel step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, QUICK, analytic_collectives  # noqa: E402

from mpgroups.comm_model import LINKS, Link, collective_seconds  # noqa: E402
from mpgroups.validation import RECORD_SIZE  # noqa: E402


def fit_link(points: list[tuple[int, float]], world: int) -> Link:
    """Fit t = (P-1)·α + bytes·(P-1)/P / busbw to measured all-gathers.

    Weighted least squares with weights 1/t², i.e. relative errors, so that the small sizes
    (which set α) count as much as the large ones (which set the bandwidth).
    """
    xs = [nbytes * (world - 1) / world for nbytes, _ in points]
    ys = [t for _, t in points]
    ws = [1 / t**2 for t in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True)) / sum(
        w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True)
    )
    intercept = max(0.0, my - slope * mx)
    return Link(f"gloo loopback (fit at P={world})", intercept / (world - 1), 1 / slope)


def _compute_basis(result: dict, case: str) -> tuple[float, float, dict]:
    """(T_shard, T_replicated) at one thread, from a run with one thread per rank."""
    for world, run in sorted(result["runs"].items(), key=lambda kv: int(kv[0])):
        if run["threads_per_rank"] == 1 and case in run["cases"]:
            c = run["cases"][case]
            total = c["times"]["single_t"]["step"]["median"]
            replicated = c.get("classifier_step_1thread", 0.0)
            return total - replicated, replicated, {"from_world_size": int(world)}
    raise ValueError(f"no run with one thread per rank for {case}")


def predict(
    result: dict, case: str, world: int, link: Link, cores: int | None = None
) -> dict[str, float]:
    cases = QUICK if result.get("quick") else CASES
    cores = cores or result["machine"]["cores"]
    threads = max(1, cores // world)
    oversubscribe = max(1.0, world * threads / cores)
    local = result["runs"]["1"]["cases"][case].get("local_compute_1thread", {})
    measured_run = result["runs"].get(str(world), {}).get("cases", {}).get(case, {})
    if "local_compute_concurrent" in measured_run and cores == result["machine"]["cores"]:
        compute = measured_run["local_compute_concurrent"]
    elif str(world) in local:
        compute = local[str(world)] * oversubscribe
    else:
        shard, replicated, _ = _compute_basis(result, case)
        compute = (shard / world + replicated) * oversubscribe
    collectives = analytic_collectives(cases[case], world, 0)
    comm = sum(collective_seconds(c.op, c.group_size, c.nbytes, link) for c in collectives)
    runs = result["runs"].get(str(world), {}).get("cases", {})
    meta_ops = runs.get(case, {}).get("comm", {}).get("meta_ops_per_step", 0)
    comm += meta_ops * collective_seconds("all_gather", world, world * RECORD_SIZE * 8, link)
    return {"compute": compute, "comm": comm, "step": compute + comm}


def validate(result: dict) -> dict:
    """Predicted vs measured group-parallel step time at each measured P > 1."""
    out = {"links": {}, "cases": {}}
    for world, run in result["runs"].items():
        if "link" in run:
            link = fit_link(run["link"]["points"], int(world))
            out["links"][world] = link.__dict__
    for world, run in result["runs"].items():
        if world not in out["links"]:
            continue
        link = Link(**out["links"][world])
        for case, data in run["cases"].items():
            prediction = predict(result, case, int(world), link)
            measured = data["times"]["group_parallel"]["step"]["median"]
            out["cases"].setdefault(case, {})[world] = {
                **prediction,
                "measured": measured,
                "error": prediction["step"] / measured - 1,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results/scaling.json")
    parser.add_argument("--link", choices=sorted(LINKS), default=None)
    parser.add_argument("--bandwidth", type=float, help="bus bandwidth, GB/s")
    parser.add_argument("--latency", type=float, help="latency per ring step, microseconds")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--cores", type=int, default=None, help="cores (default: as measured)")
    args = parser.parse_args(argv)
    result = json.loads(Path(args.results).read_text())
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
    print(f"{'case':<18} {'P':>3} {'compute ms':>11} {'comm ms':>9} {'step ms':>9}")
    for case in result["runs"]["1"]["cases"]:
        for world in args.world_sizes:
            p = predict(result, case, world, link, cores)
            print(f"{case:<18} {world:>3} {p['compute'] * 1e3:>11.2f} {p['comm'] * 1e3:>9.2f} "
                  f"{p['step'] * 1e3:>9.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
