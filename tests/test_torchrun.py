"""Smoke tests of the entry points under a real ``torchrun`` (subprocesses, own rendezvous)."""

import os
import subprocess
import sys

import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("nproc, groups", [(2, 4), (4, 2)])
def test_parity_check_under_torchrun(nproc, groups):
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


def test_parity_check_fails_loudly_when_tolerance_is_impossible():
    result = _run(
        [*TORCHRUN, "--nproc-per-node=2", "-m", "mpgroups.parity_check", "--tolerance=-1"]
    )
    assert result.returncode != 0
    assert "FAILED" in result.stdout
