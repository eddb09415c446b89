"""Process-group set-up for entry points run under ``torchrun`` (or as one plain process).

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``; without
them the entry point runs as a single process with no process group. :func:`init_mesh` splits
the job into a 2-D ``("dp", "gp")`` mesh: group parallel inside, data parallel across.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "DistInfo", "init_distributed", "init_mesh", "shutdown"]

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: rank and size of the default group, backend and device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _choose(device: str, backend: str, local_rank: int, local_world_size: int):
    cuda_fits = torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size
    if device == "auto":
        device = "cuda" if cuda_fits else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        if torch.cuda.device_count() < local_world_size:
            raise ValueError(
                f"device='cuda' needs one GPU per rank: {local_world_size} ranks on this node, "
                f"{torch.cuda.device_count()} GPU(s); use device='cpu' (gloo) instead"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("backend='nccl' needs device='cuda'")
    return dev, backend


def init_distributed(
    backend: str | None = None, device: str | None = None, timeout_s: float | None = None
) -> DistInfo:
    """Initialise the default process group from torchrun's environment, if there is one.

    Args:
        backend: ``"auto"`` (NCCL with one GPU per rank, else gloo), ``"nccl"`` or ``"gloo"``;
            default from ``MPGROUPS_BACKEND``, else ``"auto"``.
        device: ``"auto"``, ``"cuda"`` or ``"cpu"``; default ``MPGROUPS_DEVICE``, else auto.
        timeout_s: how long a collective may wait before the job fails (default
            ``MPGROUPS_PG_TIMEOUT``, else 300 s). A rank that stops answering ends the job
            within this time instead of hanging it.
    """
    backend = backend or os.environ.get("MPGROUPS_BACKEND", "auto")
    device = device or os.environ.get("MPGROUPS_DEVICE", "auto")
    if timeout_s is None:
        timeout_s = float(os.environ.get("MPGROUPS_PG_TIMEOUT", DEFAULT_TIMEOUT_S))
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if "RANK" not in os.environ:
        dev, _ = _choose(device, backend, 0, 1)
        return DistInfo(0, 1, 0, None, dev)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dev, backend = _choose(device, backend, local_rank, local_world_size)
    if not dist.is_initialized():
        options = {"device_id": dev} if dev.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(
            backend,
            store=_attempt_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            **options,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, dev)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this restart attempt.

    After ``torchrun --max-restarts`` restarts the workers, the agent's store still holds the
    previous attempt's keys, and the new ranks can read a dead rank's address from them
    (seen with gloo on torch 2.13: "connectFullMesh failed ... Connection refused"). A prefix
    per attempt (``TORCHELASTIC_RESTART_COUNT``) keeps each attempt's keys apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_store and rank == 0,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mpgroups/attempt-{attempt}", store)


def init_mesh(info: DistInfo, gp: int | None):
    """The ``("dp", "gp")`` ``DeviceMesh`` of a job with ``gp`` group-parallel ranks per model
    replica and data parallelism over the ``world_size // gp`` replicas, or ``None`` when one
    group holds every rank (``gp`` ``None`` or the world size: the job is group parallel only).

    Consecutive ranks share a ``gp`` group (``torchrun`` numbers one node's processes
    consecutively, so with ``gp`` = processes per node the group-parallel traffic stays inside a
    node and only data-parallel gradients cross nodes). A collective: every rank calls it.

    Raises:
        ValueError: ``gp`` does not divide the world size.
    """
    world = info.world_size
    if gp is None:
        return None
    if gp < 1 or world % gp:
        fits = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"gp must divide the number of processes ({world}): one of {fits}, got {gp}"
        )
    if gp == world:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (world // gp, gp), mesh_dim_names=("dp", "gp"))


def shutdown() -> None:
    """Destroy the default process group if this process created one, every rank together.

    The barrier first: a rank that tears its group down while another still works after the
    last collective (rank 0 writing its files) leaves gloo's connections to close under the
    other, and a teardown racing that was seen to abort a restarted rank ("terminate called
    without an active exception"). Call it on every rank, as the last collective.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
