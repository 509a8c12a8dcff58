"""Write-then-rename, so a failed or interrupted step never leaves a half-written file in place of a good one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


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
