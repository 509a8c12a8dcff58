"""Running ``megatron-adamc train`` in subprocesses the way a user does, and reading what it left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMALL_CORPUS_DIR, SMALL_TRAIN_SETS, free_port, subprocess_env

from megatron_adamc.metrics_file import MetricsFile

CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"


def train_cmd(out: Path, *sets: str, nproc: int = 1, steps: int = 12, head: list[str] | None = None) -> list[str]:
    """The command line; ``head`` replaces ``python -m megatron_adamc.cli`` (e.g. a fault-injecting wrapper)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}"]  # fmt: skip
    cmd += head or ["-m", "megatron_adamc.cli"]
    cmd += ["train", "--config", str(CONFIG), "--output-dir", str(out)]
    for item in [*SMALL_TRAIN_SETS, f"train.steps={steps}", f"data.cache_dir={SMALL_CORPUS_DIR}", *sets]:
        cmd += ["--set", item]
    return cmd


def run(cmd: list[str], check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in MetricsFile(run_dir).read(strict=True).rows]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "megatron-adamc train: error:" in line]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: a directory left untouched compares equal."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
