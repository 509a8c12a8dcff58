"""Cheap checks of indexed datasets (``PREFIX.bin``/``PREFIX.idx``) and of ``data.split``, before megatron-core runs.

WHY: megatron-core trusts its inputs. A split whose documents hold 0 tokens makes ``GPTDataset._get_num_epochs``
loop forever; a split with fewer than ``seq_len + 1`` tokens yields no sample; an empty or truncated file is a
traceback at step 1; and its split parser reads any digits it finds (``"abc"`` is a division by zero, ``"-1,2,0"``
silently becomes ``1,2,0``). These checks read the ``.idx`` only (a memory map, never the ``.bin``'s contents) and
split documents with megatron-core's arithmetic, so the counts they report are the ones the builder would use.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_adamc.errors import DataError

Blend = tuple[list[str], list[float] | None]  # as data/blend.py parses it (that module imports this one)

# The .idx layout megatron-core's IndexedDatasetBuilder writes (megatron/core/datasets/indexed_dataset.py): magic,
# version (u64), token dtype code (u8), sequence count (u64), document count (u64); then int32 sequence lengths,
# int64 byte pointers into the .bin, int64 document offsets; multimodal indexes add one int8 mode per sequence.
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}

# What the trainer uses when neither data.valid nor data.split is given.
DEFAULT_SPLIT = "98,2,0"
SPLIT_NAMES = ("train", "validation", "test")
_SHARE = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*"
_SPLIT_RE = re.compile(rf"^{_SHARE},{_SHARE},{_SHARE}$")
_REPREPROCESS = "rerun `megatron-adamc preprocess` for it"


@dataclass(frozen=True)
class IndexedFiles:
    """What the ``.idx`` of a checked pair says; ``sequence_lengths`` is a read-only memory map of it."""

    prefix: str
    dtype: str
    sequence_lengths: np.ndarray

    @property
    def documents(self) -> int:
        """Sequences, which megatron-core's GPTDataset splits and samples as its documents."""
        return len(self.sequence_lengths)

    @property
    def tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def check_indexed_files(prefix: str, field: str) -> IndexedFiles:
    """Both files exist, the ``.idx`` header is megatron-core's, and both sizes agree with the index; else DataError.

    Reads the 34-byte header and memory-maps the lengths and pointers; the ``.bin`` is only ``stat``-ed.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        hint = " (give the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        raise DataError(
            f"{field}: dataset {prefix!r} has no {' or '.join(missing)} file{hint}; run `megatron-adamc preprocess`"
        )
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    where = f"{field}: {idx}"
    if idx_size == 0:
        raise DataError(f"{where} is empty (0 bytes); {_REPREPROCESS}")
    with open(idx, "rb") as handle:
        head = handle.read(_HEADER.size)
    if head[: len(INDEX_MAGIC)] != INDEX_MAGIC and not INDEX_MAGIC.startswith(head):
        raise DataError(
            f"{where} is not a Megatron indexed-dataset index (it starts with {head[:9]!r}, not {INDEX_MAGIC!r}); "
            f"give the prefix of files written by `megatron-adamc preprocess` or Megatron-LM's preprocess_data.py"
        )
    if len(head) < _HEADER.size:
        raise DataError(f"{where} is truncated ({idx_size} bytes; the header alone is {_HEADER.size}); {_REPREPROCESS}")
    _, version, code, sequences, documents = _HEADER.unpack(head)
    if version != INDEX_VERSION:
        raise DataError(f"{where}: index version {version}, but megatron-core reads version {INDEX_VERSION}")
    if code not in DTYPE_CODES:
        raise DataError(f"{where}: unknown token dtype code {code} (known: {sorted(DTYPE_CODES)}); {_REPREPROCESS}")
    expected = _HEADER.size + 12 * sequences + 8 * documents
    if idx_size not in (expected, expected + sequences):
        state = "truncated" if idx_size < expected else "corrupt"
        raise DataError(
            f"{where} is {state}: {idx_size} bytes, but its header's {sequences} sequences and {documents} document "
            f"offsets take {expected}; {_REPREPROCESS}"
        )
    if sequences == 0:
        raise DataError(f"{where} indexes no documents; preprocess non-empty documents into {prefix}")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_HEADER.size, shape=(sequences,))
    pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=_HEADER.size + 4 * sequences, shape=(sequences,))
    itemsize = np.dtype(DTYPE_CODES[code]).itemsize
    tokens = int(lengths.sum(dtype=np.int64))
    # The pointers are running byte offsets of the lengths: the first is 0 and the last ends where the .bin must end.
    if lengths.min() < 0 or pointers[0] != 0 or int(pointers[-1]) != (tokens - int(lengths[-1])) * itemsize:
        raise DataError(f"{where} is corrupt: its sequence pointers disagree with its lengths; {_REPREPROCESS}")
    needed = tokens * itemsize
    if bin_size != needed:
        state = "empty" if bin_size == 0 else "truncated" if bin_size < needed else "longer than its index"
        raise DataError(
            f"{field}: {bin_} is {state} ({bin_size} bytes), but {prefix}.idx indexes {tokens} {DTYPE_CODES[code]} "
            f"tokens ({needed} bytes): the pair is truncated or from different datasets; {_REPREPROCESS}"
        )
    return IndexedFiles(prefix, DTYPE_CODES[code], lengths)


def parse_split(split: str, field: str = "data.split") -> list[float]:
    """``"98,2,0"`` -> normalized shares ``[0.98, 0.02, 0.0]``; refuses what megatron-core would misread."""
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if match is None:
        raise DataError(f"{field}={split!r}: give three non-negative shares train,validation,test, e.g. 98,2,0")
    shares = [float(x) for x in match.groups()]
    total = sum(shares)
    if total == 0:
        raise DataError(f"{field}={split}: the shares sum to 0; give a positive train share, e.g. 98,2,0")
    if shares[0] == 0:
        raise DataError(f"{field}={split}: the train share is 0, so there is nothing to train on; e.g. 98,2,0")
    return [s / total for s in shares]


def split_document_ranges(shares: Sequence[float], documents: int) -> list[tuple[int, int] | None]:
    """``[begin, end)`` document range per split (None: the split is not built), as megatron-core computes it.

    Its ``convert_split_vector_to_split_matrix`` (cumulative bookends; an empty one is None) and its builder's
    ``int(round(bookend * num_elements))``, restated because importing megatron-core takes seconds (its package pulls
    in the transformer code) and this runs on login nodes; tests/test_data_validate.py holds the two equal.
    """
    bookends = [0.0]
    for share in shares:
        bookends.append(bookends[-1] + share)
    return [
        None if end <= begin else (int(round(begin * documents)), int(round(end * documents)))
        for begin, end in zip(bookends[:-1], bookends[1:], strict=True)
    ]


def resolve_split(valid: object, split: str | None) -> str | None:
    """The split the trainer uses: data.split, else DEFAULT_SPLIT when data.valid is not given (else None)."""
    if valid is not None and split is not None:
        raise DataError("data.split and data.valid both given: use one (data.valid is its own validation set)")
    return split if split is not None or valid is not None else DEFAULT_SPLIT


def check_split_sizes(
    train_prefixes: Sequence[str],
    valid_prefixes: Sequence[str] | None,
    split: str | None,
    seq_len: int,
    split_label: str | None = None,
) -> None:
    """Every split megatron-core will build gets at least ``seq_len + 1`` tokens from every prefix; else DataError.

    ``split`` divides each train prefix's documents (None: all of them train); ``valid_prefixes`` are a separate
    validation set, used whole. ``split_label`` names the split in the message (default ``data.split=SPLIT``).
    """
    needed = seq_len + 1
    need = f"it needs at least train.seq_len+1={needed} tokens"
    if split is None or valid_prefixes is not None:
        for field, prefixes in (("data.train", train_prefixes), ("data.valid", valid_prefixes or [])):
            for prefix in prefixes:
                files = check_indexed_files(prefix, field)
                if files.tokens < needed:
                    raise DataError(
                        f"{field}: {prefix} holds {files.documents} documents ({files.tokens} tokens); {need}: "
                        f"use more data or a shorter train.seq_len"
                    )
        return
    label = split_label or f"data.split={split}"
    shares = parse_split(split)
    fixes = (
        "use more data or a larger train share",
        "use more data, a larger validation share, or data.valid",
        "use more data or a test share of 0",
    )
    for prefix in train_prefixes:
        files = check_indexed_files(prefix, "data.train")
        for name, fix, bounds in zip(SPLIT_NAMES, fixes, split_document_ranges(shares, files.documents), strict=True):
            if bounds is None:
                continue
            begin, end = bounds
            tokens = int(files.sequence_lengths[begin:end].sum(dtype=np.int64))
            if tokens < needed:
                raise DataError(
                    f"{label}: the {name} split of {prefix} gets {end - begin} documents ({tokens} tokens) of "
                    f"{files.documents}; {need}: {fix}"
                )


def validation_tokens(train: Blend, valid: Blend | None, split: str | None) -> int | None:
    """Tokens in one pass over the validation set (None: weighted, so a pass is not defined by the files)."""
    if valid is not None:
        return None if valid[1] is not None else sum(check_indexed_files(p, "data.valid").tokens for p in valid[0])
    if split is None or train[1] is not None:
        return None
    total = 0
    for prefix in train[0]:
        files = check_indexed_files(prefix, "data.train")
        bounds = split_document_ranges(parse_split(split), files.documents)[1]
        if bounds is not None:
            total += int(files.sequence_lengths[bounds[0] : bounds[1]].sum(dtype=np.int64))
    return total


def check_eval_pass(
    train: Blend, valid: Blend | None, split: str | None, seq_len: int, samples_per_rank: int | None
) -> None:
    """One rank's validation pass (``eval.batches`` x micro batch samples) must not exceed the validation set: beyond
    it every rank evaluates the same samples again (megatron-core repeats the set, building an index per repeat),
    and ``eval.batches`` 1e6 ran until killed. Ranks together may read the set more than once (small sets, many
    ranks), as each rank's pass is a whole estimate."""
    if not samples_per_rank:
        return
    tokens = validation_tokens(train, valid, split)
    if tokens is None:
        return
    per_pass = max(0, (tokens - 1) // seq_len)
    if samples_per_rank > per_pass:
        raise DataError(
            f"eval.batches: each rank's validation pass would read {samples_per_rank:,} samples (eval.batches x "
            f"train.micro_batch_size), but the validation set holds {per_pass:,} of train.seq_len={seq_len} "
            f"({tokens:,} tokens): lower eval.batches so the pass fits, or add validation data"
        )
