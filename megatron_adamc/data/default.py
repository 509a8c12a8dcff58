"""One call that gives the main job its data: corpus -> tokenizer -> indexed train/valid datasets.

Each step is skipped when its outputs exist and were made from the same inputs and settings (a ``.stamp.json``
beside them records those), so calling it on every run costs nothing after the first and a changed
``vocab_size``/``max_bytes`` rebuilds exactly the steps it affects. Under torch.distributed only global rank 0
does the work (``out_dir`` must be shared by the ranks); the others wait at a barrier and then read the results.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from megatron_adamc.data.corpus import write_stdlib_corpus
from megatron_adamc.data.documents import iter_documents
from megatron_adamc.data.indexed import preprocess
from megatron_adamc.data.tokenizer import Tokenizer, train_tokenizer
from megatron_adamc.files import atomic_path, cache_lock

DEFAULT_VOCAB_SIZE = 8192
DEFAULT_MAX_BYTES = 8_000_000


@dataclass(frozen=True)
class DefaultData:
    """Paths the trainer needs; ``train_prefix``/``valid_prefix`` are indexed-dataset prefixes (no extension)."""

    out_dir: str
    train_jsonl: str
    valid_jsonl: str
    tokenizer_model: str
    train_prefix: str
    valid_prefix: str


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fresh(outputs: list[str], stamp: str, params: dict) -> bool:
    if not all(os.path.isfile(p) for p in outputs) or not os.path.isfile(stamp):
        return False
    try:
        with open(stamp) as handle:
            return json.load(handle) == params
    except (OSError, ValueError):
        return False


def _clear_stamp(stamp: str) -> None:
    """Drop the stamp before rebuilding, so a crash midway can never leave new outputs under an old stamp."""
    if os.path.exists(stamp):
        os.remove(stamp)


def _write_stamp(stamp: str, params: dict) -> None:
    with atomic_path(stamp) as tmp, open(tmp, "w") as handle:
        json.dump(params, handle, indent=2)


def prepare_default_data(
    out_dir: str,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_documents: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> DefaultData:
    """Write (or reuse) the stdlib corpus, its tokenizer and ``train``/``valid`` indexed datasets under ``out_dir``."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        with cache_lock(out_dir):  # another job preparing the same cache: wait for it, then reuse its files
            paths = _prepare(out_dir, vocab_size, max_bytes, max_documents, workers, progress)
    if distributed:
        dist.barrier()
        if dist.get_rank() != 0:
            paths = _paths(out_dir)
    return paths


def _paths(out_dir: str) -> DefaultData:
    join = lambda name: os.path.join(out_dir, name)
    return DefaultData(
        out_dir=out_dir,
        train_jsonl=join("train.jsonl"),
        valid_jsonl=join("valid.jsonl"),
        tokenizer_model=join("tokenizer.model"),
        train_prefix=join("train"),
        valid_prefix=join("valid"),
    )


def _prepare(
    out_dir: str, vocab_size: int, max_bytes: int | None, max_documents: int | None, workers: int, progress: bool
) -> DefaultData:
    paths = _paths(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    corpus_params = {"max_bytes": max_bytes, "max_documents": max_documents, "valid_permille": 20}
    corpus_stamp = os.path.join(out_dir, "corpus.stamp.json")
    if not _fresh([paths.train_jsonl, paths.valid_jsonl], corpus_stamp, corpus_params):
        _clear_stamp(corpus_stamp)
        write_stdlib_corpus(out_dir, max_bytes=max_bytes, max_documents=max_documents, valid_permille=20)
        _write_stamp(corpus_stamp, corpus_params)

    tok_params = {"vocab_size": vocab_size, "corpus_sha256": _file_digest(paths.train_jsonl)}
    tok_stamp = os.path.join(out_dir, "tokenizer.stamp.json")
    if not _fresh([paths.tokenizer_model], tok_stamp, tok_params):
        _clear_stamp(tok_stamp)
        if progress:
            print(f"training tokenizer (BPE, vocab {vocab_size}) on {paths.train_jsonl}", flush=True)
        train_tokenizer(iter_documents([paths.train_jsonl]), os.path.join(out_dir, "tokenizer"), vocab_size)
        _write_stamp(tok_stamp, tok_params)

    tokenizer = Tokenizer(paths.tokenizer_model)
    for jsonl, prefix in ((paths.train_jsonl, paths.train_prefix), (paths.valid_jsonl, paths.valid_prefix)):
        params = {"tokenizer_sha256": tokenizer.sha256, "input_sha256": _file_digest(jsonl), "append_eod": True}
        stamp = prefix + ".stamp.json"
        if not _fresh([prefix + ".bin", prefix + ".idx"], stamp, params):
            _clear_stamp(stamp)
            preprocess([jsonl], tokenizer, prefix, workers=workers, append_eod=True, progress=progress)
            _write_stamp(stamp, params)
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Prepare the default stdlib corpus, tokenizer and datasets.")
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args()
    print(prepare_default_data(args.out_dir, args.vocab_size, args.max_bytes))
