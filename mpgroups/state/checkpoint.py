"""Checkpoint files: atomic writes, loads that never run pickled code, sharded model state.

Every load goes through :func:`safe_load` (``torch.load(weights_only=True)``): a file that
would run code when unpickled, or one that is truncated or corrupt, raises
:class:`CheckpointError` and runs nothing. ``torch.load`` alone does not notice flipped bytes
inside tensor data, so :func:`atomic_save` wraps the serialized object with its SHA-256
(``{"format": "mpgroups.checked.v1", "sha256", "payload": uint8 tensor}``, itself loadable with
``weights_only=True``) and :func:`safe_load` verifies it.

Sharded layout, one directory per checkpoint::

    shard-00000-of-00002.pt   rank 0: its rows of the sharded entries + every replicated entry
    shard-00001-of-00002.pt   rank 1: its rows of the sharded entries

Each file holds ``{"format", "rank", "world_size", "keys", "rows", "tensors"}`` where
``rows[key] = [start, stop, total]`` says which rows of dim 0 the file holds
(``[start, stop, total, dim]`` for a slice along another dim). A directory
written at P ranks loads at any P (each rank reads the pieces it needs).

On a 2-D ``("dp", "gp")`` mesh the files are those of the group-parallel ranks (P = gp); one
data-parallel replica writes them, and a directory written on one (dp, gp) loads on any other
(and into the plain model).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from mpgroups.comm.collectives import all_gather_records, all_ranks_agree, barrier, broadcast_ints
from mpgroups.comm.process_groups import rank_and_world_size, resolve_process_group
from mpgroups.state.state_dict import (
    fsdp_process_group,
    load_full_state_dict,
    local_rows,
    model_process_group,
    sharded_keys,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "atomic_save",
    "load_sharded_state_dict",
    "safe_load",
    "save_sharded_state_dict",
]

_FORMAT = "mpgroups.sharded.v1"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_RANK_FILE = re.compile(r"^rank-(\d{5})-of-(\d{5})\.pt$")
_SHARD_FILE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely: truncated, corrupt, unsafe or incomplete."""


_CHECKED = "mpgroups.checked.v1"


def atomic_save(obj, path: str | os.PathLike, *, checksum: bool = True) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename.

    A reader sees either the previous file or the complete new one, never a partial write.
    With ``checksum`` (the default) the file carries the SHA-256 of the serialized object,
    which :func:`safe_load` checks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if checksum:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = buffer.getvalue()
        obj = {
            "format": _CHECKED,
            "sha256": hashlib.sha256(payload).hexdigest(),
            # A uint8 tensor is stored verbatim (pickle protocol 2 re-encodes a bytes object).
            "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _cpu_bytes(tensor) -> bytes:
    """A copy of the bytes of a 1-D uint8 tensor (one memcpy, no numpy needed)."""
    if not isinstance(tensor, Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise CheckpointError("checkpoint payload is not a byte tensor")
    tensor = tensor.cpu().contiguous()
    return bytes((ctypes.c_ubyte * tensor.numel()).from_address(tensor.data_ptr()))


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """Load with ``torch.load(weights_only=True)``, verifying the checksum when there is one.

    Tensors, dicts, lists, numbers and strings load; anything that needs code to rebuild
    (arbitrary classes, ``__reduce__`` payloads) is refused without running it.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated, corrupt (checksum mismatch) or unsafe.
    """
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises several types for truncated or unsafe files
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
    if isinstance(obj, dict) and obj.get("format") == _CHECKED:
        payload = _cpu_bytes(obj["payload"])
        if hashlib.sha256(payload).hexdigest() != obj["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match")
        try:
            obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
    return obj


def save_sharded_state_dict(
    model: nn.Module, directory: str | os.PathLike, *, data_parallel_group=None
) -> Path:
    """Each rank writes its own shard of ``model.state_dict()`` (atomically) into ``directory``.

    A collective over the model's process group: returns once every rank's file is written.
    Shard files of another world size in ``directory`` are removed by rank 0 before it returns.
    Every shard carries the id of its save, a digest of the whole save's contents, so shards of
    two saves of different states (one interrupted part-way over an older one) are refused
    together at load.

    On a 2-D mesh (model parallelized over ``mesh["gp"]``, FSDP2 over ``mesh["dp"]``), every
    rank of the mesh calls it; ``data_parallel_group`` (``mesh["dp"]``, found by itself under
    FSDP2) names the replicas, and only the first writes files, the others waiting until they
    are written. Replicas left unnamed (a plain model under DDP) each write the same files;
    that is safe (each write is atomic and replicas holding the same state write the same bytes
    under the same id) but costs one write per replica.
    """
    directory = Path(directory)
    process_group = model_process_group(model)
    rank, world_size = rank_and_world_size(process_group)
    if data_parallel_group is None:
        replicas = fsdp_process_group(model)
    else:
        replicas = resolve_process_group(data_parallel_group)
    # DTensors (FSDP2's over dp) are made whole first: a collective every rank joins.
    sharded = sharded_keys(model)
    state = local_rows(model.state_dict(), sharded)
    writes = replicas is None or rank_and_world_size(replicas)[0] == 0
    if writes:
        _write_shards(sharded, directory, state, process_group, rank, world_size)
    barrier(replicas)
    return directory


def _write_shards(sharded, directory: Path, state: dict, process_group, rank, world_size) -> None:
    rows, tensors = {}, {}
    for key, value in state.items():
        shards, dim = sharded.get(key, (None, 0))
        if shards is not None and shards.world_size > 1:
            rows[key] = [*shards.own, shards.total] + ([dim] if dim else [])
            tensors[key] = value.detach().cpu()
        elif rank == 0:
            tensors[key] = value.detach().cpu()
    record = {
        "format": _FORMAT,
        "rank": rank,
        "world_size": world_size,
        "save_id": _save_id(rows, tensors, process_group),
        "keys": list(state),
        "rows": rows,
        "tensors": tensors,
    }
    atomic_save(record, directory / f"shard-{rank:05d}-of-{world_size:05d}.pt")
    barrier(process_group)
    if rank == 0:
        for path in directory.iterdir():
            match = _SHARD_FILE.match(path.name)
            if match and int(match.group(2)) != world_size:
                path.unlink(missing_ok=True)  # another replica may remove it too
    barrier(process_group)


def _save_id(rows: dict, tensors: dict[str, Tensor], process_group) -> int:
    """One 62-bit id per save, the same on every rank: a digest of every rank's entries."""
    digest = hashlib.sha256(repr(sorted(rows.items())).encode())
    for key, tensor in tensors.items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(_cpu_bytes(tensor.contiguous().reshape(-1).view(torch.uint8)))
    own = int.from_bytes(digest.digest()[:8], "little") >> 2
    every = all_gather_records(torch.tensor([own], dtype=torch.int64), process_group)
    combined = hashlib.sha256(repr(every.reshape(-1).tolist()).encode()).digest()
    return int.from_bytes(combined[:8], "little") >> 2


def _read_shards(directory: Path) -> list[dict]:
    files = sorted(p for p in directory.iterdir() if _SHARD_FILE.match(p.name))
    sizes = {int(_SHARD_FILE.match(p.name).group(2)) for p in files}
    if len(sizes) != 1:
        raise CheckpointError(
            f"{directory} must hold the shards of one world size, found sizes {sorted(sizes)}"
        )
    (world_size,) = sizes
    ranks = sorted(int(_SHARD_FILE.match(p.name).group(1)) for p in files)
    if ranks != list(range(world_size)):
        raise CheckpointError(
            f"{directory} is incomplete: shards {ranks} of a world of {world_size}"
        )
    records = [safe_load(p) for p in files]
    for path, rec in zip(files, records, strict=True):
        if not isinstance(rec, dict) or rec.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is not an mpgroups sharded checkpoint")
        if rec["world_size"] != world_size or rec["keys"] != records[0]["keys"]:
            raise CheckpointError(f"{path} does not belong with the other shards in {directory}")
        if rec.get("save_id") != records[0].get("save_id"):
            raise CheckpointError(
                f"{path} comes from another save than {files[0].name} in {directory} (a save "
                f"interrupted part-way?); restore the directory from one complete save"
            )
    return records


def _assemble(key: str, records: list[dict]) -> Tensor:
    if key not in records[0]["rows"]:
        return records[0]["tensors"][key]
    pieces = sorted(
        ((rec["rows"][key], rec["tensors"][key]) for rec in records), key=lambda p: p[0][0]
    )
    total = pieces[0][0][2]
    dim = pieces[0][0][3] if len(pieces[0][0]) > 3 else 0
    covered = 0
    for (start, stop, *_), piece in pieces:
        if start != covered or piece.dim() <= dim or piece.shape[dim] != stop - start:
            raise CheckpointError(f"shards of '{key}' do not tile its {total} entries on dim {dim}")
        covered = stop
    if covered != total:
        raise CheckpointError(f"shards of '{key}' cover {covered} of its {total} entries")
    return torch.cat([piece for _, piece in pieces], dim=dim)


def load_sharded_state_dict(model: nn.Module, directory: str | os.PathLike, strict: bool = True):
    """Load a directory written by :func:`save_sharded_state_dict` at any world size.

    Every rank reads the shard files it needs and keeps its rows (no collective).
    """
    records = _read_shards(Path(directory))
    full = {key: _assemble(key, records) for key in records[0]["keys"]}
    return load_full_state_dict(model, full, strict=strict)


class CheckpointManager:
    """Periodic training checkpoints, one file per rank per step, resumable after a crash.

    Layout: ``directory/step-00000120/rank-00001-of-00002.pt``. :meth:`save` is a collective
    (every rank writes its own file atomically, then all wait, then rank 0 keeps only the
    newest ``keep`` steps). :meth:`load_latest` returns this rank's state of the newest step
    that *every* rank can read; a truncated or corrupt file makes all ranks skip that step,
    with a warning, and fall back to the one before.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, process_group=None):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.process_group = resolve_process_group(process_group)
        self.rank, self.world_size = rank_and_world_size(self.process_group)

    def _file(self, step: int) -> Path:
        name = f"rank-{self.rank:05d}-of-{self.world_size:05d}.pt"
        return self.directory / f"step-{step:08d}" / name

    def steps(self) -> list[int]:
        """Steps with a checkpoint directory, newest first."""
        if not self.directory.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.directory.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def _check_world_size(self) -> None:
        """Refuse checkpoints written by a job of another size (same answer on every rank)."""
        sizes = set()
        for step in self.steps():
            for path in (self.directory / f"step-{step:08d}").iterdir():
                match = _RANK_FILE.match(path.name)
                if match:
                    sizes.add(int(match.group(2)))
        if sizes and self.world_size not in sizes:
            raise ValueError(
                f"{self.directory} holds training checkpoints of a job with "
                f"{sorted(sizes)} processes; this job has {self.world_size}. Resume with the "
                f"same number of processes, or reshard the model with save_sharded_state_dict "
                f"/ load_sharded_state_dict"
            )

    def save(self, step: int, state: dict) -> Path:
        path = self._file(step)
        atomic_save({"step": step, "world_size": self.world_size, "state": state}, path)
        barrier(self.process_group)
        if self.rank == 0:
            for old in self.steps()[self.keep :]:
                shutil.rmtree(self.directory / f"step-{old:08d}", ignore_errors=True)
        return path

    def load_latest(self) -> dict | None:
        """This rank's state of the newest step all ranks can read, or ``None``."""
        self._check_world_size()
        # Every rank walks the same list, rank 0's view of the directory.
        for step in broadcast_ints(self.steps(), self.process_group):
            state, problem = None, None
            try:
                record = safe_load(self._file(step))
                if record.get("step") != step or record.get("world_size") != self.world_size:
                    problem = (
                        f"it belongs to step {record.get('step')} at P={record.get('world_size')}"
                    )
                else:
                    state = record["state"]
            except FileNotFoundError:
                problem = "this rank's file is missing"
            except CheckpointError as err:
                problem = str(err)
            if all_ranks_agree(problem is None, self.process_group):
                return state
            if problem is not None:
                warnings.warn(
                    f"rank {self.rank}: skipping checkpoint step {step}: {problem}; "
                    f"falling back to the previous one",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return None
