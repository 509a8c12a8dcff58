"""Files that are never half-written, and caches that are never half-built: the project's one write-then-rename and
its lock for shared caches (checkpoint pointer and manifest, run.json, corpora, tokenizers, index caches, weights).

Write-then-rename: a failed or interrupted step never leaves a half-written file in place of a good one, and a
reader sees the old content or the new, never a part. The lock: two runs never build (and read half-built) the
same cache files."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def temp_name(path: str) -> str:
    """A sibling name (same filesystem, so ``os.replace`` is atomic) unique to this process."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path; on success rename it onto ``path``, on error delete it and leave ``path`` alone."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def cache_lock(directory: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (a ``.lock`` file in it) while building or checking its files.

    Runs of one job coordinate through their process group; this is for separate jobs on one cache (an experiment's
    side-by-side runs, two users' jobs): megatron-core writes its index caches in place, so a second job could load
    a file the first is still writing. flock is released by the kernel if the holder dies, so a crash never leaves
    the cache locked. A read-only cache (prebuilt and shared) cannot be written by anyone: no lock is needed."""
    os.makedirs(directory, exist_ok=True)
    try:
        handle = open(os.path.join(directory, ".lock"), "a")  # noqa: SIM115 (closed below, after the unlock)
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably: written, fsynced, renamed, and the rename fsynced."""
    with atomic_path(str(path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    fsync_dir(Path(path).parent)
