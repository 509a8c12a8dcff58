"""Data for pretraining: the default stdlib corpus, a SentencePiece tokenizer, Megatron indexed datasets, and
megatron-core's GPTDataset with a resumable data-parallel sampler.

The trainer needs only: ``prepare_default_data``, ``Tokenizer``, ``build_gpt_datasets``, ``BatchLoader`` (over
``batch_indices`` / ``collate``); the rest backs the ``tokenizer`` and ``preprocess`` commands. Names resolve
lazily so that preprocess worker processes (and ``megatron-adamc --help``) do not pay for importing torch or
megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

from megatron_adamc.errors import DataError as DataError  # the bottom layer: nothing heavy to import

_EXPORTS = {
    "BatchLoader": "loader",
    "DefaultData": "default",
    "PreprocessStats": "indexed",
    "Tokenizer": "tokenizer",
    "batch_indices": "sampler",
    "build_gpt_datasets": "gpt",
    "collate": "sampler",
    "iter_batch_indices": "sampler",
    "prepare_default_data": "default",
    "preprocess": "indexed",
    "train_tokenizer": "tokenizer",
    "write_stdlib_corpus": "corpus",
}

__all__ = sorted([*_EXPORTS, "DataError"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
