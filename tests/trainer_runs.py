"""Running ``megatron-adamc train`` in its own processes the way a user does, and reading what it left behind.

``run`` forks each command from the session's fork server (``fork_server.py``: torch, DeepSpeed and megatron-core
imported once), ranks included; ``fresh=True`` starts a new interpreter instead (torchrun's own behaviour, signals).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import REPO, SMALL_CORPUS_DIR, SMALL_TRAIN_SETS, free_port, subprocess_env
from fork_server import ForkServer

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


def run(cmd: list[str], check: bool = True, timeout: int = 900, fresh: bool = False) -> subprocess.CompletedProcess:
    """``cmd`` (``sys.executable`` first) to its end; its exit code, stdout and stderr."""
    if fresh:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=timeout)
    else:
        proc = _run_forked(cmd, timeout)
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


_server: ForkServer | None = None


def fork_server() -> ForkServer:
    global _server
    if _server is None:
        _server = ForkServer(subprocess_env(), REPO)
    return _server


def close_fork_server() -> None:
    if _server is not None:
        _server.close()


def _split_torchrun(argv: list[str]) -> tuple[int, list[str]]:
    """(ranks, the per-rank argv) of ``-m torch.distributed.run [options] target ...``, or (1, argv)."""
    if argv[:2] != ["-m", "torch.distributed.run"]:
        return 1, argv
    nproc, rest = 1, argv[2:]
    while rest and rest[0].startswith("--"):
        option = rest.pop(0)
        if option.startswith("--nproc-per-node="):
            nproc = int(option.split("=", 1)[1])
    return nproc, rest


def _run_forked(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Like ``subprocess.run``: the exit code once the process has ended, its output once every process holding
    its stdout and stderr has closed them (its loader workers too: through named pipes, read to the end here)."""
    assert cmd[0] == sys.executable, cmd
    nproc, argv = _split_torchrun(cmd[1:])
    server, port = fork_server(), str(free_port())
    with tempfile.TemporaryDirectory(prefix="forked-run-") as tmp:
        procs, readers = [], []
        for rank in range(nproc):
            ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                     "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port}  # fmt: skip
            pipes = [Path(tmp) / f"{stream}{rank}" for stream in ("stdout", "stderr")]
            for pipe in pipes:
                os.mkfifo(pipe)
                readers.append(_PipeReader(pipe))
            procs.append(server.start(argv, subprocess_env(**(ranks if nproc > 1 else {})), REPO, *pipes))
        try:
            codes = [p.wait(timeout) for p in procs]
            for reader in readers:
                reader.join(timeout)
                if reader.is_alive():
                    raise subprocess.TimeoutExpired(cmd, timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        code = next((c for c in codes if c != 0), 0)
        stdout = "".join(r.text for r in readers[0::2])
        stderr = "".join(r.text for r in readers[1::2])
        return subprocess.CompletedProcess(cmd, code, stdout, stderr)


class _PipeReader(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.text = path, ""
        self.start()

    def run(self) -> None:
        with open(self.path, "rb") as pipe:  # blocks until the forked process opens it
            self.text = pipe.read().decode(errors="replace")
