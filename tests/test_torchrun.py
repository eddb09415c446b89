"""Smoke tests of the entry points under a real ``torchrun`` (subprocesses, own rendezvous)."""

import os
import subprocess
import sys

from mpgroups import parity_check

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def test_parity_check_under_torchrun():
    """One launch: the entry point under torchrun's environment (the layouts at P = 4, teams
    included, run in the worker pool's parity tests)."""
    nproc, groups = 2, 4
    result = _run(
        [
            *TORCHRUN,
            f"--nproc-per-node={nproc}",
            "-m",
            "mpgroups.parity_check",
            f"--groups={groups}",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"groups={groups}) on {nproc} process(es)" in result.stdout
    assert "(ok)" in result.stdout
    assert result.stdout.count("max error") == 5


def test_parity_check_fails_loudly_when_tolerance_is_impossible(capsys, monkeypatch):
    """Its verdict, in this process (one rank: a subprocess would prove nothing more)."""
    monkeypatch.delenv("RANK", raising=False)
    assert parity_check.main(["--tolerance=-1", "--in-channels=8", "--out-channels=8"]) == 1
    assert "FAILED" in capsys.readouterr().out
