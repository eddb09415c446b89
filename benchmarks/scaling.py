"""Scaling study: group-parallel grouped convolution vs one process and vs data parallel.

Usage (from the repository root, in the environment of ``pip install -e '.[test]'``)::

    python benchmarks/scaling.py --out /tmp/run        # all cases, world sizes 1 2 4
    python benchmarks/scaling.py --cases alexnet_towers --world-sizes 1 2 --reps 9
    python benchmarks/scaling.py --quick --out /tmp/q  # tiny sizes: checks that it runs

For each world size P the script spawns P gloo processes on this machine with
``max(1, cores // P)`` threads each. In every case the variants run interleaved, repetition by
repetition, so that noise on the machine hits all of them alike (``--reps`` repetitions, more
for a short step, so that its slowest variant runs ``--min-time`` seconds in all):

* ``single_t``: one process with the threads of one rank (rank 0 while the others wait);
* ``single_T``: one process with the threads of all ranks together;
* ``group_parallel``: the case's layers built with mpgroups over the P ranks (AlexNet: split
  as in 2012; the ResNeXt block: ``plan="auto"``);
* ``group_parallel_towers`` (AlexNet step: the classifier replicated) and
  ``group_parallel_dropin`` (ResNeXt block: only the grouped conv parallel): other plans of
  the same model, each with its own bytes, share in collectives and memory;
* ``ddp``: ``DistributedDataParallel`` around the single-device model, global batch split
  (not for a batch-1 inference case: DDP cannot split a batch of one);
* ``group_parallel_nochecks`` (AlexNet step): the same with ``MPGROUPS_CHECKS=0``;
* ``local``: the group-parallel model over a group that moves no data (``loopback``), on
  every rank at once, less its time inside collectives: each rank's own work without the
  wire (the compute of the projection).

An inference case (batch 1) times an eval forward under ``torch.no_grad`` (its "step" is that
forward). For every group-parallel variant the run records the data bytes per step (measured
by ``CommCounter`` and from the analytic model), the share of the step spent inside
collectives (in all and per op: ``CommCounter.seconds()`` times each gloo call), and
parameters + SGD momentum per rank against DDP's.

Writes ``OUT/scaling.json``, ``OUT/table.md``, ``OUT/scaling.png`` and ``OUT/comm_share.png``
(``--out``; by default ``benchmarks/out/``, which git ignores), and prints the table and the
projection's predicted vs measured step times. ``report.py`` renders a stored JSON again.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import (  # noqa: E402
    CASES,
    MAIN,
    QUICK,
    Case,
    analytic_collectives,
    build_parallel,
    build_single,
    labels,
    make_input,
    step_and_forward,
)
from harness import (  # noqa: E402
    barrier,
    max_over_ranks,
    optimizer_state_bytes,
    prepare_out,
    run_header,
    run_ranks,
    summary,
    without_collectives,
)
from harness import parser as benchmark_parser  # noqa: E402
from loopback import loopback_group, loopback_world  # noqa: E402

import mpgroups  # noqa: E402
from mpgroups.comm.checks import RECORD_SIZE, check_across_ranks, fingerprint  # noqa: E402

# The link is timed with the very calls the layers make.
from mpgroups.comm.collectives import _all_gather_single, _reduce_scatter_single  # noqa: E402

PROJECTED_WORLD_SIZES = (2, 4, 8)
# Rank 0's local work is timed at these P (one thread, no wire); P = 1 is the one-process
# step the projection's speedup and efficiency are relative to.
LOCAL_WORLD_SIZES = (1, *PROJECTED_WORLD_SIZES)
FORMAT = 2  # of scaling.json: 2 adds variants, inference cases, per-op shares, local P = 1
MAX_REPS_FACTOR = 6
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"  # ignored by git: a run never writes over the published results


def _run_case(case: Case, world: int, rank: int, threads: int, cores: int, args, loopback) -> dict:
    """Time ``case``'s variants at ``world`` ranks; ``loopback`` (a group of the same ranks
    that moves no data; ``None`` at one rank) carries the ``local`` variant."""
    process_group = dist.group.WORLD if world > 1 else None
    single = build_single(case)
    x_full = make_input(case, case.batch)
    batch_labels = labels(case)

    def closures(model, x, y=batch_labels):
        return step_and_forward(model, x, y, case.inference)

    variants = {}  # name -> (all ranks?, threads, step, forward)
    variants["single_t"] = (False, threads, *closures(single, x_full))
    total = min(cores, world * threads)
    if total != threads:
        variants["single_T"] = (False, total, *closures(single, x_full))
    gp_models = {}
    for name in case.gp_variants:
        gp_models[name] = build_parallel(case, process_group, name)
        x_gp = make_input(case, case.batch, gp_models[name])
        variants[name] = (True, threads, *closures(gp_models[name], x_gp))
    if case.is_step and world > 1:
        gp_step, gp_forward = variants[MAIN][2:]

        def without_checks(fn):
            def run():
                os.environ["MPGROUPS_CHECKS"] = "0"
                try:
                    fn()
                finally:
                    os.environ.pop("MPGROUPS_CHECKS")

            return run

        variants["group_parallel_nochecks"] = (
            True, threads, without_checks(gp_step), without_checks(gp_forward),
        )  # fmt: skip
    ddp = None
    if world > 1:
        # Each rank's own work without the wire, on every rank at once (the projection's
        # compute): what it costs when the ranks share this machine's cores and memory
        # bandwidth, timed alongside the rest so that the machine's noise hits it alike.
        local_model = build_parallel(case, loopback)
        x_local = make_input(case, case.batch, local_model)
        local_fns = closures(local_model, x_local)
        variants["local"] = (True, threads, *map(without_collectives, local_fns))
        if not case.inference:  # DDP cannot split a batch of one
            local = case.batch // world
            ddp = DistributedDataParallel(build_single(case))
            y_local = (
                batch_labels[rank * local : (rank + 1) * local]
                if batch_labels is not None
                else None
            )
            variants["ddp"] = (
                True,
                threads,
                *closures(ddp, x_full[rank * local : (rank + 1) * local], y_local),
            )

    times = {name: {"step": [], "forward": []} for name in variants}
    names = list(variants)
    # An inference case's step is its forward: timed once, reported as both.
    phases = (("step", 2),) if case.inference else (("step", 2), ("forward", 3))
    for phase, index in phases:
        last_warmup, rep, reps = [], 0, args.reps
        while rep < args.warmup + reps:
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                everywhere, nthreads, *fns = variants[name]
                barrier(world)
                elapsed = 0.0
                if everywhere or rank == 0:
                    torch.set_num_threads(nthreads)
                    start = time.perf_counter()
                    excluded = fns[index - 2]() or 0.0
                    elapsed = time.perf_counter() - start - excluded
                    torch.set_num_threads(threads)
                elapsed = max_over_ranks(elapsed, world)  # the same on every rank
                if rep >= args.warmup:
                    times[name][phase].append(elapsed)
                elif rep == args.warmup - 1:  # the first calls are slow (first-touch memory)
                    last_warmup.append(elapsed)
            rep += 1
            if rep == args.warmup:
                min_time = args.forward_min_time if phase == "forward" else args.min_time
                reps = _timed_reps(max(last_warmup), args, min_time)
    if case.inference:
        for t in times.values():
            t["forward"] = t["step"]
    reps_timed = {phase: len(times[names[0]][phase]) for phase in ("step", "forward")}

    result = {
        "description": case.description,
        "batch": case.batch,
        "inference": case.inference,
        "reps": reps_timed,
        "times": {n: {p: summary(v) for p, v in t.items()} for n, t in times.items()},
    }
    # Communication of each group-parallel model: bytes per step, time in collectives.
    comm = {name: _comm_record(case, name, variants[name][2], world, rank) for name in gp_models}
    result["comm"] = comm.pop(MAIN)
    if comm:
        result["variant_comm"] = comm
    if world == 1 and rank == 0:
        local = {str(p): _local_compute_time(case, p, args) for p in LOCAL_WORLD_SIZES}
        result["local_compute_1thread"] = {p: t for p, (t, _) in local.items()}
        result["local_meta_ops_per_step"] = {p: ops for p, (_, ops) in local.items()}
        # The collectives priced at each projected P, stored with the run: a stored JSON is
        # projected with the model it measured, whatever the cases say later.
        result["projected_collectives"] = {
            str(p): [c.__dict__ for c in analytic_collectives(case, p, 0)]
            for p in PROJECTED_WORLD_SIZES
        }
    if world > 1:
        result["local_compute_concurrent"] = result["times"]["local"]["step"]["median"]
        result["check_seconds"] = _check_seconds(world)
    if case.inference:
        # No optimizer for inference: the parameters per rank.
        memory = {name: mpgroups.local_parameter_bytes(m) for name, m in gp_models.items()}
        memory["single"] = mpgroups.local_parameter_bytes(single)
        result["parameter_bytes"] = memory
    else:
        # Memory per rank: parameters + optimizer state (SGD momentum), and resident size.
        memory = {
            name: optimizer_state_bytes(m, variants[name][2]) for name, m in gp_models.items()
        }
        if ddp is not None:
            memory["ddp"] = optimizer_state_bytes(ddp.module, variants["ddp"][2])
        memory["single"] = optimizer_state_bytes(single, variants["single_t"][2])
        result["param_and_optimizer_bytes"] = memory
    result["rss_bytes"] = psutil.Process().memory_info().rss
    result["ddp_allreduce_bytes"] = mpgroups.local_parameter_bytes(single) if ddp is not None else 0
    return result


def _comm_record(case: Case, variant: str, step, world: int, rank: int) -> dict:
    """Bytes per step of ``variant`` (measured and analytic, with the analytic list) and the
    share of its step spent inside collectives, in all and per op (medians of 5 steps)."""
    shares, check_shares, op_shares = [], [], []
    for _ in range(5):
        barrier(world)
        with mpgroups.CommCounter() as comm:
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
        shares.append(comm.seconds() / elapsed)
        op_shares.append({op: comm.seconds(op) / elapsed for op in comm.ops()})
        check_shares.append(max_over_ranks(comm.seconds(kind="check") / elapsed, world))
    ops = sorted({op for found in op_shares for op in found})
    analytic = analytic_collectives(case, world, rank, variant)
    return {
        "measured_bytes": comm.bytes(),
        "analytic_bytes": sum(c.nbytes for c in analytic),
        "collectives": [c.__dict__ for c in analytic],
        "meta_ops_per_step": comm.count(kind="meta"),
        "share_of_step": statistics.median(shares),
        "share_by_op": {op: statistics.median(s.get(op, 0.0) for s in op_shares) for op in ops},
        "checks_share_of_step": statistics.median(check_shares),
    }


def _timed_reps(slowest_seconds: float, args, min_time: float | None = None) -> int:
    """Repetitions to time after the warm-up: ``args.reps``, or more for a short step.

    Enough that the slowest variant (by its last warm-up time, slowest rank) runs
    ``min_time`` seconds in all (default ``args.min_time``; the forward phase passes
    ``args.forward_min_time``), at most ``MAX_REPS_FACTOR × args.reps``: a step of tens of
    milliseconds is otherwise timed in well under a second, and one noisy spell of this host
    moves its median by a fifth. The inputs are the same on every rank, and so is the count.
    """
    if slowest_seconds <= 0:
        return args.reps
    min_time = args.min_time if min_time is None else min_time
    wanted = math.ceil(min_time / slowest_seconds)
    return min(max(args.reps, wanted), MAX_REPS_FACTOR * args.reps)


def _check_seconds(world: int, calls: int = 30) -> float:
    """Seconds of one input check (record, exchange, comparison), ranks in step, slowest rank.

    Inside a step the time in the checks also absorbs waiting for a slower rank, which
    without the checks would be spent in the next collective instead; this times the check.
    """
    x = torch.zeros(8, 64, 13, 13)
    barrier(world)
    start = time.perf_counter()
    for call in range(calls):
        check_across_ranks(
            x, process_group=dist.group.WORLD, layer="benchmark",
            layer_id=fingerprint("benchmark"), call=call, problem=None, channel_dim=1,
            expected_channels=[64] * world, channels_note=["replicated input"] * world,
        )  # fmt: skip
    return max_over_ranks((time.perf_counter() - start) / calls, world)


def _local_compute_time(case: Case, world: int, args) -> tuple[float, int]:
    """One thread, no communication: rank 0's share of a step at ``world`` ranks, and the
    metadata exchanges (input checks) of that step.

    The group-parallel model over a ``world``-rank group that moves no data, with this
    process as its rank 0 (for a process without a process group), less the time inside
    its collectives; for the AlexNet step that includes everything else every rank runs
    (pools, dropout masks, the SGD step). At ``world = 1`` it is the one-process step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        with loopback_world(world) as process_group:
            model = build_parallel(case, process_group)
            x = make_input(case, case.batch, model)
            closures = step_and_forward(model, x, labels(case), case.inference)
            step = without_collectives(closures[0])
            for rep in range(args.warmup + args.reps):
                start = time.perf_counter()
                excluded = step()
                if rep >= args.warmup:
                    times.append(time.perf_counter() - start - excluded)
            with mpgroups.CommCounter() as comm:
                closures[0]()
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times), comm.count(kind="meta")


def _link_sizes(world: int, cases: list[Case]) -> dict[tuple[str, int], list[int]]:
    """Message sizes to time per (op, group size): those the projection prices at ``world``.

    Each collective of the cases (``analytic_collectives``: op, group size, bytes), and the
    input check's record exchange (an all-gather of ``world`` records), whose size, the
    smallest, anchors the fitted latency. An op that no case moves data with gets one
    1 MiB message besides, so that its line has a slope.
    """
    record = world * RECORD_SIZE * 8
    sizes = {("all_gather", world): {record}}
    for case in cases:
        for variant in case.gp_variants:
            for c in analytic_collectives(case, world, 0, variant):
                sizes.setdefault((c.op, c.group_size), {record}).add(c.nbytes)
    for found in sizes.values():
        if len(found) == 1:
            found.add(2**20)
    return {key: sorted(found) for key, found in sorted(sizes.items())}


def _link_call(op: str, shard: torch.Tensor, full: torch.Tensor, process_group):
    """One collective as the layers make it, into a fresh output tensor (an all-reduce: in
    place on a buffer just written, as the layers copy the partial sums into one first)."""
    if op == "all_gather":
        return lambda: _all_gather_single(torch.empty_like(full), shard, group=process_group)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=process_group)
    return lambda: _reduce_scatter_single(torch.empty_like(shard), full, group=process_group)


def _measure_link(world: int, cases: list[Case], args) -> dict:
    """gloo's time for each message the projection prices, for the α–β fits.

    The sizes are those of :func:`_link_sizes`: the line is fitted where it is used (gloo's
    bandwidth on this machine differs between a 8 MB message and a 32 MB one by 2×, too
    much for one line through a generic sweep of sizes). Measured the way the layers call
    them: a fresh output tensor on every call (its pages are first touched inside the
    collective), and a team collective running in every team at once. Every repetition runs
    each collective at every size, so that a noisy spell on the machine hits all sizes alike
    rather than the few timed during it; medians of the repetitions. Returns
    ``{"all_gather/4": [[bytes, seconds], ...], ...}`` (bytes in CommCounter's convention:
    the gathered tensor, the reduce-scatter's input, or the all-reduced tensor).
    """
    calls = []  # (key, bytes, call)
    team_process_groups = {world: dist.group.WORLD}  # one set of subgroups per team size
    for (op, size), sizes in _link_sizes(world, cases).items():
        if size not in team_process_groups:
            team_process_groups[size] = dist.new_subgroups(size)[0]
        process_group = team_process_groups[size]
        for nbytes in sizes:
            if op == "all_reduce":  # its "size" is the tensor itself
                full = torch.zeros(max(1, nbytes // 4))
                shard = full
                calls.append((f"{op}/{size}", nbytes, _link_call(op, shard, full, process_group)))
                continue
            shard = torch.zeros(max(1, nbytes // (4 * size)))
            full = torch.zeros(size * shard.numel())
            calls.append(
                (f"{op}/{size}", full.numel() * 4, _link_call(op, shard, full, process_group))
            )
    times = {(key, nbytes): [] for key, nbytes, _ in calls}
    for rep in range(args.warmup + max(args.reps, 9)):
        for key, nbytes, call in calls:
            dist.barrier()
            start = time.perf_counter()
            call()
            elapsed = max_over_ranks(time.perf_counter() - start, world)
            if rep >= args.warmup:
                times[key, nbytes].append(elapsed)
    out = {}
    for (key, nbytes), runs in times.items():
        out.setdefault(key, []).append((nbytes, statistics.median(runs)))
    return out


def _rank(rank: int, world: int, args) -> dict:
    """One rank's measurements at ``world`` ranks (rank 0's are the run's)."""
    cores = args.cores
    threads = max(1, cores // world)
    known = QUICK if args.quick else CASES
    cases = [known[name] for name in args.cases or list(known)]
    out = {"threads_per_rank": threads, "oversubscribed": world * threads > cores, "cases": {}}
    loopback = loopback_group(dist.group.WORLD) if world > 1 else None
    for case in cases:
        out["cases"][case.name] = _run_case(case, world, rank, threads, cores, args, loopback)
        if rank == 0:
            print(f"  P={world} {case.name} done", file=sys.stderr, flush=True)
    if world > 1:
        out["link"] = _measure_link(world, cases, args)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="scaling.json, table.md and the plots", reps=7,
        timeout=3600, quick="tiny sizes, 2 repetitions",
    )  # fmt: skip
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cases", nargs="+", default=None, help=f"of {', '.join(CASES)}")
    parser.add_argument(
        "--min-time", type=float, default=4.0,
        help="seconds to time the slowest variant of a case for, in more repetitions if its "
        "step is short (up to 6 × --reps)",
    )  # fmt: skip
    parser.add_argument(
        "--forward-min-time", type=float, default=2.0,
        help="the same for the forward-only phase of a training case (the table's 'GP fwd' "
        "column; an inference case's forward is its step and gets --min-time)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.min_time, args.forward_min_time = 2, 1, 0.0, 0.0
    known = QUICK if args.quick else CASES
    unknown = [c for c in args.cases or [] if c not in known]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(known)}")
    if 1 not in args.world_sizes:
        parser.error("--world-sizes must include 1 (the reference for the projection)")

    from projection import validate
    from report import write_plots, write_table

    started = time.time()
    runs = {}
    for world in args.world_sizes:
        note = " (ranks outnumber cores: they share them)" if world > args.cores else ""
        print(f"world size {world}: {max(1, args.cores // world)} thread(s) per rank{note}",
              file=sys.stderr, flush=True)  # fmt: skip
        runs[world] = run_ranks(
            _rank, world, args, threads=max(1, args.cores // world), timeout=args.timeout,
            what=f"benchmark at world size {world}",
        )  # fmt: skip
    result = {
        **run_header(argv, args.cores),
        "record_size": RECORD_SIZE,
        "format": FORMAT,
        "quick": args.quick,
        "reps": args.reps,
        "min_time": args.min_time,
        "forward_min_time": args.forward_min_time,
        "max_reps": MAX_REPS_FACTOR * args.reps,
        "warmup": args.warmup,
        "runs": {str(k): v for k, v in runs.items()},
        "seconds": time.time() - started,
    }
    result["projection"] = validate(result)
    out = args.out
    prepare_out(out, ["scaling.json", "table.md", "scaling.png", "comm_share.png"])
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    table = write_table(result, out / "table.md")
    write_plots(result, out)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
