"""What makes a checkpoint directory trustworthy: a manifest of every file's size and CRC-32, written last.

A checkpoint is complete when its ``manifest.json`` exists and every file it lists has that size and checksum. The
manifest is written (temp file, fsync, rename, directory fsync) only after every rank's files are on disk, so a kill
at any moment of a save leaves either a complete checkpoint or one without a manifest, never one that looks complete.
CRC-32 (zlib, ~1 GB/s per core) catches truncation and torn or corrupted writes; it is no defence against tampering.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from megatron_adamc.files import atomic_write_text, fsync_dir  # noqa: F401 (checkpointer writes the pointer with it)

MANIFEST = "manifest.json"
VERSION = 1
# Why a step directory without a manifest is rejected: a save that never completed (the checkpointer sets such
# directories aside instead of refusing to start).
INCOMPLETE = "no manifest.json (the save did not complete)"
_CHUNK = 1 << 22


def file_entry(path: Path) -> dict[str, int]:
    """Size and CRC-32 of one file, after flushing it to disk (the bytes are still in the page cache)."""
    crc = 0
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": crc}


def list_files(tag_dir: Path) -> list[str]:
    """Every file under ``tag_dir`` except the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(tag_dir: Path, entries: dict[str, dict[str, int]], info: dict[str, Any]) -> None:
    atomic_write_text(tag_dir / MANIFEST, json.dumps({"version": VERSION, **info, "files": entries}, indent=1) + "\n")


def read_manifest(tag_dir: Path) -> dict[str, Any]:
    """The manifest, or ValueError naming why it is unusable."""
    path = tag_dir / MANIFEST
    if not path.is_file():
        raise ValueError(INCOMPLETE)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"manifest.json unreadable ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise ValueError("manifest.json lists no files")
    return manifest


def verify_files(tag_dir: Path, entries: dict[str, dict[str, int]], names: list[str]) -> str | None:
    """Check ``names`` (a share of the manifest's files) against it; the first problem found, or None."""
    for name in names:
        path = tag_dir / name
        want = entries[name]
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, the manifest says {want['size']}"
        crc = 0
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
        if crc != want["crc32"]:
            return f"{name} fails its checksum (corrupted)"
    return None
