"""Profile of the AlexNet training step at P = 2: does the work halve, and what does sharing the
machine cost?

Usage (from the repository root, in the environment of ``pip install -e '.[test]'``)::

    python benchmarks/profile_step.py --out /tmp/profile   # about 2 minutes on 2 cores
    python benchmarks/profile_step.py --quick --out /tmp/q # a tiny AlexNet: checks that it runs

Two gloo processes, one thread each, run ``cases.py``'s ``alexnet_step`` case (the model,
input, labels and SGD-momentum optimizer of ``scaling.py``: ``mpgroups.models.AlexNet``,
127×127, batch 32, 100 classes, dropout 0.5) split into phases, each timed on rank 0:

* ``features``: forward of ``features`` + ``flatten`` (conv1..pool5), and later their backward;
* ``classifier``: forward of the classifier on the features (detached there, so that the two
  halves of the backward can be timed apart), cross-entropy and its backward;
* ``sgd``: ``optimizer.step()`` (SGD with momentum 0.9, as ``scaling.py``) and
  ``zero_grad(set_to_none=True)``.

The same work in five variants, interleaved repetition by repetition (a rotating order; a
barrier between variants), medians and inclusive quartiles:

* ``a_one_process``: the plain model (``parallel=False``), whole batch, on rank 0 while rank 1
  waits in a barrier: ``scaling.py``'s ``1p×t``;
* ``b_gp``: the model split as in 2012 over both ranks (gloo), both running: ``scaling.py``'s
  group-parallel step at P = 2;
* ``c_rank0_alone``: rank 0's share of ``b_gp`` with the other core idle: the same P = 2 model
  built over a 2-rank process group that moves no data (``loopback``: PyTorch's ``fake``
  backend; its collectives return at once with this rank's own data in the receive buffer),
  run on rank 0 while rank 1 waits in a barrier. It runs mpgroups' own code with rank 0's
  shapes (every slice, copy, input check, the whole-tensor dropout masks); nothing crosses to
  the other process. This is the compute ``projection.project`` takes for one core per rank;
* ``d_rank0_beside_rank1``: the same loopback model on both ranks at once (each its own
  share, nothing exchanged): rank-0 work while the other core does rank 1's, as
  ``scaling.py``'s ``local`` (which reports the slower rank), the compute of its α–β check;
* ``e_one_process_twice``: the plain one-process step on both ranks at once (no
  communication): does the *unsplit* step slow down when the other core runs the same?

Every phase is reported without its time inside mpgroups' collectives (``CommCounter``: data
and metadata exchanges, the wait for the other rank included); that time is its own column.
So ``c`` against ``a`` says whether rank 0's work halves, ``d`` against ``c`` what it costs
that the other core works at the same time (shared memory bandwidth, caches, the host), ``b``
against ``d`` what the wire and the waits add, and ``e`` against ``a`` whether the same holds
without mpgroups. Two micro-benchmarks separate memory bandwidth from the cores themselves:
a 256 MiB copy (memory-bound) and a cache-resident 256×256 matmul (compute-bound), each alone
on rank 0 and on both ranks at once. During the rank-0-only variants the CPU time of rank 1's
process is recorded (its core should be idle: a waiting gloo barrier must not spin).

Writes ``OUT/profile.json`` and ``OUT/profile.md`` (``--out``; by default
``benchmarks/out/profile/``, which git ignores), with the load average before and after;
``--from-json FILE`` renders a stored ``profile.json`` again into ``OUT/profile.md``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, QUICK, build_parallel, build_single, make_input  # noqa: E402
from cases import labels as batch_labels  # noqa: E402
from harness import ms, ms_spread, prepare_out, run_header, run_ranks, summary  # noqa: E402
from harness import parser as benchmark_parser  # noqa: E402
from loopback import loopback_group  # noqa: E402

import mpgroups  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "profile"  # ignored by git
CASE = CASES["alexnet_step"]
QUICK_CASE = QUICK["alexnet_step"]  # tiny: checks that the script runs, the figures say nothing
WORLD = 2
PHASES = ("features_fwd", "classifier", "features_bwd", "sgd")
# name: (description, runs on both ranks?, model: "single" | "gp" | "local")
VARIANTS = {
    "a_one_process": ("one process × 1 thread (rank 1 idle)", False, "single"),
    "b_gp": ("GP P=2, rank 0 (both ranks, gloo)", True, "gp"),
    "c_rank0_alone": ("rank 0's P=2 work, other core idle (no wire)", False, "local"),
    "d_rank0_beside_rank1": ("rank 0's P=2 work, rank 1's beside it (no wire)", True, "local"),
    "e_one_process_twice": ("one process × 1 thread, a twin on the other core", True, "single"),
}
MICRO_REPS = 7


def _in_collectives(comm: mpgroups.CommCounter) -> float:
    return comm.seconds(kind="data") + comm.seconds(kind="meta")


def _phased_step(model, optimizer, x, labels) -> dict:
    """One training step, phase by phase: ``{phase: (wall s, s in collectives)}``."""
    out = {}
    with mpgroups.CommCounter() as comm:
        start = time.perf_counter()
        h = model.flatten(model.features(x))
        out["features_fwd"] = (time.perf_counter() - start, _in_collectives(comm))
    with mpgroups.CommCounter() as comm:
        start = time.perf_counter()
        h_in = h.detach().requires_grad_()
        loss = F.cross_entropy(model.classifier(h_in), labels)
        loss.backward()
        out["classifier"] = (time.perf_counter() - start, _in_collectives(comm))
    with mpgroups.CommCounter() as comm:
        start = time.perf_counter()
        h.backward(h_in.grad)
        out["features_bwd"] = (time.perf_counter() - start, _in_collectives(comm))
    with mpgroups.CommCounter() as comm:
        start = time.perf_counter()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        out["sgd"] = (time.perf_counter() - start, _in_collectives(comm))
    return out


def _micro(rank: int, reps: int, mib: int = 256) -> dict:
    """Seconds of a memory-bound copy and a compute-bound matmul, rank 0 alone and both
    ranks at once (medians of rank 0's runs, interleaved)."""
    src = torch.ones(mib * 2**18)  # mib MiB of float32
    dst = torch.empty_like(src)
    a = torch.randn(256, 256)
    b = torch.randn(256, 256)

    def copy():
        dst.copy_(src)

    def matmul():
        for _ in range(50):
            torch.mm(a, b)

    kernels = {"copy": copy, "matmul_256_x50": matmul}
    times = {f"{k}/{w}": [] for k in kernels for w in ("alone", "both")}
    for rep in range(reps + 1):
        for name, fn in kernels.items():
            for where in ("alone", "both"):
                dist.barrier()
                if where == "both" or rank == 0:
                    start = time.perf_counter()
                    fn()
                    elapsed = time.perf_counter() - start
                    if rep and rank == 0:
                        times[f"{name}/{where}"].append(elapsed)
    out = {key: summary(v) for key, v in times.items()} if rank == 0 else {}
    if rank == 0:
        out["copy_MiB"] = mib
        out["copy_GB_per_s"] = {
            w: 2 * src.numel() * 4 / out[f"copy/{w}"]["median"] / 1e9 for w in ("alone", "both")
        }
    return out


def _rank(rank: int, world: int, args) -> dict:
    """The five variants, timed on rank 0; rank 1's CPU time while it waited; the micro-
    benchmarks."""
    case = QUICK_CASE if args.quick else CASE
    loopback = loopback_group(dist.group.WORLD)
    models = {
        "single": build_single(case),
        "gp": build_parallel(case, dist.group.WORLD),
        "local": build_parallel(case, loopback),
    }
    labels = batch_labels(case)  # scaling.py's
    inputs = {k: make_input(case, case.batch, m) for k, m in models.items()}
    optimizers = {
        k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in models.items()
    }
    names = list(VARIANTS)
    times = {n: {p: [] for p in PHASES} for n in names}
    comm = {n: {p: [] for p in PHASES} for n in names}
    idle_cpu = {n: [] for n in names if not VARIANTS[n][1]}
    for rep in range(args.warmup + args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            _, everywhere, kind = VARIANTS[name]
            torch.manual_seed(100 + rep)  # the same dropout masks on both ranks
            dist.barrier()
            cpu = time.process_time()
            if everywhere or rank == 0:
                phases = _phased_step(models[kind], optimizers[kind], inputs[kind], labels)
            dist.barrier()
            cpu = time.process_time() - cpu
            if rep < args.warmup:
                continue
            if rank == 1 and not everywhere:
                idle_cpu[name].append(cpu)
            if rank == 0:
                for p, (wall, inside) in phases.items():
                    times[name][p].append(wall)
                    comm[name][p].append(inside)
    micro = _micro(rank, MICRO_REPS, 1 if args.quick else 256)
    # Rank 1's CPU time while it waited for rank 0 alone: is its core idle?
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, idle_cpu)
    return {"times": times, "comm": comm, "idle_cpu": gathered[1], "micro": micro}


def summarize(raw: dict) -> dict:
    """Per variant and phase: the wall time and the time inside collectives (medians), the
    work (wall less collectives, per repetition, median), and the same for the whole step."""
    out = {}
    for name, phases in raw["times"].items():
        comm = raw["comm"][name]
        reps = len(phases[PHASES[0]])
        row = {}
        for p in PHASES:
            work = [w - c for w, c in zip(phases[p], comm[p], strict=True)]
            row[p] = {"wall": summary(phases[p]), "collectives": summary(comm[p]),
                      "work": summary(work)}  # fmt: skip
        steps = [sum(phases[p][i] for p in PHASES) for i in range(reps)]
        inside = [sum(comm[p][i] for p in PHASES) for i in range(reps)]
        row["step"] = {
            "wall": summary(steps),
            "collectives": summary(inside),
            "work": summary([s - c for s, c in zip(steps, inside, strict=True)]),
        }
        for label, members in (("features", ("features_fwd", "features_bwd")),):
            work = [sum(phases[p][i] - comm[p][i] for p in members) for i in range(reps)]
            row[label] = {"work": summary(work)}
        out[name] = row
    return out


COLUMNS = (("features", "features fwd+bwd"), ("classifier", "classifier fwd+bwd"),
           ("sgd", "SGD step"))  # fmt: skip


def write_markdown(result: dict, path: Path) -> str:
    s = result["summary"]

    def med(name, part, what="work"):
        return s[name][part][what]["median"]

    commit = result.get("commit")
    lines = [f"Command: `{result['command']}`  "]
    if commit:
        changed = ""
        if commit["uncommitted_changes"]:
            files = ", ".join(line[3:] for line in commit.get("changed", []))
            changed = (
                f" with uncommitted changes ({files})" if files else " with uncommitted changes"
            )
        lines.append(f"Commit: {commit['sha'][:12]}{changed}  ")
    lines += [
        f"Machine: {result['machine']['cores']} cores"
        + (f" ({result['machine']['cpu']})" if result["machine"].get("cpu") else "")
        + f", {result['machine']['platform']}, torch "
        f"{result['machine']['torch']}; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_before'])}, after "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_after'])}; {result['reps']} timed "
        f"repetitions after {result['warmup']} warm-up, variants interleaved; "
        f"{result['seconds']:.0f} s in all.",
        "",
        ("A --quick run: a tiny AlexNet, the figures say nothing. " if result["quick"] else "")
        + f"AlexNet step ({result['case']['size']}×{result['case']['size']}, batch "
        f"{result['case']['batch']}, {result['case']['alexnet']['num_classes']} classes, SGD "
        "momentum), one thread per process, rank 0's times: medians (p25–p75) in ms, each "
        "phase without its time inside collectives (that is its own column).",
        "",
        "| variant | " + " | ".join(c for _, c in COLUMNS) + " | step without collectives "
        "| in collectives | step wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (description, _, _) in VARIANTS.items():
        row = s[name]
        cells = [ms_spread(row[p]["work"]) for p, _ in COLUMNS]
        lines.append(
            f"| {name[0]}) {description} | "
            + " | ".join(cells)
            + f" | {ms(row['step']['work']['median'])} | "
            f"{ms(row['step']['collectives']['median'])} | {ms(row['step']['wall']['median'])} |"
        )
    ratios = [
        ("a / c: rank 0's work alone vs one process (does the work halve? 2× = yes)",
         "a_one_process", "c_rank0_alone"),
        ("d / c: rank 0's work beside rank 1's vs alone (cost of sharing the machine)",
         "d_rank0_beside_rank1", "c_rank0_alone"),
        ("e / a: one-process step beside a twin vs alone (the same, without mpgroups)",
         "e_one_process_twice", "a_one_process"),
        ("a / b: achieved, GP P=2 vs one process (work; step wall in the last column)",
         "a_one_process", "b_gp"),
    ]  # fmt: skip
    lines += [
        "",
        "Ratios of the medians above (work, collectives excluded).",
        "",
        "| ratio | " + " | ".join(c for _, c in COLUMNS) + " | step | step wall |",
        "|---|---|---|---|---|---|",
    ]
    for label, top, bottom in ratios:
        cells = [f"{med(top, p) / med(bottom, p):.2f}×" for p, _ in COLUMNS]
        wall = s[top]["step"]["wall"]["median"] / s[bottom]["step"]["wall"]["median"]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {med(top, 'step') / med(bottom, 'step'):.2f}× | {wall:.2f}× |"
        )
    m = result["micro"]
    lines += [
        "",
        "Micro-benchmarks on rank 0, alone and with rank 1 doing the same at once (medians): "
        f"copy of {m['copy_MiB']} MiB (memory-bound) {ms(m['copy/alone']['median'])} vs "
        f"{ms(m['copy/both']['median'])} ms "
        f"({m['copy_GB_per_s']['alone']:.1f} vs {m['copy_GB_per_s']['both']:.1f} GB/s read+write "
        f"per process); 50 matmuls 256×256 (cache-resident, compute-bound) "
        f"{ms(m['matmul_256_x50/alone']['median'])} vs {ms(m['matmul_256_x50/both']['median'])} "
        "ms.",
        "",
        "CPU time of rank 1's process while rank 0 ran alone (its core should be idle), median "
        "per step: "
        + "; ".join(
            f"{name}: {statistics.median(v) * 1e3:.1f} ms" for name, v in result["idle_cpu"].items()
        )
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__, out=DEFAULT_OUT, writes="profile.json and profile.md", reps=15, timeout=900,
        quick="a tiny AlexNet, 1 repetition", renders="profile.md",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_json is not None:
        prepare_out(args.out, ["profile.md"])
        print(write_markdown(json.loads(args.from_json.read_text()), args.out / "profile.md"))
        return 0
    if args.quick:
        args.reps, args.warmup = 1, 1
    case = QUICK_CASE if args.quick else CASE
    loadavg_before = os.getloadavg()
    started = time.time()
    prepare_out(args.out, ["profile.json", "profile.md"])
    value = run_ranks(_rank, WORLD, args, timeout=args.timeout, what="profile")
    result = {
        **run_header(argv, os.cpu_count()),
        "case": {
            "name": case.name,
            "description": case.description,
            "batch": case.batch,
            "size": case.size,
            "alexnet": case.alexnet,
        },
        "quick": args.quick,
        "variants": {k: v[0] for k, v in VARIANTS.items()},
        "reps": args.reps,
        "warmup": args.warmup,
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "seconds": time.time() - started,
        "raw": {"times": value["times"], "comm": value["comm"]},
        "idle_cpu": value["idle_cpu"],
        "micro": value["micro"],
    }
    result["summary"] = summarize(result["raw"])
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    print(write_markdown(result, args.out / "profile.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
