"""2-D mesh benchmark: the AlexNet training step as DDP over 4 ranks, group-parallel (GP) over
4, and a 2 × 2 (dp × gp) mesh (FSDP2 over dp), measured on this machine and projected to 2
nodes × 8 GPUs.

Usage (from the repository root, in the environment of ``pip install -e '.[test]'``)::

    python benchmarks/mesh.py --out /tmp/mesh-bench   # about 2 to 3 minutes on 2 cores
    python benchmarks/mesh.py --quick --out /tmp/q     # a tiny AlexNet: checks that it runs

**Measured.** Four gloo ranks on this machine, one thread each (on a 2-core machine four ranks
share two cores, and the output says so), run the case of issue 14, ``cases.py``'s
``alexnet_step`` (``mpgroups.models.AlexNet`` with its options there: 127×127, 100 classes,
dropout 0.5; cross-entropy and SGD with momentum; global batch 32), in three variants,
interleaved repetition by repetition as ``scaling.py`` does (warm-up, then every variant once
per repetition in a rotating order; medians and inclusive quartiles, slowest rank):

* ``ddp``: ``DistributedDataParallel`` around the plain AlexNet (``parallel=False``) over the
  4 ranks, 8 samples each (plain DDP, as ``scaling.py``'s: no ``match_global_batch``);
* ``gp``: the AlexNet split over the 4 ranks (towers and classifier, as in 2012), the whole
  batch of 32 on every rank;
* ``mesh``: ``init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "gp"))``, the AlexNet
  split over ``mesh["gp"]``, ``match_global_batch(model, mesh["dp"])``, FSDP2's
  ``fully_shard(model, mesh=mesh["dp"], reshard_after_forward=False)`` (DDP takes no DTensor
  parameters; this one gathers the parameters once a step and reduce-scatters the grads, the
  bytes of DDP's all-reduce), 16 samples per dp rank;

and ``single``, the one-process step (one thread, the whole batch; rank 0 while the others
wait), the baseline. For each: bytes per step per rank (mpgroups' collectives as
``CommCounter`` measures them and as the analytic model counts them; DDP's all-reduce: the
rank's parameter bytes) and parameters + SGD momentum per rank.

**Projected** to ``--nodes`` × ``--gpus-per-node`` (2 × 8 by default, P = 16): DDP over 16, GP
over the 8 GPUs of each node × FSDP2 over the 2 nodes (priced as DDP's all-reduce: the same
bytes), and GP over all 16 (across the link
between nodes). As in ``projection.project``, step = compute + communication:

* compute: the rank's own work in that layout on one thread of this machine (one core per
  rank), timed in one process over process groups that move no data (``loopback``, a fake
  2-D mesh for the mesh), less its time inside mpgroups' collectives: the plain model on
  its 32 / P samples for DDP; the model split over the gp group for GP, and for the mesh
  with ``match_global_batch`` over the dp group, on 32 / dp samples. DDP's own bucket
  copies are not in it. The one-process step (the plain model, whole batch, one thread)
  gives the speedup, and speedup / P the efficiency;
* communication: for the gp group, the data collectives ``comm_model.model_collectives``
  lists for rank 0 and the record exchanges (input checks, ``match_global_batch``'s batch
  sizes) counted in the compute run; for DDP one all-reduce of the rank's parameter bytes
  (its buckets taken as one, nothing overlapped with the backward). Each is priced α–β
  (``comm_model.collective_seconds``): on NVLink 4 when its ranks share a node, on the link
  between nodes (``comm_model.INTER_NODE_400G``: 10 µs, 50 GB/s) when they span nodes, the
  whole ring at that link's speed. Ranks are numbered node by node (ranks 0-7 on node 0),
  so a gp group of 8 and its teams stay inside a node and a dp group of the mesh spans both.
  ``SCENARIOS`` are three readings of "400 Gb/s between nodes".

Writes ``OUT/mesh.json`` and ``OUT/table.md`` (``--out``; by default ``benchmarks/out/mesh/``,
which git ignores; it refuses to write over a file git tracks) and prints the table.
``--from-json`` renders a stored ``mesh.json`` again (the projection recomputed from it).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import (  # noqa: E402
    CASES,
    QUICK,
    Case,
    analytic_collectives,
    build_parallel,
    build_single,
    make_input,
    step_and_forward,
)
from cases import labels as batch_labels  # noqa: E402
from comm_model import INTER_NODE_400G, LINKS, Link, collective_seconds  # noqa: E402
from harness import (  # noqa: E402
    barrier,
    max_over_ranks,
    mib,
    ms,
    ms_spread,
    optimizer_state_bytes,
    prepare_out,
    run_header,
    run_ranks,
    summary,
    without_collectives,
)
from harness import parser as benchmark_parser  # noqa: E402
from loopback import loopback_world  # noqa: E402

import mpgroups  # noqa: E402
from mpgroups import match_global_batch  # noqa: E402

FORMAT = 1  # of mesh.json
WORLD = 4  # ranks of the measured run
MESH = (2, 2)  # (dp, gp) of the measured mesh
VARIANTS = ("ddp", "gp", "mesh")
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "mesh"  # ignored by git
INSIDE_NODE = LINKS["nvlink4"]

# What "400 Gb/s between nodes" means for a collective whose ranks span nodes (its latency per
# step is the link's in all three). The default is the reading.
SCENARIOS = {
    "one_link": "every collective that spans nodes runs at one 400 Gb/s link's speed "
    "(busbw 50 GB/s), whatever else crosses at the same time",
    "shared_link": "one 400 Gb/s link joins the nodes: the collectives that cross it at the "
    "same time share it (the mesh's 8 dp all-reduces: 6.25 GB/s each)",
    "rails": "a 400 Gb/s NIC per GPU (8 rails, as a DGX H100): a ring over both nodes runs "
    "one channel per NIC of its ranks (16 ranks: min(8 × 50 GB/s, NVLink's 360 GB/s)); each "
    "dp pair of the mesh has its own NIC (50 GB/s)",
}
DEFAULT_SCENARIO = "one_link"


def _case(quick: bool) -> Case:
    """The issue-14 AlexNet step (``cases.py``'s ``alexnet_step``: its options, batch 32);
    ``--quick``: the tiny AlexNet of ``scaling.py --quick``, batch 16 (16 ranks need 1 each)."""
    if quick:
        return replace(QUICK["alexnet_step"], batch=16)
    return CASES["alexnet_step"]


def _layouts(nodes: int, per_node: int) -> dict[str, dict[str, tuple[int, int]]]:
    """(dp, gp) of each variant: measured on this machine, and projected."""
    world = nodes * per_node
    return {
        "measured": {"ddp": (WORLD, 1), "gp": (1, WORLD), "mesh": MESH},
        "projected": {"ddp": (world, 1), "gp": (1, world), "mesh": (nodes, per_node)},
    }


def _key(layout) -> str:
    dp, gp = layout
    return f"{dp}x{gp}"


def _label(variant: str, layout, result: dict, projected: bool = False) -> str:
    dp, gp = layout
    if variant == "single":
        return "one process (1 thread)"
    if variant == "ddp":
        return f"DDP over {dp}"
    if variant == "gp":
        return f"GP over {gp}" + (" (across nodes)" if projected else "")
    where = (" (a node)", " (nodes)") if projected else ("", "")
    # Runs stored before the parallel model held DTensor parameters wrapped it in DDP.
    data_parallel = result.get("mesh_data_parallel", "DDP")
    return f"mesh: GP over {gp}{where[0]} × {data_parallel} over {dp}{where[1]}"


def _own_rng(fn):
    """``fn`` run on a copy of the RNG state: a step only rank 0 takes (the one-process
    baseline) leaves the stream every rank shares (for GP dropout) where it was."""

    def run(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    return run


def _rows(dp_rank: int, dp: int, batch: int) -> slice:
    part = batch // dp
    return slice(dp_rank * part, (dp_rank + 1) * part)


# The measured run: 4 gloo ranks --------------------------------------------------------------


def _measure(rank: int, world: int, args) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    case = _case(args.quick)
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "gp"))
    x, labels = make_input(case, case.batch), batch_labels(case)
    dp_rank = mesh["dp"].get_local_rank()

    def step_of(model, rows: slice):
        return step_and_forward(model, x[rows], labels[rows])[0]

    # name -> (module whose parameters the rank holds, step, ranks that step)
    variants: dict[str, tuple] = {}
    if rank == 0:  # only rank 0 takes the one-process step: only it builds the model
        single = build_single(case)
        variants["single"] = (single, _own_rng(step_of(single, slice(None))), False)
    else:
        variants["single"] = (None, None, False)
    ddp = DistributedDataParallel(build_single(case))
    variants["ddp"] = (ddp.module, step_of(ddp, _rows(rank, WORLD, case.batch)), True)
    gp_model = build_parallel(case, dist.group.WORLD)
    variants["gp"] = (gp_model, step_of(gp_model, slice(None)), True)
    mesh_model = match_global_batch(build_parallel(case, mesh["gp"]), mesh["dp"])
    # A parallelized model's parameters are DTensors: FSDP2 composes with them, DDP does not.
    # reshard_after_forward=False holds them whole from forward to backward, as DDP would.
    dp_bytes = {"ddp": None, "mesh": mpgroups.local_parameter_bytes(mesh_model)}  # unsharded
    mesh_dp = fully_shard(mesh_model, mesh=mesh["dp"], reshard_after_forward=False)
    variants["mesh"] = (mesh_model, step_of(mesh_dp, _rows(dp_rank, MESH[0], case.batch)), True)

    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    total = args.warmup + args.reps
    for rep in range(total):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            _, step, everywhere = variants[name]
            barrier(WORLD)
            elapsed = 0.0
            if everywhere or rank == 0:
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
            elapsed = max_over_ranks(elapsed, WORLD)  # the same on every rank
            if rep >= args.warmup:
                times[name].append(elapsed)
        if rank == 0:
            print(f"  repetition {rep + 1}/{total} done", file=sys.stderr, flush=True)

    out: dict = {}
    gp_groups = {  # name -> (gp size, this rank's place in it, samples per rank)
        "gp": (WORLD, rank, case.batch),
        "mesh": (MESH[1], mesh["gp"].get_local_rank(), case.batch // MESH[0]),
    }
    for name in VARIANTS:
        model, step, _ = variants[name]
        record: dict = {"ddp_allreduce_bytes": 0, "gp_comm": None}
        if name in gp_groups:
            gp_size, gp_rank, batch = gp_groups[name]
            barrier(WORLD)
            with mpgroups.CommCounter() as comm:
                step()
            analytic = analytic_collectives(replace(case, batch=batch), gp_size, gp_rank)
            analytic_bytes = sum(c.nbytes for c in analytic)
            agree = max_over_ranks(float(comm.bytes() != analytic_bytes), WORLD) == 0
            record["gp_comm"] = {
                "measured_bytes": comm.bytes(),
                "analytic_bytes": analytic_bytes,
                "equal_on_every_rank": agree,
                "data_ops": comm.count(),
                "meta_ops": comm.count(kind="meta"),
            }
        if name != "gp":  # what the dp ranks sum: one all-reduce's (FSDP2: its two halves)
            record["ddp_allreduce_bytes"] = dp_bytes[name] or mpgroups.local_parameter_bytes(model)
        record["param_and_momentum_bytes"] = optimizer_state_bytes(model, step)
        out[name] = record
    if rank != 0:
        return {}
    single, step, _ = variants["single"]
    out["single"] = {
        "ddp_allreduce_bytes": 0,
        "gp_comm": None,
        "param_and_momentum_bytes": optimizer_state_bytes(single, step),
    }
    layouts = {"single": (1, 1), **_layouts(args.nodes, args.gpus_per_node)["measured"]}
    for name in names:
        out[name] |= {
            "layout": list(layouts[name]),
            "batch_per_rank": case.batch // layouts[name][0],
            "times": summary(times[name]),
        }
    return {
        "variants": {name: out[name] for name in names},
        "reps": len(times["ddp"]),
        "peak_rss_bytes_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# The one-process runs: each layout's rank-0 work without the wire ------------------------------


def _local_step(case: Case, layout: tuple[int, int], args) -> dict:
    """Rank 0's step in ``layout`` (dp, gp) on one thread, over groups that move no data:
    seconds (less the time inside mpgroups' collectives), its record exchanges, data bytes
    (measured and analytic) and parameter bytes."""
    from torch.distributed.device_mesh import init_device_mesh

    dp, gp = layout
    batch = case.batch // dp
    rows = _rows(0, dp, case.batch)
    x, labels = make_input(case, case.batch)[rows], batch_labels(case)[rows]
    world = dp * gp
    group = loopback_world(world) if gp > 1 else contextlib.nullcontext()
    with group as process_group:
        if gp == 1:  # DDP's rank: the plain model on its samples
            model = build_single(case)
        elif dp == 1:
            model = build_parallel(case, process_group)
        else:
            mesh = init_device_mesh("cpu", layout, mesh_dim_names=("dp", "gp"))
            model = match_global_batch(build_parallel(case, mesh["gp"]), mesh["dp"])
        step = step_and_forward(model, x, labels)[0]
        timed = without_collectives(step)
        times = []
        for rep in range(args.warmup + args.reps):
            start = time.perf_counter()
            excluded = timed()
            if rep >= args.warmup:
                times.append(time.perf_counter() - start - excluded)
        with mpgroups.CommCounter() as comm:
            step()
        param_bytes = mpgroups.local_parameter_bytes(model)
    analytic = analytic_collectives(replace(case, batch=batch), gp, 0) if gp > 1 else []
    meta = []
    for r in comm.records:
        if r.kind != "meta":
            continue
        # match_global_batch's exchange of batch sizes (one int64 per rank) runs over dp.
        axis = "dp" if dp > 1 and r.group_size == dp and r.nbytes == 8 * dp else "gp"
        meta.append({"op": r.op, "group_size": r.group_size, "nbytes": r.nbytes, "axis": axis})
    return {
        "layout": list(layout),
        "batch_per_rank": batch,
        "step": summary(times),
        "param_bytes": param_bytes,
        "measured_data_bytes": comm.bytes(),
        "collectives": [c.__dict__ for c in analytic],
        "meta": meta,
    }


def _local_runs(rank: int, world: int, args) -> dict:
    """Each layout's rank-0 work without the wire, in one process of one thread."""
    case = _case(args.quick)
    layouts = _layouts(args.nodes, args.gpus_per_node)
    wanted = [(1, 1), *layouts["measured"].values(), *layouts["projected"].values()]
    out = {}
    for layout in dict.fromkeys(wanted):
        out[_key(layout)] = _local_step(case, layout, args)
        print(f"  one process, layout dp×gp = {_key(layout)} done", file=sys.stderr,
              flush=True)  # fmt: skip
    return out


# Projection -------------------------------------------------------------------------------------


def _group_on_nodes(axis: str, group_size: int, layout, per_node: int) -> tuple[bool, int, int]:
    """For a collective over ``axis`` (rank 0's group, or a team of it): whether its ranks
    span nodes, how many of its ranks sit on one node, and how many such groups run it at
    the same time. A gp group is consecutive ranks, and so is a team inside it (aligned
    blocks of its size); the dp group of rank 0 is ranks 0, gp, 2·gp, ..."""
    dp, gp = layout
    world = dp * gp
    if axis == "gp":
        if group_size % per_node and per_node % group_size:
            raise ValueError(f"a group of {group_size} consecutive ranks on nodes of {per_node}")
        return group_size > per_node, min(group_size, per_node), world // group_size
    spans = (dp - 1) * gp >= per_node
    return spans, max(1, min(dp, per_node // gp)), gp


def _link(axis: str, group_size: int, layout, topology: dict, scenario: str) -> tuple[Link, bool]:
    """The link a collective runs at, and whether it spans nodes, under ``scenario``."""
    per_node = topology["gpus_per_node"]
    spans, on_one_node, concurrent = _group_on_nodes(axis, group_size, layout, per_node)
    inside = Link(**topology["inside"])
    if not spans:
        return inside, False
    between = Link(**topology["between"])
    busbw = between.busbw_bytes_per_s
    if scenario == "shared_link":
        busbw /= concurrent
    elif scenario == "rails":
        # One channel per NIC of the group's ranks on a node (the node's NICs shared by the
        # groups that cross at once); the ring's hops inside a node run on NVLink.
        rails = max(1, min(on_one_node, per_node // concurrent))
        busbw *= rails
        if on_one_node > 1:
            busbw = min(busbw, inside.busbw_bytes_per_s)
    elif scenario != "one_link":
        raise ValueError(f"unknown scenario {scenario!r}")
    return Link(f"{between.name} ({scenario})", between.latency_s, busbw), True


def project_mesh(result: dict) -> dict:
    """Step time of each projected layout, under each scenario, from a stored run."""
    topology = result["topology"]
    world = topology["nodes"] * topology["gpus_per_node"]
    local = result["local"]
    one_process = local["1x1"]["step"]["median"]
    rows = []
    for scenario in SCENARIOS:
        for variant, layout in topology["projected"].items():
            layout = tuple(layout)
            run = local[_key(layout)]
            priced = [("gp", c["op"], c["group_size"], c["nbytes"]) for c in run["collectives"]]
            priced += [(m["axis"], m["op"], m["group_size"], m["nbytes"]) for m in run["meta"]]
            if layout[0] > 1:  # DDP: one all-reduce of the rank's gradients
                priced.append(("dp", "all_reduce", layout[0], run["param_bytes"]))
            n_data = len(run["collectives"])  # then the record exchanges, then DDP's
            seconds = {False: 0.0, True: 0.0}
            moved = {False: 0, True: 0}
            exchanges = 0.0
            for i, (axis, op, group_size, nbytes) in enumerate(priced):
                link, spans = _link(axis, group_size, layout, topology, scenario)
                t = collective_seconds(op, group_size, nbytes, link)
                seconds[spans] += t
                moved[spans] += nbytes
                if n_data <= i < n_data + len(run["meta"]):
                    exchanges += t
            compute = run["step"]["median"]
            comm = seconds[False] + seconds[True]
            step = compute + comm
            rows.append({
                "scenario": scenario,
                "variant": variant,
                "label": _label(variant, layout, result, projected=True),
                "layout": list(layout),
                "batch_per_rank": run["batch_per_rank"],
                "compute": compute,
                "comm_inside_node": seconds[False],
                "comm_between_nodes": seconds[True],
                "comm": comm,
                "comm_record_exchanges": exchanges,
                "step": step,
                "one_process": one_process,
                "speedup": one_process / step,
                "efficiency": one_process / step / world,
                "bytes_inside_node": moved[False],
                "bytes_between_nodes": moved[True],
                "param_and_momentum_bytes": 2 * run["param_bytes"],
            })  # fmt: skip
    return {"world": world, "default_scenario": DEFAULT_SCENARIO, "rows": rows}


# Output -----------------------------------------------------------------------------------------


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def render(result: dict) -> str:
    """The Markdown report of a run (``result["projection"]`` recomputed from it)."""
    measured = result["measured"]
    machine = result["machine"]
    topology = result["topology"]
    cores = machine["cores"]
    lines = [
        "# 2-D mesh: the AlexNet training step as DDP, GP and a dp × gp mesh",
        "",
        f"Case: {result['case']['description']}; global batch {result['case']['batch']}.",
        f"Command: `{result['command']}`. Took {result['seconds']:.0f} s"
        + (" (`--quick`: tiny sizes, timings meaningless)." if result["quick"] else "."),
        f"Machine: {cores} cores ({machine['logical_cpus']} logical), {machine['platform']}, "
        f"torch {machine['torch']}, mpgroups {machine['mpgroups']}.",
    ]
    commit = result.get("commit")
    if commit:
        dirty = ", with uncommitted changes" if commit["uncommitted_changes"] else ", clean"
        lines.append(f"Commit: {commit['sha'][:7]}{dirty}.")
    load = result["load_average"]
    lines += [
        f"Load average (1, 5, 15 min): at the start {_load(load['start'])}; after the measured "
        f"run {_load(load['after_measured'])}; at the end {_load(load['end'])}.",
        "",
        f"## Measured: {WORLD} ranks on this machine",
        "",
        f"**{measured['note']}** gloo over loopback, one thread per rank; medians of "
        f"{measured['reps']} timed repetitions after {result['warmup']} warm-up, interleaved "
        "(slowest rank; inclusive quartiles). *Local work*: the rank's own step on one thread "
        "with no wire (one process, no other rank running); *GP MiB*: mpgroups' collectives "
        "per step per rank (measured, checked against the analytic count on every rank); "
        "*DDP MiB*: DDP's all-reduce (the rank's parameters).",
        "",
        "| variant | dp × gp | batch per rank | step ms (p25–p75) | vs one process "
        "| vs DDP | local work ms | GP MiB | DDP MiB | params+momentum MiB per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    variants = measured["variants"]
    single = variants["single"]["times"]["median"]
    ddp = variants["ddp"]["times"]["median"]
    for name in ("single", *VARIANTS):
        v = variants[name]
        t = v["times"]
        layout = tuple(v["layout"])
        gp_comm = v["gp_comm"]
        gp_mib = "–"
        if gp_comm is not None:
            same = "" if gp_comm["equal_on_every_rank"] else " (≠ analytic!)"
            gp_mib = mib(gp_comm["measured_bytes"]) + same
        ddp_mib = mib(v["ddp_allreduce_bytes"]) if v["ddp_allreduce_bytes"] else "–"
        local = result["local"][_key(layout)]["step"]["median"]
        label = _label(name, layout, result)
        lines.append(
            f"| {label} | {layout[0]} × {layout[1]} | {v['batch_per_rank']} | "
            f"{ms_spread(t)} | "
            f"{single / t['median']:.2f}× | {ddp / t['median']:.2f}× | {ms(local)} | "
            f"{gp_mib} | {ddp_mib} | {mib(v['param_and_momentum_bytes'])} |"
        )
    projection = project_mesh(result)
    world = projection["world"]
    inside, between = Link(**topology["inside"]), Link(**topology["between"])
    lines += [
        "",
        f"## Projected: {topology['nodes']} nodes × {topology['gpus_per_node']} GPUs (P = {world})",
        "",
        f"Step = compute + communication. Compute: the rank's own work in that layout on one "
        f"thread of this machine (one core per rank, as `projection.py`; not a GPU's speed), "
        f"over process groups that move no data, less the time in mpgroups' collectives. "
        f"Communication, α–β (ring: (P-1) steps, 2(P-1) for an all-reduce): inside a node "
        f"{inside.name}, α = {inside.latency_s * 1e6:.0f} µs, busbw = "
        f"{inside.busbw_bytes_per_s / 1e9:.0f} GB/s; spanning nodes {between.name}, α = "
        f"{between.latency_s * 1e6:.0f} µs, busbw = {between.busbw_bytes_per_s / 1e9:.0f} "
        f"GB/s per collective ({DEFAULT_SCENARIO}: {SCENARIOS[DEFAULT_SCENARIO]}). GP: the "
        "analytic collectives of rank 0 and its record exchanges; DDP: one all-reduce of the "
        "rank's parameter bytes, not overlapped with the backward. *Record exchanges*: the "
        "input checks' (none with `MPGROUPS_CHECKS=0`) and `match_global_batch`'s batch sizes, "
        "tiny: latency only. Ranks numbered node by node. Speedup: the one-process step "
        f"({ms(projection['rows'][0]['one_process'])} ms, one thread) / the step; "
        "efficiency: speedup / P.",
        "",
        "| variant | dp × gp | batch per rank | compute ms | comm in node ms | comm between "
        "nodes ms | of which record exchanges ms | step ms | speedup | efficiency "
        "| MiB in node | MiB between nodes | params+momentum MiB per rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_scenario: dict[str, dict[str, dict]] = {}
    for row in projection["rows"]:
        by_scenario.setdefault(row["scenario"], {})[row["variant"]] = row
    for row in by_scenario[DEFAULT_SCENARIO].values():
        dp, gp = row["layout"]
        lines.append(
            f"| {row['label']} | {dp} × {gp} | {row['batch_per_rank']} | "
            f"{ms(row['compute'])} | {row['comm_inside_node'] * 1e3:.2f} | "
            f"{row['comm_between_nodes'] * 1e3:.2f} | {row['comm_record_exchanges'] * 1e3:.2f} | "
            f"{ms(row['step'])} | "
            f"{row['speedup']:.2f}× | {row['efficiency']:.0%} | "
            f"{mib(row['bytes_inside_node'])} | {mib(row['bytes_between_nodes'])} | "
            f"{mib(row['param_and_momentum_bytes'])} |"
        )
    lines += [
        "",
        "The network between nodes, three readings (communication ms / step ms):",
        "",
        "| variant | " + " | ".join(SCENARIOS) + " |",
        "|---|" + "---|" * len(SCENARIOS),
    ]
    for variant in VARIANTS:
        cells = []
        for scenario in SCENARIOS:
            row = by_scenario[scenario][variant]
            cells.append(f"{row['comm'] * 1e3:.2f} / {ms(row['step'])}")
        label = by_scenario[DEFAULT_SCENARIO][variant]["label"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- `{name}`: {text}." for name, text in SCENARIOS.items()]
    return "\n".join(lines)


def _write(result: dict, out: Path, with_json: bool = True) -> str:
    """``OUT/table.md`` and (``with_json``) ``OUT/mesh.json``; returns the table."""
    json_path, table_path = out / "mesh.json", out / "table.md"
    prepare_out(out, ["mesh.json", "table.md"] if with_json else ["table.md"])
    table = render(result)
    if with_json:
        json_path.write_text(json.dumps(result, indent=1))
    table_path.write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="mesh.json and table.md", reps=9, timeout=900,
        quick="tiny AlexNet, 2 repetitions", renders="table.md",
    )  # fmt: skip
    parser.add_argument("--nodes", type=int, default=2, help="of the projection")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="of the projection")
    parser.add_argument(
        "--between-busbw", type=float, default=None,
        help="GB/s of bus bandwidth between nodes (default: one 400 Gb/s NIC, 50)",
    )  # fmt: skip
    parser.add_argument(
        "--between-latency", type=float, default=None,
        help="µs per ring step between nodes (default 10)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json is not None:
        print(_write(json.loads(args.from_json.read_text()), args.out, with_json=False))
        return 0
    if args.quick:
        args.reps, args.warmup = 2, 1
    case = _case(args.quick)
    world = args.nodes * args.gpus_per_node
    for ranks in (WORLD, world, args.nodes):
        if case.batch % ranks:
            parser.error(f"the global batch {case.batch} does not split over {ranks} ranks")
    prepare_out(args.out, ["mesh.json", "table.md"])

    started = time.time()
    load = {"start": list(os.getloadavg())}
    oversubscribed = WORLD > args.cores
    note = (
        f"{WORLD} ranks on {args.cores} cores: {WORLD // args.cores if oversubscribed else 1} "
        "ranks share each core, so these times measure oversubscription as much as the "
        "variants, and say little about 4 devices."
        if oversubscribed
        else f"{WORLD} ranks on {args.cores} cores, one thread each."
    )
    print(f"measured: {note}", file=sys.stderr, flush=True)
    measured = run_ranks(_measure, WORLD, args, timeout=args.timeout)
    load["after_measured"] = list(os.getloadavg())
    print("one-process runs (compute of each layout, one thread)", file=sys.stderr, flush=True)
    local = run_ranks(_local_runs, 1, args, timeout=args.timeout)
    load["end"] = list(os.getloadavg())
    layouts = _layouts(args.nodes, args.gpus_per_node)
    between = INTER_NODE_400G
    if args.between_busbw is not None or args.between_latency is not None:
        latency = between.latency_s if args.between_latency is None else args.between_latency * 1e-6
        busbw = (
            between.busbw_bytes_per_s if args.between_busbw is None else args.between_busbw * 1e9
        )
        between = Link("link between nodes (given)", latency, busbw)
    result = {
        **run_header(argv, args.cores),
        "format": FORMAT,
        "mesh_data_parallel": "FSDP2",
        "quick": args.quick,
        "reps": args.reps,
        "warmup": args.warmup,
        "case": {
            "name": case.name,
            "description": case.description,
            "batch": case.batch,
            "size": case.size,
            "alexnet": case.alexnet,
        },
        "load_average": load,
        "measured": {
            "ranks": WORLD,
            "threads_per_rank": 1,
            "cores": args.cores,
            "oversubscribed": oversubscribed,
            "note": note,
            **measured,
        },
        "local": local,
        "topology": {
            "nodes": args.nodes,
            "gpus_per_node": args.gpus_per_node,
            "projected": {k: list(v) for k, v in layouts["projected"].items()},
            "inside": INSIDE_NODE.__dict__,
            "between": between.__dict__,
            "scenarios": SCENARIOS,
        },
        "seconds": 0.0,
    }
    result["projection"] = project_mesh(result)
    result["seconds"] = time.time() - started
    print(_write(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
