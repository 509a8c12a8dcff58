"""Data layer: stdlib corpus, SentencePiece tokenizer, indexed datasets, megatron-core GPTDataset, sampler.

Everything is real: a tokenizer trained on the interpreter's own stdlib, files written by megatron-core's builder,
samples drawn by megatron-core's GPTDataset/BlendedDataset, and two real gloo ranks.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from megatron_adamc import cli
from megatron_adamc.data import (
    Tokenizer,
    batch_indices,
    build_gpt_datasets,
    collate,
    iter_batch_indices,
    prepare_default_data,
    write_stdlib_corpus,
)
from megatron_adamc.data.corpus import is_validation, list_stdlib_sources
from megatron_adamc.errors import DataError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

VOCAB = 1024
SEQ = 64


def run_cli(monkeypatch, argv: list[str]) -> int:
    """The real ``megatron-adamc`` entry point, limited to the data commands (others are not under test here)."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["tokenizer", "preprocess"])
    return cli.main(argv)


def read_jsonl(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Corpus -> tokenizer -> train/valid datasets, built once through the CLI commands themselves."""
    out = tmp_path_factory.mktemp("data")
    stats = write_stdlib_corpus(str(out), max_bytes=1_200_000)
    commands = [f"tokenizer train --input {out / 'train.jsonl'} --output {out / 'tok'} --vocab-size {VOCAB}"]
    for split in ("train", "valid"):
        commands.append(f"preprocess --input {out / split}.jsonl --tokenizer {out / 'tok.model'} --append-eod")
        commands[-1] += f" --output-prefix {out / split}"
    with pytest.MonkeyPatch.context() as patch:
        for command in commands:
            assert run_cli(patch, command.split()) == 0, command
    return {"dir": out, "stats": stats, "tok": Tokenizer(str(out / "tok.model"))}


def reference_ids(data, split: str) -> list[list[int]]:
    tok = data["tok"]
    return [tok.encode(text) + [tok.eod] for text in read_jsonl(str(data["dir"] / f"{split}.jsonl"))]


def test_corpus_is_a_deterministic_hash_split_of_the_stdlib(tmp_path):
    a = write_stdlib_corpus(str(tmp_path / "a"), max_bytes=None, max_documents=300)
    write_stdlib_corpus(str(tmp_path / "b"), max_bytes=None, max_documents=300)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Recompute the split independently from the file list: the first files in hash order, partitioned by hash.
    root = a.source
    expected = {"train": [], "valid": []}
    for rel in list_stdlib_sources(root):
        if len(expected["train"]) + len(expected["valid"]) == 300:
            break
        try:
            text = open(os.path.join(root, rel), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue
        if text.strip():
            expected["valid" if is_validation(rel, 20) else "train"].append(text)
    assert read_jsonl(str(tmp_path / "a" / "train.jsonl")) == expected["train"]
    assert read_jsonl(str(tmp_path / "a" / "valid.jsonl")) == expected["valid"]
    assert a.train_documents == len(expected["train"]) and a.valid_documents == len(expected["valid"])
    assert 0 < a.valid_documents < 0.06 * 300  # about 2%
    assert not any("site-packages" in rel or "/test/" in f"/{rel}" for rel in list_stdlib_sources(root))


def test_corpus_respects_max_bytes(data):
    stats = data["stats"]
    size = sum(len(t.encode()) for s in ("train", "valid") for t in read_jsonl(str(data["dir"] / f"{s}.jsonl")))
    assert size == stats.train_bytes + stats.valid_bytes <= 1_200_000
    assert size > 1_000_000  # the cap, not the library, ended it


def test_tokenizer_round_trips_real_text_and_unicode(data):
    tok = data["tok"]
    assert tok.vocab_size == VOCAB
    assert (tok.eod, tok.bos, tok.pad, tok.unk_id) == (2, 1, 3, 0)
    samples = read_jsonl(str(data["dir"] / "valid.jsonl"))[:5]
    samples.append('def f(x):\n\tr\u00e9sum\u00e9 = "\u65e5\u672c\u8a9e \U0001f600"  \r\n    return  x  # \u00fc\n\n')
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB for i in ids)
        assert tok.decode(ids) == text
    pieces = [tok.id_to_piece(i) for i in tok.encode("\U0001f600")]
    assert pieces == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback, not <unk>
    # Compression: the BPE merges are real (code is far shorter in tokens than in bytes).
    assert len(tok.encode(samples[0])) < 0.6 * len(samples[0].encode())


def test_preprocess_reads_back_exactly_the_encoded_documents(data):
    for split in ("train", "valid"):
        expected = reference_ids(data, split)
        ds = IndexedDataset(str(data["dir"] / split))
        assert len(ds) == len(expected)
        assert ds.sequence_lengths.tolist() == [len(ids) for ids in expected]
        for i, ids in enumerate(expected):
            assert ds[i].tolist() == ids
        assert ds[0].dtype == np.uint16


def test_preprocess_workers_give_identical_files(data, tmp_path, monkeypatch):
    d = data["dir"]
    argv = f"preprocess --input {d / 'valid.jsonl'} --tokenizer {d / 'tok'} --output-prefix {tmp_path / 'w2'}".split()
    argv += ["--append-eod", "--workers", "2"]
    assert run_cli(monkeypatch, argv) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w2{ext}").read_bytes() == (data["dir"] / f"valid{ext}").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_gpt_dataset_items_are_contiguous_windows_of_the_token_stream(data, tmp_path):
    train_ds, valid_ds = build_gpt_datasets(
        str(data["dir"] / "train"), str(data["dir"] / "valid"), SEQ, 7, 500, None, data["tok"], str(tmp_path)
    )
    docs = reference_ids(data, "train")
    # megatron-core's document order (a seeded shuffle), concatenated: the stream GPT samples are cut from.
    stream = np.concatenate([docs[d] for d in train_ds.document_index])
    starts = np.concatenate([[0], np.cumsum([len(docs[d]) for d in train_ds.document_index])])
    positions = [int(starts[d] + off) for d, off in train_ds.sample_index]
    assert np.all(np.diff(positions) == SEQ)  # back to back: no token skipped or repeated
    assert len(train_ds) >= 500
    for i in range(len(train_ds)):
        item = train_ds[i]
        pos = positions[int(train_ds.shuffle_index[i])]
        assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (SEQ,)
        assert item["tokens"].tolist() == stream[pos : pos + SEQ].tolist()
        assert item["labels"].tolist() == stream[pos + 1 : pos + SEQ + 1].tolist()
    # Validation: one pass over the validation documents, every token covered once.
    valid_tokens = sum(len(d) for d in reference_ids(data, "valid"))
    assert len(valid_ds) == (valid_tokens - 1) // SEQ


def test_blend_weights_3_to_1_draw_samples_in_that_ratio(data, tmp_path):
    blend = [3, str(data["dir"] / "train"), 1, str(data["dir"] / "valid")]
    train_ds, valid_ds = build_gpt_datasets(blend, None, SEQ, 3, 800, None, data["tok"], str(tmp_path))
    assert valid_ds is None and len(train_ds) == 800
    ids = np.array([int(train_ds[i]["dataset_id"]) for i in range(len(train_ds))])
    assert abs((ids == 0).mean() - 0.75) < 0.01
    assert abs((ids[:80] == 0).mean() - 0.75) < 0.05  # interleaved, not 600 then 200
    # The valid half is small, so 200 draws repeat it over several epochs: still drawn from the right source.
    valid_ref = np.concatenate(reference_ids(data, "valid")).tolist()
    text = " ".join(map(str, valid_ref))
    sample = next(train_ds[i] for i in range(len(train_ds)) if int(train_ds[i]["dataset_id"]) == 1)
    assert " ".join(map(str, sample["tokens"][:16].tolist())) in text


def test_sampler_splits_ranks_disjointly_and_resumes_exactly(data, tmp_path):
    train_ds, _ = build_gpt_datasets(str(data["dir"] / "train"), None, SEQ, 5, 200, None, data["tok"], str(tmp_path))
    micro, dp, steps = 3, 2, 12
    seen = {r: [i for step in range(steps) for i in batch_indices(step * micro * dp, micro, r, dp)] for r in range(dp)}
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(steps * micro * dp))

    def run(consumed: int, n: int, rank: int) -> list[torch.Tensor]:
        batches = iter_batch_indices(consumed, micro, rank, dp)
        return [collate(train_ds, next(batches))["tokens"] for _ in range(n)]

    for rank in range(dp):
        straight = run(0, steps, rank)
        resumed = run(0, 5, rank) + run(5 * micro * dp, steps - 5, rank)  # stop after 5 steps, restore one integer
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))
        assert straight[0].shape == (micro, SEQ)
    assert batch_indices(10, 4, 1, 2, num_samples=12) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="dp_rank"):
        batch_indices(0, 2, 2, 2)


def _rank_worker(rank: int, world: int, init_file: str, prefixes: list[str], tok_path: str, cache: str, out: str):
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=180)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        train_ds, valid_ds = build_gpt_datasets(
            [3, prefixes[0], 1, prefixes[1]], prefixes[1], SEQ, 11, 120, None, tok_path, cache
        )
        batches = [collate(train_ds, batch_indices(s * 2 * world, 2, rank, world))["tokens"] for s in range(4)]
        torch.save({"batches": batches, "n": (len(train_ds), len(valid_ds))}, out)
        assert dist.is_initialized()  # ours, left as it was
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_build_once_and_read_the_same_data(data, tmp_path):
    prefixes = [str(data["dir"] / "train"), str(data["dir"] / "valid")]
    cache = str(tmp_path / "cache")
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    args = (2, str(tmp_path / "init"), prefixes, str(data["dir"] / "tok.model"), cache)
    # Rank 1 in a fresh process, rank 0 here (already has megatron-core imported, which is most of the cost).
    child = mp.get_context("spawn").Process(target=_rank_worker, args=(1, *args, outs[1]))
    child.start()
    try:
        _rank_worker(0, *args, outs[0])
    finally:
        child.join(timeout=180)
    assert child.exitcode == 0
    assert not torch.distributed.is_initialized()
    results = [torch.load(o) for o in outs]
    # Single process, same cache: a cache hit that must give the very same samples.
    blend = [3, prefixes[0], 1, prefixes[1]]
    train_ds, valid_ds = build_gpt_datasets(blend, prefixes[1], SEQ, 11, 120, None, data["tok"], cache)
    assert results[0]["n"] == results[1]["n"] == (len(train_ds), len(valid_ds))
    for rank, res in enumerate(results):
        for step, got in enumerate(res["batches"]):
            assert torch.equal(got, collate(train_ds, batch_indices(step * 4, 2, rank, 2))["tokens"])
    assert not torch.equal(results[0]["batches"][0], results[1]["batches"][0])
    descriptions = [f for f in os.listdir(cache) if f.endswith("description.txt")]
    assert len(descriptions) == 4  # 2 train GPTDatasets + their blend + 1 valid, each cached exactly once


def test_bad_inputs_fail_in_one_line_and_keep_existing_outputs(data, tmp_path, monkeypatch, capsys):
    d = data["dir"]
    out = tmp_path / "keep"
    for ext in (".bin", ".idx"):
        (tmp_path / f"keep{ext}").write_bytes((d / f"valid{ext}").read_bytes())
    (tmp_path / "tok.model").write_bytes((d / "tok.model").read_bytes())
    before = {p: (tmp_path / p).read_bytes() for p in ("keep.bin", "keep.idx", "tok.model")}
    pre = f"preprocess --output-prefix {out} --input"
    tok_train = f"tokenizer train --output {tmp_path / 'tok'} --input"
    cases = [
        (f"{pre} {d / 'nope.jsonl'} --tokenizer {d / 'tok.model'}", "nope.jsonl"),
        (f"{pre} {d / 'valid.jsonl'} --tokenizer {d / 'missing.model'}", "--tokenizer"),
        (f"{pre} {d / 'valid.jsonl'} --tokenizer {d / 'valid.jsonl'}", "not a SentencePiece model"),
        (f"{pre} {d / 'valid.jsonl'} --tokenizer {d / 'tok.model'} --json-key content", "--json-key"),
        (f"{tok_train} {d / 'valid.jsonl'} --vocab-size 100", "--vocab-size"),
        (f"{tok_train} {d / 'valid.jsonl'} --vocab-size 900000", "--vocab-size"),
        (f"{tok_train} {d / 'absent.txt'} --vocab-size 1000", "absent.txt"),
    ]
    for command, needle in cases:
        assert run_cli(monkeypatch, command.split()) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, err
        assert {p: (tmp_path / p).read_bytes() for p in before} == before
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with pytest.raises(DataError, match="data.train: dataset .* no .bin or .idx"):
        build_gpt_datasets(str(tmp_path / "absent"), None, SEQ, 1, 10, None, data["tok"], str(tmp_path))
    with pytest.raises(DataError, match="data.valid"):
        build_gpt_datasets(str(d / "train"), str(d / "valid.idx"), SEQ, 1, 10, None, data["tok"], str(tmp_path))


def test_prepare_default_data_is_idempotent_and_rebuilds_only_what_changed(tmp_path):
    out = str(tmp_path / "default")
    paths = prepare_default_data(out, vocab_size=512, max_bytes=300_000, progress=False)
    files = [paths.train_jsonl, paths.tokenizer_model, paths.train_prefix + ".bin", paths.valid_prefix + ".idx"]
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    again = prepare_default_data(out, vocab_size=512, max_bytes=300_000, progress=False)
    assert again == paths and [os.stat(f).st_mtime_ns for f in files] == mtimes
    prepare_default_data(out, vocab_size=600, max_bytes=300_000, progress=False)
    changed = [os.stat(f).st_mtime_ns != m for f, m in zip(files, mtimes, strict=True)]
    assert changed == [False, True, True, True]
    assert Tokenizer(paths.tokenizer_model).vocab_size == 600
    ds = IndexedDataset(paths.valid_prefix)
    assert ds[0].tolist() == Tokenizer(paths.tokenizer_model).encode(read_jsonl(paths.valid_jsonl)[0]) + [2]


def test_a_second_job_on_the_same_index_cache_waits_for_the_first(data, tmp_path):
    """Two jobs sharing an index cache (an experiment's side-by-side runs): megatron-core writes the cache files in
    place, so the second must not look at them while the first holds the cache's lock; afterwards it reads them."""
    import threading

    from megatron_adamc.files import cache_lock

    cache = str(tmp_path / "cache")
    built: list[int] = []
    prefix = str(data["dir"] / "train")
    job = threading.Thread(
        target=lambda: built.append(len(build_gpt_datasets(prefix, None, SEQ, 5, 200, None, data["tok"], cache)[0])),
    )
    with cache_lock(cache):
        job.start()
        job.join(timeout=3.0)
        assert job.is_alive() and not built, "the second job built while the first held the cache"
        assert [p for p in os.listdir(cache) if p != ".lock"] == []
    job.join(timeout=120)
    assert len(built) == 1 and built[0] >= 200 and any(p.endswith(".npy") for p in os.listdir(cache))
