"""The run directory's two bookkeeping files: the lock (one trainer per directory) and run.json (one entry per
invocation).

The lock is an advisory ``flock`` on ``RUN_DIR/.lock`` held by rank 0 for the whole run; the file names the holder's
host and pid for the error message. The kernel drops a flock when its process dies, however it dies, so a stale
lock of a killed run is taken over with no clean-up step (a requeued job simply gets it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from megatron_adamc.errors import RunLockedError, UserError
from megatron_adamc.files import atomic_write_text

LOCK = ".lock"
RUN_INFO = "run.json"
# What the trainer keeps in a run directory, and what each must be: "file" or "dir".
BOOKKEEPING = {LOCK: "file", RUN_INFO: "file", "metrics.jsonl": "file", "checkpoints": "dir", "tb": "dir"}


def check_run_dir(run_dir: Path) -> None:
    """A run directory the trainer can continue without dropping anything: each of its own names is of the right
    kind (a ``metrics.jsonl`` folder would be written into), and ``run.json``, the run's history, is readable
    (a crash cannot tear it: it is replaced atomically, so an unreadable one is foreign, and is never overwritten)."""
    if not run_dir.is_dir():
        return
    for name, kind in BOOKKEEPING.items():
        path = run_dir / name
        if not os.path.lexists(path):
            continue
        if kind == "file" and not path.is_file():
            raise UserError(f"--output-dir {run_dir}: {name} is a folder (or not a regular file) where the trainer "
                            f"keeps its {name} file; move it away or choose another --output-dir")  # fmt: skip
        if kind == "dir" and not path.is_dir():
            raise UserError(f"--output-dir {run_dir}: {name} is a file where the trainer keeps its {name}/ folder; "
                            "move it away or choose another --output-dir")  # fmt: skip
    info = run_dir / RUN_INFO
    if info.is_file():
        why = None
        try:
            data = json.loads(info.read_bytes().decode("utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("invocations", []), list):
                why = "not a run record (no invocations list)"
        except (UnicodeDecodeError, ValueError) as err:
            why = f"not valid JSON ({str(err).splitlines()[0]})"
        if why is not None:
            raise UserError(
                f"--output-dir {run_dir}: {RUN_INFO} is unreadable: {why}. It holds the run's history and is never "
                "overwritten: restore it, or move it away to start a new history"
            )


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None
        self._created: list[Path] = []
        self._previous = ""

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead holder's lock was taken over. Raises RunLockedError."""
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = [*missing] if self.path.exists() else [self.path, *missing]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by a running trainer ({holder}); wait for it to end or choose "
                "another --output-dir"
            ) from None
        previous = self._previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%F %T')}\n".encode(), 0)
        self._fd = fd
        return f"took over the lock of a trainer that is gone ({previous})" if previous else None

    def release(self, undo: bool = False) -> None:
        """Drop the lock. ``undo``: the run stopped before writing anything (bad input found after locking), so
        leave the directory exactly as it was: the lock file's old content back, or what locking created removed."""
        if self._fd is None:
            return
        if undo:
            if self.path in self._created:
                for path in self._created:  # the lock file, then the directories it needed, deepest first
                    if not path.is_dir():
                        path.unlink(missing_ok=True)
                    elif not any(path.iterdir()):
                        path.rmdir()
            else:
                os.ftruncate(self._fd, 0)
                if self._previous:
                    os.pwrite(self._fd, (self._previous + "\n").encode(), 0)
        os.close(self._fd)  # closing drops the flock; the file stays (harmless, and reused next time)
        self._fd = None


def git_commit() -> str | None:
    """The commit of a source checkout of this package, None for an installed wheel (no .git beside it)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "megatron-core", "sentencepiece", "megatron-adamc"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def append_run_info(run_dir: Path, header: dict[str, Any], invocation: dict[str, Any]) -> None:
    """run.json keeps the run's description (``header``, refreshed) and a list with one entry per invocation."""
    path = run_dir / RUN_INFO
    invocations: list[dict[str, Any]] = []
    if path.is_file():
        try:
            invocations = list(json.loads(path.read_text()).get("invocations", []))
        except (OSError, ValueError, AttributeError) as err:  # check_run_dir refused it before; never drop a history
            raise UserError(f"{path}: unreadable ({err}); restore it or move it away") from None
    info = {**header, "invocations": [*invocations, invocation]}
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def run_header(config: Any, ds_config: dict[str, Any], num_params: int) -> dict[str, Any]:
    """run.json's description of the run, refreshed by every invocation."""
    from megatron_adamc.config.deepspeed_json import precision, zero_stage

    return {
        "config": config.model_dump(mode="json"), "deepspeed": ds_config, "zero_stage": zero_stage(ds_config),
        "precision": precision(ds_config), "num_params": num_params,
    }  # fmt: skip


def invocation_info(env: Any, resumed_from: str | None, start_step: int, changes: list) -> dict[str, Any]:
    """run.json's entry for this invocation: where, on what, from where, and what changed."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "world_size": env.world_size,
        "num_nodes": env.num_nodes, "device": str(env.device), "backend": env.backend, "resumed_from": resumed_from,
        "start_step": start_step, "changes": [[k, old, new] for k, old, new in changes],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "git_commit": git_commit(), "versions": versions(),
    }  # fmt: skip
