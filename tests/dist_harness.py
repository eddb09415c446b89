"""A pool of gloo worker processes reused across tests.

Four workers form one gloo world; world sizes 1, 2 and 4 run as subgroups of it (ranks
``[0]``, ``[0, 1]`` and all four), so one pool serves every test. A task is a picklable
module-level function ``fn(ctx, *args)`` run on every rank of the requested world size;
its return values come back as a list indexed by rank.

Hangs fail fast at three levels: the process group timeout (``PG_TIMEOUT``), the per-task
wait here (which dumps every worker's stack and restarts the pool), and ``pytest-timeout``.
A pool whose workers died, or that a test marked poisoned (:meth:`WorkerPool.discard`: it
left the ranks with different process groups), starts anew before its next task.
A task that fails on any rank raises with that rank's traceback; a task that ran on no rank
fails too.
"""

from __future__ import annotations

import datetime
import faulthandler
import io
import os
import queue
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass

import torch.multiprocessing as mp

POOL_SIZE = 4
PG_TIMEOUT = datetime.timedelta(seconds=30)
TASK_TIMEOUT = 90.0
GRACE_AFTER_ERROR = 5.0
NO_GROUP = "no process group at world size 1 in the pool (use run_in_one_rank_world)"


@dataclass
class RankContext:
    """What a task sees: its rank and the process group of the requested world size."""

    rank: int
    world_size: int
    process_group: object  # torch.distributed.ProcessGroup, or a string where there is none


def _context():
    """Worker processes fork from a server that imported torch once (``forkserver``), instead
    of each importing it anew (``spawn``: seconds of CPU per process on a small machine); like
    ``spawn``, nothing of the test process's own state reaches them."""
    if "forkserver" not in mp.get_all_start_methods():  # Windows
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "mpgroups"])
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, init_method: str, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=POOL_SIZE, timeout=PG_TIMEOUT
    )
    # A one-rank gloo subgroup breaks later use_local_synchronization subgroups (torch 2.13),
    # so world size 1 has no process group here; a task that passes its ``process_group`` on
    # fails loudly instead of falling back to the 4-rank default group. One-rank runs with a
    # real process group use ``run_in_one_rank_world``.
    process_groups = {1: NO_GROUP, 2: dist.new_group([0, 1]), POOL_SIZE: dist.group.WORLD}
    results.put(("ready", rank, None))
    while True:
        message = tasks.get()
        if message is None:
            break
        seq, fn, world_size, args = message
        if rank >= world_size:
            results.put((seq, rank, ("skip", None)))
            continue
        try:
            value = fn(RankContext(rank, world_size, process_groups[world_size]), *args)
            results.put((seq, rank, ("ok", value)))
        except BaseException:
            results.put((seq, rank, ("error", traceback.format_exc())))
    dist.destroy_process_group()


class TaskError(AssertionError):
    pass


class WorkerPool:
    """Four gloo workers; started on the first task, and again after :meth:`discard` or a
    worker's death."""

    def __init__(self) -> None:
        self._ctx = _context()
        self._seq = 0
        self._procs: list = []
        self._fresh = False

    def discard(self) -> None:
        """The workers' state must not reach the next task: start anew before it."""
        self._fresh = False

    def _start(self) -> None:
        self._tasks = [self._ctx.Queue() for _ in range(POOL_SIZE)]
        self._results = self._ctx.Queue()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._procs = [
            self._ctx.Process(
                target=_worker_main,
                args=(rank, init_method, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(POOL_SIZE)
        ]
        for p in self._procs:
            p.start()
        self._fresh = True
        ready = set()
        deadline = time.monotonic() + 120
        while len(ready) < POOL_SIZE:
            try:
                tag, rank, _ = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise TaskError("worker pool did not start within 120 s") from None
            if tag == "ready":
                ready.add(rank)

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        # A worker leaves once it has destroyed its process group; one that waits on a peer
        # there (or is stuck) is killed: nothing is left to save.
        deadline = time.monotonic() + 2
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()

    def restart(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join()
        self._start()

    def _ready(self) -> None:
        if not self._procs:
            self._start()
        elif not self._fresh or any(not p.is_alive() for p in self._procs):
            self.restart()

    def _dump_stacks(self) -> None:
        for p in self._procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(1.0)

    def run(
        self,
        fn,
        world_size: int,
        *args,
        timeout: float = TASK_TIMEOUT,
        grace: float = GRACE_AFTER_ERROR,
    ) -> list:
        """Run ``fn(ctx, *args)`` on ranks ``0 .. world_size - 1``; return their values.

        After one rank fails, the others get ``grace`` seconds to report before the pool is
        restarted and the task fails.
        """
        if world_size not in (1, 2, POOL_SIZE):
            raise ValueError(f"world_size must be 1, 2 or {POOL_SIZE}, got {world_size}")
        self._ready()
        self._seq += 1
        seq = self._seq
        for q in self._tasks:
            q.put((seq, fn, world_size, args))
        outcomes: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < POOL_SIZE and time.monotonic() < deadline:
            errors = [r for r, (status, _) in outcomes.items() if status == "error"]
            if errors:
                deadline = min(deadline, time.monotonic() + grace)
            for rank, proc in enumerate(self._procs):
                if rank not in outcomes and not proc.is_alive():
                    # A worker killed by the runtime (e.g. gloo's abort on a size mismatch)
                    # never reports: count it as failed instead of waiting out the timeout.
                    outcomes[rank] = ("error", f"worker died with exit code {proc.exitcode}")
                    deadline = min(deadline, time.monotonic() + grace)
            try:
                got_seq, rank, outcome = self._results.get(timeout=0.5)
            except queue.Empty:
                continue
            if got_seq == seq:
                outcomes[rank] = outcome
        missing = [r for r in range(POOL_SIZE) if r not in outcomes]
        errors = {r: v for r, (s, v) in outcomes.items() if s == "error"}
        if missing:
            if not errors:
                self._dump_stacks()
            self.discard()  # some ranks may still be inside the task: start anew before the next
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise TaskError(
                f"{fn.__name__}: ranks {missing} did not finish "
                f"{'after another rank failed' if errors else f'within {timeout:.0f} s'}"
                f" (pool restarted; stacks dumped to stderr){detail}"
            )
        if errors:
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise TaskError(f"{fn.__name__} failed on ranks {sorted(errors)}:{detail}")
        values = [outcomes[r][1] for r in range(world_size)]
        ran = [r for r in range(world_size) if outcomes[r][0] == "ok"]
        if len(ran) != world_size:
            raise TaskError(f"{fn.__name__} ran on ranks {ran}, expected {world_size} ranks")
        return values


def _isolated_main(fn, args, init_method: str, results, backend: str = "gloo") -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend, init_method=init_method, rank=0, world_size=1, timeout=PG_TIMEOUT
        )
        value = fn(RankContext(0, 1, dist.group.WORLD), *args)
        # As bytes: shared-memory tensors would die with this process before being read.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put(("ok", buffer.getvalue()))
    except BaseException:
        results.put(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_in_one_rank_world(fn, *args, timeout: float = TASK_TIMEOUT, backend: str = "gloo"):
    """Run ``fn(ctx, *args)`` in a fresh process whose world (gloo, or ``backend``) has one
    rank.

    Kept apart from :class:`WorkerPool`: a one-rank subgroup inside the pool's world would
    break the pool's later local-synchronisation subgroups (see ``_worker_main``).
    """
    ctx = _context()
    results = ctx.Queue()
    proc = ctx.Process(
        target=_isolated_main,
        args=(fn, args, f"tcp://127.0.0.1:{_free_port()}", results, backend),
        daemon=True,
    )
    proc.start()
    try:
        status, value = results.get(timeout=timeout)
    except queue.Empty:
        raise TaskError(f"{fn.__name__} did not finish within {timeout:.0f} s") from None
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    if status == "error":
        raise TaskError(f"{fn.__name__} failed in the one-rank world:\n{value}")
    import torch

    return torch.load(io.BytesIO(value), weights_only=True)


_GRIDS: dict = {}  # the meshes a worker process made, by dim names (all four ranks together)


def spatial_grid(names: tuple[str, str] = ("sp_h", "sp_w")):
    """A 2 × 2 ``DeviceMesh`` over the pool's four ranks with dims ``names``, made once per
    worker (call it on every rank, as every collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    if names not in _GRIDS:
        _GRIDS[names] = init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    return _GRIDS[names]


def own_block(ctx: RankContext, whole, mesh: str | None = None):
    """This rank's block of ``whole`` (which every rank holds): its rows over ``ctx``'s
    ranks; on the 2 × 2 ``"grid"``, rows block ``h`` and columns block ``w`` of rank
    ``(h, w)``; on the 2 × 2 ``"sp-gp"`` mesh, rows block ``h`` (channels whole)."""
    import torch

    if mesh is None:
        return torch.tensor_split(whole, ctx.world_size, dim=2)[ctx.rank]
    h, w = divmod(ctx.rank, 2)
    rows = torch.tensor_split(whole, 2, dim=2)[h]
    return rows if mesh == "sp-gp" else torch.tensor_split(rows, 2, dim=3)[w]
