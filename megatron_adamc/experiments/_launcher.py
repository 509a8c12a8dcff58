"""Start one trainer run as its own process: forked from a server that has imported the trainer once, or as a fresh
``python -m megatron_adamc.cli train``. The fork runs the same function that command runs (``train_from_config``,
ending through ``report_errors``), so this module imports nothing above the trainer.

A micro run trains in ~8 s but a fresh interpreter spends ~10 s importing torch, DeepSpeed and megatron-core first,
so a sweep of hundreds of runs is mostly imports. multiprocessing's fork server imports them once
(``_fork_preload``) and forks each run from that state: still one process per run, with nothing initialized before
the fork (no process group, no RNG draw, no CUDA, no threads), the same environment and argv, so a forked run gives
bitwise the same metrics as its ``command.txt`` run by hand (tests/test_experiments_llm.py). As with any
multiprocessing start method but fork, a script that calls an experiment's ``run`` itself needs the
``if __name__ == "__main__":`` guard (each fork imports the main module); the CLI has it.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing import connection, forkserver
from pathlib import Path
from typing import Any, Protocol

PRELOAD = "megatron_adamc.experiments._fork_preload"

# multiprocessing's Process.poll is not thread-safe, and every Process.start polls all the process's children: a
# thread starting a run while another's run ends could read that run's exit code from the fork server's pipe first,
# leaving the owner an empty pipe, which multiprocessing reports as exit code 255 (a finished run counted failed).
# The run queue starts and watches runs from several threads, so every start and exit-code read takes this lock.
_MULTIPROCESSING_LOCK = threading.Lock()


class TrainerProcess(Protocol):
    """What the run queue needs of a running trainer: subprocess.Popen has it; ``_Forked`` adapts a fork."""

    def poll(self) -> int | None: ...
    def kill(self) -> None: ...
    def wait(self) -> int: ...


def fork_server_available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def train_command(config: Path, output_dir: Path | str, sets: list[str]) -> list[str]:
    """``python -m megatron_adamc.cli train ...`` for one run: what a fresh process runs, and its command.txt."""
    argv = ["python", "-m", "megatron_adamc.cli", "train", "--config", str(config), "--output-dir", str(output_dir)]
    return argv + [a for s in sets for a in ("--set", s)]


def start(
    config: Path, output_dir: Path, sets: list[str], env: dict[str, str], log: Path, fork_server: bool
) -> TrainerProcess:
    """Run ``train_command(config, output_dir, sets)`` with ``env`` as its whole environment, stdout and stderr
    appended to ``log``."""
    if not fork_server or not fork_server_available():
        with log.open("a") as out:
            command = [sys.executable, *train_command(config, output_dir, sets)[1:]]
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return fork(_child, (config, output_dir, sets, env, str(log)), env)


def fork(target: Callable[..., Any], args: tuple[Any, ...], env: dict[str, str]) -> TrainerProcess:
    """``target(*args)`` in a process forked from the fork server; safe to call from several threads."""
    proc = multiprocessing.get_context("forkserver").Process(target=target, args=args, name="megatron-adamc train")
    with _MULTIPROCESSING_LOCK:  # also keeps the environment _ensure_server sets and restores one thread's
        _ensure_server(env)
        proc.start()
    return _Forked(proc)


def _ensure_server(env: dict[str, str]) -> None:
    """Start the fork server (once per experiment process) with the runs' thread settings: OpenMP reads them when
    torch is imported, which the server does once for all its forks."""
    forkserver.set_forkserver_preload([PRELOAD])
    threads = {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in env}
    saved = {k: os.environ.get(k) for k in threads}
    os.environ.update(threads)
    try:
        forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _child(config: Path, output_dir: Path, sets: list[str], env: dict[str, str], log: str) -> None:
    """In the forked process: the run's environment and output, then what ``megatron-adamc train`` runs, ending the
    way every command ends (``report_errors``: one line and its exit code)."""
    os.environ.clear()
    os.environ.update(env)
    # multiprocessing made "forkserver" this process's default start method; a fresh interpreter has the platform's
    # (its DataLoader workers are forked, not started through a new fork server: ~5 s a run).
    multiprocessing.set_start_method(None, force=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from megatron_adamc.errors import report_errors
    from megatron_adamc.train.trainer import train_from_config

    sys.argv = [sys.argv[0], *train_command(config, output_dir, sets)[3:]]
    sys.exit(report_errors("train", lambda: train_from_config(config, output_dir, sets)))


class _Forked:
    def __init__(self, proc: multiprocessing.process.BaseProcess) -> None:
        self.proc = proc

    def poll(self) -> int | None:
        with _MULTIPROCESSING_LOCK:
            return self.proc.exitcode

    def kill(self) -> None:
        with _MULTIPROCESSING_LOCK:  # kill() may poll too
            self.proc.kill()

    def wait(self) -> int:
        connection.wait([self.proc.sentinel])  # blocks outside the lock; the read below takes it
        return self.poll()
