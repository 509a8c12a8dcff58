"""Shared fixtures: launching multi-rank workers under torchrun, and a one-rank gloo group for in-process engines."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: Path, args: list[str], nproc: int = 2, timeout: int = 600, log: Path | None = None) -> str:
    """Runs ``script`` on ``nproc`` local gloo ranks; returns the combined output, fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script), *args]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    output = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(output)
    if proc.returncode != 0:
        pytest.fail(f"{script.name} {' '.join(args)} exited {proc.returncode}:\n{output[-6000:]}")
    return output


@pytest.fixture(scope="session")
def single_rank_dist():
    """A one-rank gloo process group in the pytest process, for engines built in-process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
            }
        )
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    yield
