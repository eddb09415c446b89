"""What every benchmark here shares: rank processes, timing, the run's header, its output.

* :func:`run_ranks` runs ``fn(rank, world, *args)`` in ``world`` spawned processes (a gloo
  group when ``world > 1``) and returns rank 0's value; a failure on any rank raises with its
  traceback.
* :func:`summary` (median and inclusive quartiles), :func:`barrier` and
  :func:`max_over_ranks` for the timing loops; :func:`without_collectives` and
  :func:`optimizer_state_bytes` for what a step costs besides its time.
* :func:`run_header` is what a published JSON records first (command, machine, commit);
  :func:`prepare_out` makes the output folder and refuses to write over a file git tracks (the
  published results), so a run never changes the repository; :func:`publish` writes a run's
  JSON and Markdown there.
* :func:`parser` holds the options every benchmark takes; :func:`ms` and :func:`mib` format
  the tables' numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import traceback
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mpgroups
from mpgroups.layers.dtensor_state import local_tensor

__all__ = [
    "HERE",
    "barrier",
    "max_over_ranks",
    "mib",
    "ms",
    "ms_spread",
    "optimizer_state_bytes",
    "parser",
    "prepare_out",
    "publish",
    "run_header",
    "run_interleaved",
    "run_ranks",
    "summary",
    "without_collectives",
]

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, threads: int, args: tuple, queue) -> None:
    try:
        torch.set_num_threads(threads)
        if world > 1:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
            )
        value = fn(rank, world, *args)
        if rank == 0:
            queue.put(("ok", value))
        if world > 1:
            dist.destroy_process_group()
    except BaseException:
        queue.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))
        raise


def run_ranks(fn, world: int, *args, threads: int = 1, timeout: float, what: str = "benchmark"):
    """``fn(rank, world, *args)`` on ``world`` spawned processes of ``threads`` threads each,
    joined in one gloo group when ``world > 1``; returns what rank 0 returned.

    ``fn`` is a module-level function (it travels to the spawned processes by name).

    Raises:
        RuntimeError: with the failing rank's traceback.
    """
    # Forked from a server that imported torch once: no import per rank; like spawn, nothing
    # of this process's state reaches them.
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "mpgroups"])
    else:  # Windows
        ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world, port, threads, args, queue))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    status, value = queue.get(timeout=timeout)
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    if status != "ok":
        raise RuntimeError(f"{what} failed:\n{value}")
    return value


def summary(times: list[float]) -> dict:
    """Median and quartiles; inclusive quartiles stay within the times measured (the
    default, exclusive method extrapolates beyond them when there are few)."""
    if len(times) >= 2:
        q = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q = [times[0]] * 3
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "runs": len(times)}


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def max_over_ranks(value: float, world: int) -> float:
    """The largest ``value`` of all ranks (the same on every rank)."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def without_collectives(fn):
    """``fn`` that returns the seconds it spent inside mpgroups' collectives (data and
    metadata exchanges; the checks' own work stays in), for the timing loop to take off."""

    def run(*args, **kwargs) -> float:
        with mpgroups.CommCounter() as comm:
            fn(*args, **kwargs)
        return comm.seconds(kind="data") + comm.seconds(kind="meta")

    return run


def optimizer_state_bytes(model, step) -> int:
    """Parameters + SGD momentum on this rank, after one real optimizer step (``step`` as
    ``cases.step_and_forward`` makes it)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    step(keep_grads=True)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    state = sum(
        local_tensor(t).numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    params = mpgroups.local_parameter_bytes(model)
    if state != params:
        raise RuntimeError(f"SGD momentum holds {state} bytes for {params} bytes of parameters")
    return params + state


def _commit() -> dict | None:
    """The commit measured, and the Python files under ``mpgroups/`` and ``benchmarks/`` that
    differ from it (a run of a script before it is committed lists at least the script)."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        changed = [
            line
            for line in git("status", "--porcelain", "--", "../mpgroups", ".").splitlines()
            if line.endswith(".py")
        ]
        return {"sha": git("rev-parse", "HEAD"), "uncommitted_changes": bool(changed),
                "changed": changed}  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def run_header(argv: list[str] | None, cores: int) -> dict:
    """What a published JSON records first: the command, the machine and the commit."""
    return {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "cores": cores,
            "logical_cpus": os.cpu_count(),
            "cpu": _cpu_model(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "mpgroups": mpgroups.__version__,
        },
        "commit": _commit(),
    }


def run_interleaved(fn, world: int, args, argv: list[str] | None, what: str) -> tuple:
    """``run_ranks(fn, world, args)`` for a benchmark that times its variants interleaved
    (``args``: ``--reps``, ``--warmup``, ``--quick``, ``--timeout``); returns what rank 0
    returned and the head of the run's JSON: :func:`run_header`, the world size, the
    repetitions and the load averages before and after."""
    loadavg_before = os.getloadavg()
    value = run_ranks(fn, world, args, timeout=args.timeout, what=what)
    head = {
        **run_header(argv, os.cpu_count()),
        "world": world,
        "quick": args.quick,
        "reps": args.reps,
        "warmup": args.warmup,
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
    }
    return value, head


def prepare_out(out: Path, names: list[str]) -> None:
    """Make ``out``; raise ``SystemExit`` if git tracks any of ``out / name`` (the published
    results are never written over: choose another ``--out``)."""
    for name in names:
        path = out / name
        try:
            tracked = subprocess.run(
                ["git", "ls-files", "--error-unmatch", str(path.resolve())],
                cwd=HERE, capture_output=True, check=False,
            ).returncode == 0  # fmt: skip
        except OSError:
            break  # no git: nothing is tracked
        if tracked:
            raise SystemExit(f"refusing to write over {path}: git tracks it; choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def publish(out: Path, name: str, result: dict, lines: list[str]) -> str:
    """Write ``out/name.json`` (``result``) and ``out/name.md`` (``lines``); return the
    Markdown."""
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    return text


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def ms_spread(times: dict) -> str:
    """A :func:`summary` in milliseconds, as the tables print it: ``median (p25–p75)``."""
    return f"{ms(times['median'])} ({ms(times['p25'])}–{ms(times['p75'])})"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f}"


def parser(
    doc: str,
    *,
    out: Path,
    writes: str,
    reps: int,
    timeout: float,
    quick: str,
    renders: str | None = None,
) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--reps``, ``--warmup``, ``--quick``, ``--cores``,
    ``--timeout``, ``--out`` (default ``out``, a folder git ignores, for the files ``writes``
    names) and, with ``renders`` (what is rendered again), ``--from-json``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=reps, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--cores", type=int, default=psutil.cpu_count(logical=False) or 1)
    p.add_argument("--timeout", type=float, default=timeout, help="seconds per spawned job")
    p.add_argument(
        "--out", type=Path, default=out,
        help=f"folder for {writes} (default: {out.relative_to(HERE.parent)}/)",
    )  # fmt: skip
    if renders is not None:
        p.add_argument(
            "--from-json", type=Path, default=None,
            help=f"render a stored JSON again: {renders} into --out, the JSON only read",
        )  # fmt: skip
    return p
