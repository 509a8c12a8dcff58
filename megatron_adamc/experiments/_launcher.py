"""Trainer runs on the standard library's process pool: ``concurrent.futures.ProcessPoolExecutor`` with a
``forkserver`` context and ``max_tasks_per_child=1``, so each run is a process of its own that exits when the run
ends. This module imports nothing above the trainer.

A micro run trains in ~8 s but a fresh interpreter spends ~10 s importing torch, DeepSpeed and megatron-core first,
so a sweep of hundreds of runs is mostly imports. The fork server imports them once (``_fork_preload``) and each
pool worker is forked from that state: nothing is initialized before the fork (no process group, no RNG draw, no
CUDA, no threads), the worker takes the run's environment and argv and runs what ``megatron-adamc train`` runs
(``train_from_config`` through ``report_errors``), so a run gives bitwise the same metrics as its ``command.txt``
run by hand (tests/test_experiments_llm.py). Its exit code comes back as the task's result, not as a process exit
status. With ``fork_server=False`` the worker runs that command as a fresh process instead. As with any
multiprocessing start method but fork, a script that calls an experiment's ``run`` itself needs the
``if __name__ == "__main__":`` guard (each worker imports the main module); the CLI has it.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import forkserver
from pathlib import Path

PRELOAD = "megatron_adamc.experiments._fork_preload"


def fork_server_available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def train_command(config: Path, output_dir: Path | str, sets: list[str]) -> list[str]:
    """``python -m megatron_adamc.cli train ...`` for one run: what a fresh process runs, and its command.txt."""
    argv = ["python", "-m", "megatron_adamc.cli", "train", "--config", str(config), "--output-dir", str(output_dir)]
    return argv + [a for s in sets for a in ("--set", s)]


class TrainerPool:
    """``workers`` trainer runs at a time, one pool worker per run (``max_tasks_per_child=1``). ``submit`` returns
    a future of the run's exit code; ``kill`` ends every running run at once (Ctrl-C)."""

    def __init__(self, workers: int, fork_server: bool) -> None:
        self.workers = workers
        self.fork_server = fork_server and fork_server_available()
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, config: Path, output_dir: Path, sets: list[str], env: dict[str, str], log: Path) -> Future[int]:
        """Run ``train_command(config, output_dir, sets)`` with ``env`` as its whole environment, stdout and stderr
        appended to ``log``; its exit code."""
        if self._pool is None:
            self._pool = self._start(env)
        return self._pool.submit(run_trainer, config, output_dir, sets, env, str(log), self.fork_server)

    def _start(self, env: dict[str, str]) -> ProcessPoolExecutor:
        if not fork_server_available():
            context = multiprocessing.get_context("spawn")
        else:
            context = multiprocessing.get_context("forkserver")
            if self.fork_server:
                _ensure_server(env)
        return ProcessPoolExecutor(self.workers, mp_context=context, max_tasks_per_child=1)

    def kill(self) -> None:
        """SIGKILL every worker, which is every running run (a fresh-process run dies with its worker), then close
        the pool."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        kill_workers = getattr(pool, "kill_workers", None)  # Python >= 3.14
        if kill_workers is not None:
            kill_workers()
        else:
            for process in list(pool._processes.values()):  # private: what kill_workers does
                process.kill()
        # The workers are gone, so this returns at once; waiting lets the pool close its queues, whose semaphores
        # would otherwise be reported as leaked by multiprocessing's resource tracker after the one-line exit.
        pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _ensure_server(env: dict[str, str]) -> None:
    """Start the fork server (once per experiment process) with the trainer preloaded and the runs' thread settings:
    OpenMP reads them when torch is imported, which the server does once for all its forks."""
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


def run_trainer(
    config: Path, output_dir: Path, sets: list[str], env: dict[str, str], log: str, fork_server: bool
) -> int:
    """In the pool worker: one run, its exit code. Forked from the preloaded server, the worker takes the run's
    environment, argv and output and runs what ``megatron-adamc train`` runs, ending the way every command ends
    (``report_errors``: one line and its code; an unexpected error: its traceback and 1, as an interpreter would).
    Otherwise it runs the command as a fresh process, which dies with the worker (Ctrl-C kills the workers)."""
    # A run of its own process group: a terminal's Ctrl-C is the experiment's to handle (it kills its runs); reaching
    # a run too, it would make the trainer checkpoint and exit 0 half-way, racing the experiment's own stop.
    os.setpgrp()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if not fork_server:
        try:
            command = [sys.executable, *train_command(config, output_dir, sets)[1:]]
            done = subprocess.run(command, stdout=fd, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
            return done.returncode
        finally:
            os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit():  # this process's fork server may have been started (torch imported) under other settings
        import torch

        torch.set_num_threads(int(threads))
    # multiprocessing made "forkserver" this process's default start method; a fresh interpreter has the platform's
    # (its DataLoader workers are forked, not started through a new fork server: ~5 s a run).
    multiprocessing.set_start_method(None, force=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from megatron_adamc.errors import report_errors
    from megatron_adamc.train.trainer import train_from_config

    sys.argv = [sys.argv[0], *train_command(config, output_dir, sets)[3:]]
    try:
        return report_errors("train", lambda: train_from_config(config, output_dir, sets))
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except Exception:  # what the interpreter does with an uncaught error
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _die_with_parent() -> None:
    """In a fresh-process run, before exec: SIGKILL when its pool worker dies (Linux' PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
