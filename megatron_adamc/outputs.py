"""One check for every path a command will write to: an output folder, a file prefix, a cache.

WHY one module: each command (train, export, import-hf, preprocess, report, experiment, slurm submit) and each
cache (``data.cache_dir``, ``data.index_cache_dir``) used to find out that it cannot write only when it wrote, as a
``FileNotFoundError``/``PermissionError``/``OSError`` traceback half-way through. Here the write is tried first, in
a way that leaves nothing behind (a temporary file created and removed in the nearest existing folder), so root's
permissions, read-only mounts, full disks and folders that are really files are all caught alike; virtual file
systems (``/proc``, ``/sys``, ``/dev``), which may accept a file and lose it, are named by their mount type.
Nothing here imports the project (``cli`` and ``train`` both use it).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from megatron_adamc.errors import UserError

# File system types that hold no user data: a "file" written there is a kernel interface, or gone at once.
VIRTUAL_FS = {
    "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore", "bpf",
    "configfs", "fusectl", "mqueue", "binfmt_misc", "autofs", "efivarfs", "hugetlbfs", "rpc_pipefs", "nsfs",
}  # fmt: skip

_WHY = {
    errno.EROFS: "is on a read-only file system",
    errno.EACCES: "is not writable (permission denied)",
    errno.EPERM: "is not writable (operation not permitted)",
    errno.ENOSPC: "is on a full file system",
    errno.EDQUOT: "is over its disk quota",
    errno.ENOENT: "cannot hold files",
    errno.ENOTDIR: "is not a folder",
}


def mount_type(path: str | os.PathLike) -> str | None:
    """The file system type of the mount holding ``path`` (Linux ``/proc/self/mountinfo``), None if unknown."""
    real = os.path.realpath(path)
    best, best_type = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
            lines = handle.readlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, right.split()[0]
    return best_type


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path("/")


def _blank(value: str, field: str, example: str) -> None:
    if not str(value).strip():
        raise UserError(f"{field} is empty: give a path, e.g. {field} {example} (an empty path would write into the "
                        "current folder)")  # fmt: skip


def probe_writable(folder: Path) -> str | None:
    """Create and remove a temporary file in ``folder``: None when that works, else why not (a short phrase)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".megatron-adamc-probe-")
    except OSError as err:
        return _WHY.get(err.errno or 0, f"is not writable ({err.strerror or err})")
    try:
        os.write(fd, b"0")
    except OSError as err:
        return _WHY.get(err.errno or 0, f"is not writable ({err.strerror or err})")
    finally:
        os.close(fd)
        os.unlink(name)
    return None


def check_output_dir(value: str | os.PathLike, field: str, example: str = "runs/NAME") -> Path:
    """``value`` is, or can become, a folder this process can write into; returns it (``~`` expanded).

    Nothing is created: an existing folder is probed, a missing one is probed in its nearest existing parent.
    """
    _blank(str(value), field, example)
    path = Path(os.path.expanduser(str(value)))
    if path.exists() and not path.is_dir():
        raise UserError(f"{field} {value}: exists and is not a folder; remove it or choose another path")
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise UserError(
            f"{field} {value}: {existing} is a file, so no folder can be created under it; choose another path"
        )
    kind = mount_type(existing)
    if kind in VIRTUAL_FS:
        raise UserError(f"{field} {value}: {existing} is on a virtual file system ({kind}); choose a real folder")
    why = probe_writable(existing)
    if why is not None:
        where = "" if existing == path.absolute() else f" (its nearest existing folder {existing})"
        raise UserError(f"{field} {value}{where} {why}; choose another path")
    return path


def check_output_prefix(value: str | os.PathLike, field: str, suffixes: tuple[str, ...] = (".bin", ".idx")) -> Path:
    """A file prefix (``OUT`` for ``OUT.bin``/``OUT.idx``): its folder writable, no folder where a file goes."""
    _blank(str(value), field, "data/NAME")
    text = os.path.expanduser(str(value))
    if text.endswith(os.sep) or os.path.isdir(text):
        example = f"{text.rstrip(os.sep)}{os.sep}NAME"
        raise UserError(f"{field} {value}: is a folder; give a file prefix inside it, e.g. {field} {example}")
    for suffix in suffixes:
        if os.path.isdir(text + suffix):
            raise UserError(f"{field} {value}: {text + suffix} is a folder, where the output file would go")
    parent = Path(os.path.dirname(os.path.abspath(text)))
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{field} {value}: {parent} is a file, so no folder can be created under it; choose another "
                        "path")  # fmt: skip
    check_output_dir(parent, field)
    return Path(text)


def check_cache_dir(value: str | os.PathLike, field: str, complete: bool = False) -> Path:
    """A cache folder: writable, or (``complete``: it already holds what the run reads) readable as it is."""
    _blank(str(value), field, "~/.cache/NAME")
    path = Path(os.path.expanduser(str(value)))
    if complete and path.is_dir() and os.access(path, os.R_OK | os.X_OK):
        return path
    return check_output_dir(value, field, "~/.cache/NAME")
