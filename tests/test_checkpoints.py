"""Checkpoint files that must be refused safely, and resume after a killed rank."""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

import mpgroups
from mpgroups.state.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parent.parent


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "state.pt"
    mpgroups.atomic_save({"w": torch.arange(10_000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(mpgroups.CheckpointError, match="cannot load checkpoint"):
        mpgroups.safe_load(path)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = tmp_path / "state.pt"
    mpgroups.atomic_save({"w": torch.arange(10_000.0)}, path)
    data = bytearray(path.read_bytes())
    # Inside the tensor data, where torch.load alone would not notice.
    data[data.index(struct.pack("<f", 5000.0))] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(mpgroups.CheckpointError, match="corrupt"):
        mpgroups.safe_load(path)


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCode(str(marker))}, path)
    # The file is genuinely malicious: an unsafe load runs the code.
    with open(path, "rb") as f:
        try:
            torch.load(f, weights_only=False)
        except Exception:
            pass
    assert marker.exists()
    marker.unlink()
    with pytest.raises(mpgroups.CheckpointError, match="cannot load checkpoint"):
        mpgroups.safe_load(path)
    assert not marker.exists(), "safe_load ran the pickled code"
    # The same payload hidden inside a checksummed envelope is refused too.
    inner = pickle.dumps(_RunsCode(str(marker)), protocol=2)
    digest = hashlib.sha256(inner).hexdigest()
    payload = torch.frombuffer(bytearray(inner), dtype=torch.uint8)
    torch.save({"format": "mpgroups.checked.v1", "sha256": digest, "payload": payload}, path)
    with pytest.raises(mpgroups.CheckpointError):
        mpgroups.safe_load(path)
    assert not marker.exists()


def test_manager_falls_back_past_a_corrupt_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (5, 10, 15, 20):
        manager.save(step, {"weights": torch.full((4,), float(step)), "step": step})
    assert manager.steps() == [20, 15, 10], "only the newest `keep` are kept"
    newest = next((tmp_path / "step-00000020").iterdir())
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="skipping checkpoint step 20"):
        state = manager.load_latest()
    assert state["step"] == 15 and torch.equal(state["weights"], torch.full((4,), 15.0))


def _fallback_on_two_ranks(ctx, directory: str) -> int:
    import warnings

    manager = CheckpointManager(directory, keep=2, process_group=ctx.process_group)
    manager.save(1, {"rank": ctx.rank, "step": 1})
    manager.save(2, {"rank": ctx.rank, "step": 2})
    if ctx.rank == 1:  # only rank 1's newest file is damaged
        path = Path(directory) / "step-00000002" / "rank-00001-of-00002.pt"
        path.write_bytes(b"not a checkpoint")
    mpgroups.comm.collectives.barrier(ctx.process_group)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        state = manager.load_latest()
    assert state["rank"] == ctx.rank
    return state["step"]


def test_all_ranks_fall_back_together(pool, tmp_path):
    assert pool.run(_fallback_on_two_ranks, 2, str(tmp_path)) == [1, 1]


def _train_command(tmp: Path, name: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=1", "-m", "mpgroups.train",
        "--epochs", "3", "--samples", "400", "--batch-size", "32", "--no-progress",
        "--no-compare", "--checkpoint-dir", str(tmp / name / "ckpt"), "--checkpoint-every", "5",
        "--save", str(tmp / name / "final.pt"), "--losses-json", str(tmp / name / "losses.json"),
    ]  # fmt: skip


def _rank_process(launcher: psutil.Process, rank: str) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "mpgroups.train" in child.cmdline():
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_killed_rank_resumes_to_the_same_final_state(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPGROUPS_PG_TIMEOUT="60")
    # The uninterrupted run alongside (the killed job waits in its restart a good part of its
    # time): two standalone jobs, each on a port of its own.
    with open(tmp_path / "clean.log", "w") as clean_log:
        clean = subprocess.Popen(
            _train_command(tmp_path, "clean"), stdout=clean_log, stderr=subprocess.STDOUT, env=env
        )
    job = subprocess.Popen(
        _train_command(tmp_path, "killed"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        launcher = psutil.Process(job.pid)
        checkpoints = tmp_path / "killed" / "ckpt"
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline and job.poll() is None:
            # step 10's directory appears only after every rank has finished writing step 5
            if (checkpoints / "step-00000010").exists():
                victim = _rank_process(launcher, "1")
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.02)
        output = job.communicate(timeout=300)[0]
        clean.wait(timeout=300)
    finally:
        for launched in (clean, job):
            if launched.poll() is None:
                launched.terminate()  # torchrun stops its workers on SIGTERM
    assert clean.returncode == 0, (tmp_path / "clean.log").read_text()
    assert victim is not None, "the run ended before a rank could be killed:\n" + output
    assert job.returncode == 0, output
    resumed = [line for line in output.splitlines() if line.startswith("resumed from step")]
    assert len(resumed) == 1, output
    step = int(resumed[0].split()[3])
    assert 5 <= step < 30, resumed[0]  # 320 training samples: 10 steps per epoch, 3 epochs

    assert (tmp_path / "killed" / "losses.json").read_text() == (
        tmp_path / "clean" / "losses.json"
    ).read_text()
    final_clean = torch.load(tmp_path / "clean" / "final.pt", weights_only=True)
    final_killed = torch.load(tmp_path / "killed" / "final.pt", weights_only=True)
    assert list(final_killed) == list(final_clean)
    for key, value in final_clean.items():
        assert torch.equal(final_killed[key], value), f"{key} differs after the resume"


def _resume_at_another_size(ctx, directory: str) -> None:
    manager = CheckpointManager(directory, process_group=ctx.process_group)
    with pytest.raises(ValueError, match=r"a job with \[1\] processes; this job has 2"):
        manager.load_latest()


def test_training_checkpoints_of_another_world_size_are_refused_clearly(pool, tmp_path):
    CheckpointManager(tmp_path).save(3, {"step": 3})
    pool.run(_resume_at_another_size, 2, str(tmp_path))


def _two_sharded_saves(ctx, directory: str) -> None:
    torch.manual_seed(0)
    layer = mpgroups.GroupParallelConv2d(8, 8, 3, groups=4, process_group=ctx.process_group)
    mpgroups.save_sharded_state_dict(layer, f"{directory}/first")
    with torch.no_grad():
        layer.weight.add_(1.0)
    mpgroups.save_sharded_state_dict(layer, f"{directory}/second")


def test_shards_of_two_saves_are_refused(pool, tmp_path):
    """A save interrupted after some ranks wrote leaves a mix; the mix must not load."""
    pool.run(_two_sharded_saves, 2, str(tmp_path))
    plain = torch.nn.Conv2d(8, 8, 3, groups=4)
    for name in ("first", "second"):
        mpgroups.load_sharded_state_dict(plain, tmp_path / name)
    second_weight = plain.weight.detach().clone()
    shard = "shard-00001-of-00002.pt"
    (tmp_path / "first" / shard).write_bytes((tmp_path / "second" / shard).read_bytes())
    with pytest.raises(mpgroups.CheckpointError, match="comes from another save"):
        mpgroups.load_sharded_state_dict(plain, tmp_path / "first")
    assert torch.equal(plain.weight, second_weight), "a refused load must change nothing"
