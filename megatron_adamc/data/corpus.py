"""The default corpus: the running interpreter's standard-library ``.py`` sources, so no download is needed.

One document per file. Files are taken in the order of a hash of their relative path, so a size cap keeps a spread
of the whole library rather than the alphabetically first modules, and the train/validation split is decided by the
same hash: a file's split never changes when the cap does. The corpus is identical for a given Python version.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass

from megatron_adamc.errors import DataError
from megatron_adamc.files import atomic_path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class CorpusStats:
    """What was written; kept next to the JSONL files as ``corpus.json``."""

    source: str
    python_version: str
    train_documents: int
    valid_documents: int
    train_bytes: int
    valid_bytes: int
    skipped_files: int
    max_bytes: int | None
    max_documents: int | None
    valid_permille: int
    include_tests: bool


def path_hash(rel_path: str) -> int:
    return int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:12], 16)


def is_validation(rel_path: str, valid_permille: int) -> bool:
    """Deterministic split: about ``valid_permille``/1000 of the files go to validation."""
    return path_hash(rel_path) % 1000 < valid_permille


def list_stdlib_sources(root: str | None = None, include_tests: bool = False) -> list[str]:
    """Relative paths of the ``.py`` files, in hash order (the order a size cap takes them)."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(found, key=lambda rel: (path_hash(rel), rel))


def write_stdlib_corpus(
    out_dir: str,
    max_bytes: int | None = 8_000_000,
    max_documents: int | None = None,
    valid_permille: int = 20,
    include_tests: bool = False,
    root: str | None = None,
) -> CorpusStats:
    """Write ``train.jsonl``, ``valid.jsonl`` ({"text": ...} per line) and ``corpus.json`` under ``out_dir``.

    ``max_bytes`` caps the UTF-8 size of all documents together; the first file that would exceed it ends the corpus.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be > 0 (got {max_bytes}); pass a size in bytes or None for no cap")
    if max_documents is not None and max_documents <= 0:
        raise DataError(f"max_documents must be > 0 (got {max_documents}); pass a count or None for no cap")
    if not 0 < valid_permille < 1000:
        raise DataError(f"valid_permille must be in 1..999 (got {valid_permille}); 20 keeps about 2% for validation")
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise DataError(f"stdlib source directory not found: {root}; this Python ships without its sources")
    os.makedirs(out_dir, exist_ok=True)
    counts = {"train": [0, 0], "valid": [0, 0]}  # documents, bytes
    skipped = 0
    total = 0
    paths = {split: os.path.join(out_dir, f"{split}.jsonl") for split in counts}
    with atomic_path(paths["train"]) as train_tmp, atomic_path(paths["valid"]) as valid_tmp:
        with open(train_tmp, "w", encoding="utf-8") as train_out, open(valid_tmp, "w", encoding="utf-8") as valid_out:
            for rel in list_stdlib_sources(root, include_tests):
                try:
                    with open(os.path.join(root, rel), encoding="utf-8") as handle:
                        text = handle.read()
                except (UnicodeDecodeError, OSError):
                    skipped += 1
                    continue
                if not text.strip():
                    skipped += 1
                    continue
                size = len(text.encode("utf-8"))
                if max_bytes is not None and total + size > max_bytes:
                    break
                split = "valid" if is_validation(rel, valid_permille) else "train"
                (valid_out if split == "valid" else train_out).write(json.dumps({"text": text}) + "\n")
                counts[split][0] += 1
                counts[split][1] += size
                total += size
                if max_documents is not None and counts["train"][0] + counts["valid"][0] >= max_documents:
                    break
        if counts["train"][0] == 0 or counts["valid"][0] == 0:  # checked before the renames: nothing replaced
            raise DataError(f"max_bytes={max_bytes} / max_documents={max_documents} leave an empty split; raise them")
    stats = CorpusStats(
        source=root,
        python_version=".".join(map(str, sys.version_info[:3])),
        train_documents=counts["train"][0],
        valid_documents=counts["valid"][0],
        train_bytes=counts["train"][1],
        valid_bytes=counts["valid"][1],
        skipped_files=skipped,
        max_bytes=max_bytes,
        max_documents=max_documents,
        valid_permille=valid_permille,
        include_tests=include_tests,
    )
    with atomic_path(os.path.join(out_dir, "corpus.json")) as tmp, open(tmp, "w") as handle:
        json.dump(asdict(stats), handle, indent=2)
    return stats
