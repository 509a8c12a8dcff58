"""Text/JSONL -> Megatron indexed dataset (``PREFIX.bin``/``PREFIX.idx``) with megatron-core's own builder.

Because the files come from ``IndexedDatasetBuilder`` itself, Megatron-LM's ``--data-path PREFIX`` reads them
unchanged. One document = one sequence (its token ids, plus the end-of-document id with ``append_eod``), which is
the layout Megatron-LM's ``tools/preprocess_data.py`` writes for GPT.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np
from tqdm import tqdm

from megatron_adamc.data.documents import check_first_record, check_inputs, iter_documents
from megatron_adamc.data.megatron_import import quiet_megatron_import
from megatron_adamc.data.provenance import write_record
from megatron_adamc.data.tokenizer import Tokenizer
from megatron_adamc.errors import DataError
from megatron_adamc.files import temp_name

CHUNK_DOCUMENTS = 32


@dataclass(frozen=True)
class PreprocessStats:
    documents: int
    tokens: int
    skipped_empty: int
    seconds: float
    dtype: str

    @property
    def documents_per_s(self) -> float:
        return self.documents / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _WORKER_TOKENIZER is not None
    return [_WORKER_TOKENIZER.encode(text) for text in texts]


def _chunks(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(documents)
    while chunk := list(islice(it, size)):
        yield chunk


def _encoded_chunks(documents: Iterable[str], tokenizer: Tokenizer, workers: int) -> Iterator[list[list[int]]]:
    """Token ids chunk by chunk in input order (``imap`` keeps it), so any ``workers`` writes the same files."""
    if workers <= 1:
        for chunk in _chunks(documents, CHUNK_DOCUMENTS):
            yield [tokenizer.encode(text) for text in chunk]
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode_chunk, _chunks(documents, CHUNK_DOCUMENTS))


def preprocess(
    inputs: Sequence[str],
    tokenizer: Tokenizer | str,
    output_prefix: str,
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    progress: bool = True,
) -> PreprocessStats:
    """Tokenize every document of ``inputs`` and write ``output_prefix.bin``/``.idx``.

    Both files are written under temporary names and renamed into place only after the index is complete, so an
    error midway leaves any previous dataset at ``output_prefix`` intact. Empty documents are skipped.
    """
    check_inputs(inputs)
    check_first_record(inputs, json_key)
    if workers < 1:
        raise DataError(f"--workers must be >= 1 (got {workers})")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer)
    quiet_megatron_import()
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    final = {ext: output_prefix + ext for ext in (".bin", ".idx")}
    tmp = {ext: temp_name(path) for ext, path in final.items()}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    documents = tokens = skipped = top = 0
    start = time.perf_counter()
    bar = tqdm(desc=f"preprocess {os.path.basename(output_prefix)}", unit="doc", disable=not progress)
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp[".bin"], dtype=dtype)
        for encoded in _encoded_chunks(iter_documents(inputs, json_key), tokenizer, workers):
            for ids in encoded:
                if not ids:
                    skipped += 1
                    continue
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                top = max(top, max(ids))
                documents += 1
                tokens += len(ids)
            bar.update(len(encoded))
            bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f}", refresh=False)
        if documents == 0:
            raise DataError(f"--input: no non-empty documents in {', '.join(inputs)}; check --json-key and the files")
        builder.finalize(tmp[".idx"])
    except BaseException:
        bar.leave = False  # erase the bar: the error message is the one line left
        bar.close()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    bar.close()
    os.replace(tmp[".bin"], final[".bin"])
    os.replace(tmp[".idx"], final[".idx"])  # the .idx last: a reader that finds it finds the matching .bin
    write_record(output_prefix, tokenizer, top)  # which tokenizer made them (data/provenance.py)
    seconds = time.perf_counter() - start
    return PreprocessStats(documents, tokens, skipped, seconds, np.dtype(dtype).name)
