"""A loud line instead of a silent hang on a stale JIT build lock.

torch's extension loader takes a lock file in the op's build folder while it checks or builds an op (DeepSpeed's
fused_adam, cpu_adam, shm_comm), even one already built; a process killed while holding it leaves the file, and every
later load of that op waits forever without a word. While the trainer starts, a watchdog names any such lock older
than the wait so far, with the fix. It only reports: deleting a lock another process is legitimately building under
would break that build.
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


def extensions_root() -> Path:
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


def old_locks(older_than: float) -> list[Path]:
    root = extensions_root()
    found = []
    for lock in root.glob("*/*/lock") if root.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if lock.stat().st_mtime < older_than:
                found.append(lock)
    return found


@contextlib.contextmanager
def watch_for_stale_locks(patience_s: float = PATIENCE_S) -> Iterator[None]:
    """Within the block, after ``patience_s`` seconds, print each JIT lock older than the block's start."""
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
