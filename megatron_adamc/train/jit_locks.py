"""No silent hang on a stale JIT build lock.

torch's extension loader takes a lock file in the op's build folder while it checks or builds an op (DeepSpeed's
fused_adam, cpu_adam, shm_comm), even one already built; a process killed while holding it (a kill -9, a preempted
job, an OOM kill) leaves the file, and every later load of that op waits forever without a word.

- ``clear_stale_locks`` removes a lock that is provably stale: older than a minute and no live process working in its
  build folder (a real build runs ninja and the compiler there for its whole length; a check of a built op holds the
  lock for a fraction of a second). It says which file it removed.
- ``watch_for_stale_locks`` names, while the trainer starts, any lock older than the wait so far that is not provably
  stale (a build another process may still be running), with the fix, instead of deleting it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PATIENCE_S = 120.0
STALE_AFTER_S = 60.0


def extensions_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


def old_locks(older_than: float) -> list[Path]:
    """Build locks last touched before ``older_than``; torch puts build folders under ``pyXY_cpu/`` by default and
    directly under ``$TORCH_EXTENSIONS_DIR`` when that is set."""
    root = extensions_root()
    found = []
    for pattern in ("*/lock", "*/*/lock"):
        for lock in root.glob(pattern) if root.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                if lock.stat().st_mtime < older_than:
                    found.append(lock)
    return found


def use_interpreter_ninja() -> None:
    """Build and check ops with the ninja installed beside this Python (the venv's), whatever PATH says.

    torch runs the first ``ninja`` on PATH, and two ninja releases hash a build's commands differently: a process
    started with the venv activated (the Slurm scripts) and one started without (``.venv/bin/megatron-adamc``, a test
    runner) would each find the other's build out of date and rebuild the op, a minute each time, under the lock.
    """
    here = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (here / "ninja").is_file() and path.split(os.pathsep)[0] != str(here):
        os.environ["PATH"] = os.pathsep.join([str(here), path])


def _working_in(folder: Path) -> bool:
    """Whether a live process has ``folder`` as its working directory (ninja and the compiler of a build do)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True  # no way to tell: treat every lock as possibly live
    target = folder.resolve()
    for entry in proc.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")) == target:
                    return True
    return False


def clear_stale_locks(stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the locks a killed process left behind (see the module doc); returns them."""
    removed = []
    for lock in old_locks(time.time() - stale_after_s):
        if not _working_in(lock.parent):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
                removed.append(lock)
                print(f"[megatron-adamc] removed {lock}: a JIT build lock left by a killed process (no build is "
                      "running there)", file=sys.stderr, flush=True)  # fmt: skip
    return removed


@contextlib.contextmanager
def watch_for_stale_locks(patience_s: float = PATIENCE_S) -> Iterator[None]:
    """Within the block, after ``patience_s`` seconds, print each JIT lock older than the block's start."""
    use_interpreter_ninja()
    clear_stale_locks()
    start = time.time()
    done = threading.Event()

    def watch() -> None:
        if done.wait(patience_s):
            return
        for lock in old_locks(start):
            since = time.strftime("%H:%M:%S", time.localtime(lock.stat().st_mtime))
            print(
                f"[megatron-adamc] still waiting for {lock} (held since {since}): if no other process is building "
                f"this op, a killed build left it behind; delete that file to continue",
                file=sys.stderr,
                flush=True,
            )

    thread = threading.Thread(target=watch, name="jit-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
