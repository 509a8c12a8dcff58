"""Stop cleanly when Slurm says the job must go (preemption, time limit), then requeue it.

WHY: a signal reaches each rank at a different moment, and some ranks may never see it at all. If every rank
acted on its own signal they would leave a collective at different steps and hang. So the signal handler only
sets a local flag; at each step boundary every rank calls ``should_stop()``, which is ONE all-reduce (MAX) of
that flag, and all ranks agree to stop at the same step. The trainer then saves a checkpoint and rank 0 calls
``requeue()``.

Requeue has two ways, because the worker may run in a container (pyxis) where ``scontrol`` does not exist:
with ``MEGATRON_ADAMC_REQUEUE_FILE`` set (``launch/slurm/*.sbatch`` sets it), rank 0 writes that file and the
batch script, outside any container, runs ``scontrol requeue`` once every node's processes have exited; without
it, rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` itself.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REQUEUE_FILE_ENV = "MEGATRON_ADAMC_REQUEUE_FILE"


def _log(msg: str) -> None:
    # stderr, flushed: this line must reach the Slurm log even if the job is killed right after.
    print(f"[megatron-adamc preemption] {msg}", file=sys.stderr, flush=True)


class PreemptionHandler:
    """Catches the given signals, agrees across ranks on when to stop, and requeues the Slurm job."""

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._stopping = False
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only, as Python requires); returns self for chaining."""
        self._previous = {sig: signal.getsignal(sig) for sig in self.signals}
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        atexit.register(self._ignore_signals)
        return self

    def restore(self) -> None:
        """Training is over: give the signals back to the handlers they had before ``install``, so that a caller in
        the same process (a notebook, a script training twice) gets its Ctrl-C back instead of a flag nobody reads.
        After a stop the scheduler's signals stay ignored: more copies may arrive while the process exits."""
        try:
            for sig, previous in self._previous.items():
                if sig == signal.SIGINT or not self._stopping:  # the others: should_stop() left them ignored
                    signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        except ValueError:  # not the main thread: install() could not have run here either
            pass

    def _ignore_signals(self, keep_interrupt: bool = False) -> None:
        # Once the stop is decided, and at exit, later copies of the signal must not kill the process: Slurm
        # signals every process of the step AND node.sh forwards, so a worker can get it twice, and Python
        # resets its handlers to the default action (terminate, for SIGUSR1) while the interpreter shuts down,
        # which would turn a clean exit 0 into "killed by SIGUSR1". Ignored signals stay ignored.
        try:
            for sig in self.signals:
                if not (keep_interrupt and sig == signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave the handlers (they only set a flag)
            pass

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only set a flag: no I/O or collectives inside a signal handler. A second Ctrl-C means "now": abort at
        # once (no checkpoint), as a user who presses it twice expects.
        if signum == signal.SIGINT and self.received is not None:
            signal.signal(signal.SIGINT, _exit_now)  # a third one while the abort unwinds: out, no questions
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT), not by the scheduler: no requeue."""
        return self.received == signal.SIGINT

    @property
    def local_flag(self) -> bool:
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal. Call at each step boundary on every rank."""
        import torch
        import torch.distributed as dist

        flag = self.local_flag
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag and not self._stopping:
            self._stopping = True
            self._ignore_signals(keep_interrupt=True)
            what = self.received.name if self.received is not None else "a signal on another rank"
            _log(f"rank {_rank()}: stopping at this step boundary ({what})")
        return flag

    def requeue(self) -> bool:
        """Rank 0: ask Slurm to requeue this job; returns whether a requeue was requested."""
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            _log("not under Slurm (SLURM_JOB_ID unset): not requeueing")
            return False
        request = os.environ.get(REQUEUE_FILE_ENV)
        if request:
            path = Path(request)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{job_id} {time.time():.0f}\n")
            _log(f"requeue of job {job_id} requested via {path} (the batch script runs scontrol requeue)")
            return True
        try:
            proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            _log(f"scontrol requeue {job_id} could not run: {err}")
            return False
        if proc.returncode != 0:
            _log(f"scontrol requeue {job_id} failed: {proc.stderr.strip() or proc.returncode}")
            return False
        _log(f"requeued job {job_id}")
        return True


def _exit_now(signum: int, frame: object) -> None:
    os._exit(130)


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
