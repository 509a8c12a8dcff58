"""What every step of the GPU check shares: its context and record, and subprocesses that cannot outlive a budget.

A step runs in a process of its own (``gpu_check.py --worker NAME``) and saves its figures as it goes, so a step
killed at its time limit still leaves what it measured. Everything heavy (torch, DeepSpeed) is imported inside the
steps' ``run``; importing this package costs nothing, so the orchestrator can format the records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
BASE_CONFIG = CONFIGS / "train" / "llama_tiny.yaml"


@dataclass
class StepContext:
    """What the orchestrator hands a step: where to write, by when, and what the earlier steps found."""

    name: str
    cpu: bool
    quick: bool
    out: Path  # the results folder that comes back from the device machine: a few files only (a PNG)
    work: Path  # this step's scratch folder: run directories, logs
    deadline: float  # time.time() by which the step should be done; the orchestrator kills it a little later
    data_cache: Path  # the default corpus, prepared once for every trainer run
    earlier: dict[str, dict[str, Any]] = field(default_factory=dict)  # records of the steps before, by name
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def record_path(self) -> Path:
        return self.work / "record.json"

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self, **figures: Any) -> None:
        """Adds figures to the record and writes it at once: a kill later keeps them."""
        self.figures.update(figures)
        write_json(self.record_path, self.figures)

    def dump(self, path: Path) -> None:
        data = asdict(self)
        for key in ("out", "work", "data_cache"):
            data[key] = str(data[key])
        write_json(path, data)

    @classmethod
    def load(cls, path: Path) -> StepContext:
        data = json.loads(path.read_text())
        for key in ("out", "work", "data_cache"):
            data[key] = Path(data[key])
        return cls(**data)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def child_env(cpu: bool, **extra: str) -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH (the project travels as source)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # a shared machine: one thread is the steadiest
    return {**env, **extra}


@dataclass
class Finished:
    """How a subprocess ended: its exit code (None when killed), why it was killed, its log and wall time."""

    returncode: int | None
    killed: str | None
    seconds: float
    log: Path

    def tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def last_line(self) -> str:
        """The line that says why it failed: the last non-empty one that is not a bare traceback frame."""
        for line in reversed(self.tail(60).splitlines()):
            line = line.strip()
            if line and not line.startswith(("File ", "^", "~")):
                return line[:400]
        return "(empty log)"


def kill_group(proc: subprocess.Popen) -> None:
    """The process and everything it started (torchrun ranks, data loader workers): they share its session."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_logged(
    cmd: list[str],
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    stop_when: Callable[[], bool] | None = None,
    poll_s: float = 0.25,
) -> Finished:
    """Runs ``cmd`` with its output in ``log``; kills its whole process group at ``timeout`` seconds or as soon as
    ``stop_when()`` is true (e.g. the trainer has logged the steps a benchmark needs: no checkpoint is waited for)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start, started = time.monotonic(), time.time()
    killed = None
    with log.open("w") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        proc = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )  # fmt: skip
        try:
            while proc.poll() is None:
                time.sleep(poll_s)
                if stop_when is not None and stop_when():
                    killed = "done"
                elif time.monotonic() - start > timeout:
                    killed = f"timed out after {timeout:.0f} s"
                if killed:
                    kill_group(proc)
        except BaseException:
            kill_group(proc)
            raise
    if killed and killed != "done":
        for lock in remove_stale_build_locks(started):
            print(f"removed the build lock {lock} that the killed process left", flush=True)
    return Finished(None if killed else proc.returncode, killed, time.monotonic() - start, log)


def remove_stale_build_locks(since: float) -> list[str]:
    """torch's JIT loader holds a lock file in the op's build folder while it checks or builds the op, even a cached
    one; a process killed then leaves it, and every later load of that op waits forever. After a kill, the locks made
    since the killed process started are removed (older ones may belong to other processes on a shared machine)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    removed = []
    for lock in root.glob("*/*/lock") if root.is_dir() else []:
        try:
            if lock.stat().st_mtime >= since:
                lock.unlink()
                removed.append(str(lock))
        except FileNotFoundError:
            pass  # released meanwhile
    return removed


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def fmt(value: Any, digits: int = 3) -> str:
    """A figure for a markdown cell: floats to ``digits`` significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
