"""The launch scripts and the training entry point, run as a user would (subprocesses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SMALL_RUN = ["--", "--epochs", "1", "--samples", "300", "--no-progress"]
NODE_0_OF_2 = ["multi_node.sh", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h:1"]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)


def _run(args, timeout: float = 180, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env=_env(**extra), cwd=ROOT
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_help(script):
    result = _run(["bash", LAUNCH / script, "--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    assert "--pg-timeout" in result.stdout or "multi_node.sh --help" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["multi_node.sh", "--node-rank", "0", "--rdzv-endpoint", "h:1"], "missing --nnodes"),
        (["multi_node.sh", "--nnodes", "2", "--rdzv-endpoint", "h:1"], "missing --node-rank"),
        (["multi_node.sh", "--nnodes", "2", "--node-rank", "0"], "missing --rdzv-endpoint"),
        (["multi_node.sh", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "0..1"),
        (["single_node.sh", "--nproc-per-node"], "option --nproc-per-node needs a value"),
        (["single_node.sh", "--nproc-per-node", "zero"], "must be a positive integer"),
        (["single_node.sh", "--frobnicate"], "unknown option --frobnicate"),
        (["single_node.sh", "--nproc-per-node", "4", "--gp", "3"], "--gp 3 must divide"),
        (["single_node.sh", "--nproc-per-node", "4", "--gp", "two"], "positive integer"),
        ([*NODE_0_OF_2, "--nproc-per-node", "2", "--gp", "3"], "job's 4 processes"),
        (["slurm.sbatch"], "not inside a Slurm job"),
    ],
)
def test_missing_or_bad_arguments_fail_clearly(args, message):
    result = _run(["bash", LAUNCH / args[0], *args[1:]], SLURM_JOB_ID="")
    assert result.returncode == 2
    assert message in result.stderr


def test_single_node_runs_the_training_entry_point():
    """One launch at two processes (four run in the two-node test below)."""
    nproc = 2
    result = _run(["bash", LAUNCH / "single_node.sh", "--nproc-per-node", str(nproc), *SMALL_RUN])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"trained on {nproc} process(es), gloo, cpu" in result.stdout
    assert "held-out accuracy: " in result.stdout
    assert "(equal)" in result.stdout


def test_training_entry_point_in_one_process(capsys, monkeypatch):
    """Without torchrun's environment the demo trains as one plain process (in this process:
    a subprocess would prove nothing more); the launch scripts run it at 2 and 4 processes."""
    from mpgroups import train

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert train.main(["--epochs", "1", "--samples", "200", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "trained on 1 process(es), no process group, cpu" in out
    assert "held-out accuracy: " in out


def _two_nodes_on_loopback(nproc: int, *options: str, timeout: float = 240) -> str:
    """Run multi_node.sh as two "nodes" on this machine; their combined output.

    A hang fails fast: collectives time out after 60 s, and past ``timeout`` both nodes'
    process groups (launcher, torchrun and workers) are killed.
    """
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            ["bash", LAUNCH / "multi_node.sh", "--nnodes", "2", "--node-rank", str(rank),
             "--rdzv-endpoint", endpoint, "--nproc-per-node", str(nproc), *options, *SMALL_RUN],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(MPGROUPS_PG_TIMEOUT="60"), cwd=ROOT, start_new_session=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        rest = [node.communicate()[0] for node in nodes[len(outputs) :]]
        pytest.fail(
            f"two nodes did not finish within {timeout:.0f} s:\n" + "\n".join(outputs + rest)
        )
    combined = "\n".join(outputs)
    assert [node.returncode for node in nodes] == [0, 0], combined
    return combined


def test_multi_node_runs_a_2x2_mesh_with_gp_2():
    """2 nodes x 2 processes on loopback (c10d rendezvous), group parallel inside a node, FSDP2
    across the nodes: the demo's loss curve still equals the one-process run's."""
    combined = _two_nodes_on_loopback(2, "--gp", "2")
    assert "trained on 4 process(es), gloo, cpu, mesh dp=2 x gp=2" in combined
    assert "(equal)" in combined


def test_exception_in_one_rank_ends_the_job_with_its_traceback():
    start = time.monotonic()
    result = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "tests" / "scripts" / "faulty_rank.py"), "raise"],
        timeout=240, MPGROUPS_PG_TIMEOUT="300",
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 150, f"the job took {elapsed:.0f} s to end (the group timeout is 300 s)"
    output = result.stdout + result.stderr
    assert "ValueError: boom from rank 1, in user code" in output
    assert "rank      : 1" in output


def test_stalled_rank_ends_the_job_at_the_pg_timeout():
    """A rank that stays alive but never reaches the collective: the launch script's
    ``--pg-timeout`` bounds the wait, and the waiting rank says it timed out."""
    start = time.monotonic()
    result = _run(
        ["bash", LAUNCH / "single_node.sh", "--nproc-per-node", "2", "--pg-timeout", "5",
         "--module", "faulty_rank", "--", "stall"],
        timeout=240, PYTHONPATH=str(ROOT / "tests" / "scripts"),
    )  # fmt: skip
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert elapsed < 150, f"the job took {elapsed:.0f} s to end with --pg-timeout 5"
    assert "[rank0]: RuntimeError" in output and "Timed out waiting 5000ms" in output, output
