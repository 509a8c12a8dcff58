"""Which tokenizer made an indexed dataset, and whether its token ids fit the run's vocabulary.

WHY: data tokenized with another tokenizer (or any id at or above the vocabulary) used to reach the embedding and
end in ``IndexError: index out of range in self`` on every rank. Three layers, cheapest first:

1. ``preprocess`` writes ``PREFIX.tokenizer.json`` beside ``PREFIX.bin``/``.idx``: the tokenizer's path, SHA-256,
   vocabulary and the largest id written. Preflight compares it with ``data.tokenizer``: another tokenizer is one
   line naming both, before any process group.
2. Data made elsewhere (Megatron-LM's preprocess_data.py) has no record: its ``.bin`` is scanned for its largest id
   when it is at most ``SCAN_LIMIT_BYTES`` (a memory-mapped max, ~1 s per GB).
3. Whatever is larger is checked sample by sample as the run reads it (``VocabGuard``, one max per sample): the
   first id out of range is one line naming the file, the id and the vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from megatron_adamc.data.validate import check_indexed_files
from megatron_adamc.errors import DataError
from megatron_adamc.files import atomic_path

RECORD_SUFFIX = ".tokenizer.json"
SCAN_LIMIT_BYTES = 1 << 30
_CHUNK_TOKENS = 1 << 24


def record_path(prefix: str) -> str:
    return prefix + RECORD_SUFFIX


def write_record(prefix: str, tokenizer: Any, max_id: int) -> None:
    """Beside ``PREFIX.bin``/``.idx``: the tokenizer that made them (written after them, atomically)."""
    record = {
        "version": 1, "tokenizer": os.path.abspath(tokenizer.path), "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size, "max_id": int(max_id),
    }  # fmt: skip
    with atomic_path(record_path(prefix)) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)


def read_record(prefix: str) -> dict[str, Any] | None:
    """The record, or None when there is none or it is unreadable (then the ids are scanned instead)."""
    try:
        with open(record_path(prefix), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    needed = {"sha256": str, "vocab_size": int, "max_id": int}
    if not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in needed.items()):
        return None
    return record


def max_token_id(prefix: str, limit_bytes: int | None = -1) -> int | None:
    """The largest id in ``PREFIX.bin`` (None when it is larger than ``limit_bytes``, default ``SCAN_LIMIT_BYTES``:
    left to ``VocabGuard``; None: no limit)."""
    files = check_indexed_files(prefix, "data")
    path = prefix + ".bin"
    limit = SCAN_LIMIT_BYTES if limit_bytes == -1 else limit_bytes
    if limit is not None and os.path.getsize(path) > limit:
        return None
    tokens = np.memmap(path, dtype=files.dtype, mode="r")
    best = 0
    for start in range(0, len(tokens), _CHUNK_TOKENS):
        best = max(best, int(tokens[start : start + _CHUNK_TOKENS].max()))
    return best


def check_matches_tokenizer(prefixes: Sequence[str], tokenizer: Any, field: str) -> None:
    """Every prefix was made with ``tokenizer`` (by its record), or holds no id at or above its vocabulary."""
    vocab = tokenizer.vocab_size
    for prefix in prefixes:
        record = read_record(prefix)
        if record is not None:
            if record["sha256"] != tokenizer.sha256:
                raise DataError(
                    f"{field}: {prefix} was tokenized with {record.get('tokenizer', '?')} ({record['vocab_size']} "
                    f"pieces, sha256 {record['sha256'][:12]}), but data.tokenizer is {tokenizer.path} ({vocab} "
                    f"pieces, sha256 {tokenizer.sha256[:12]}): pass the tokenizer the data was made with, or "
                    "preprocess the data again with this one"
                )
            continue
        top = max_token_id(prefix)
        if top is not None and top >= vocab:
            raise DataError(_out_of_range(field, prefix + ".bin", top, tokenizer))


def _out_of_range(field: str, path: str, token: int, tokenizer: Any) -> str:
    return (
        f"{field}: {path} holds token id {token}, but data.tokenizer {tokenizer.path} has {tokenizer.vocab_size} "
        "pieces (ids 0.."
        f"{tokenizer.vocab_size - 1}): the data was made with another tokenizer; pass that one, or preprocess the "
        "data again with this one"
    )


def first_out_of_range(prefixes: Sequence[str], vocab: int) -> tuple[str, int] | None:
    """(file, id) of the first prefix holding an id >= ``vocab`` (a full scan: only on the error path)."""
    for prefix in prefixes:
        top = max_token_id(prefix, limit_bytes=None)
        if top is not None and top >= vocab:
            return prefix + ".bin", top
    return None


class VocabGuard:
    """A dataset whose items are checked: a token id at or above the vocabulary is one ``DataError``.

    Wraps megatron-core's GPTDataset/BlendedDataset (``len``, indexing and every other attribute pass through:
    ``guard.dataset`` is the wrapped GPTDataset's own ``dataset``, its IndexedDataset, as for the unwrapped one).
    """

    def __init__(self, dataset: Any, tokenizer: Any, prefixes: Sequence[str], field: str) -> None:
        self.wrapped = dataset
        self.vocab_size = tokenizer.vocab_size
        self.tokenizer = tokenizer
        self.prefixes = list(prefixes)
        self.field = field

    def __len__(self) -> int:
        return len(self.wrapped)

    def __getitem__(self, index: int) -> Any:
        item = self.wrapped[index]
        top = max(int(item["tokens"].max()), int(item["labels"].max()))
        if top >= self.vocab_size:
            found = first_out_of_range(self.prefixes, self.vocab_size)
            path, token = found if found is not None else (" or ".join(self.prefixes), top)
            raise DataError(_out_of_range(self.field, path, token, self.tokenizer))
        return item

    def __getattr__(self, name: str) -> Any:
        if name == "wrapped":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)
