"""Data that does not belong to the model (issue 22, family 4), and a validation pass larger than its set (family 6):
one line naming the file, the id and the vocabulary, exit 2, nothing touched, never ``IndexError`` in the embedding.

Real files: SentencePiece tokenizers trained here, data written by ``megatron-adamc preprocess`` (which records its
tokenizer) and by megatron-core's builder directly (data made elsewhere: no record), megatron-core's GPTDataset and
the trainer's BatchLoader with a worker process.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMALL_TRAIN_SETS
from user_errors import no_process_group, refused, state_of  # noqa: F401 (a fixture)

from megatron_adamc.cli import main
from megatron_adamc.data import BatchLoader, Tokenizer, build_gpt_datasets, preprocess, provenance, train_tokenizer
from megatron_adamc.errors import DataError

CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"


pytestmark = pytest.mark.usefixtures("no_process_group")  # every case here must stop in preflight


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("family4")
    texts = [inspect.getsource(json), inspect.getsource(subprocess)]
    tok_a = train_tokenizer(texts, str(d / "tok_a"), 400)
    tok_b = train_tokenizer([inspect.getsource(shutil)], str(d / "tok_b"), 360)
    corpus = d / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t[i : i + 3000]}) + "\n" for t in texts for i in range(0, 60000, 3000))
    )
    made = preprocess([str(corpus)], tok_a, str(d / "made_a"), append_eod=True, progress=False)
    assert made.documents > 20
    # Data made elsewhere (no record), by megatron-core's builder, with ids up to 449 while tok_a has 400 pieces.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(d / "foreign.bin"), dtype=np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(40):
        builder.add_document(rng.integers(4, 450, 200).astype(np.uint16), [200])
    builder.finalize(str(d / "foreign.idx"))
    return {"dir": str(d), "tok_a": tok_a.path, "tok_b": tok_b.path, "made_a": str(d / "made_a"),
            "foreign": str(d / "foreign")}  # fmt: skip


def custom(prefix: str, tokenizer: str, *sets: str) -> list[str]:
    return [*SMALL_TRAIN_SETS, "data.default_corpus=false", f"data.train={prefix}", f"data.tokenizer={tokenizer}",
            "data.split=90,10,0", "eval.batches=1", "train.steps=4", *sets]  # fmt: skip


def train_argv(out: Path, sets: list[str]) -> list[str]:
    argv = ["train", "--config", str(CONFIG), "--output-dir", str(out)]
    for item in sets:
        argv += ["--set", item]
    return argv


def test_preprocess_records_its_tokenizer(data):
    record = provenance.read_record(data["made_a"])
    tok = Tokenizer(data["tok_a"])
    assert record is not None and record["sha256"] == tok.sha256 and record["vocab_size"] == 400
    assert record["max_id"] == provenance.max_token_id(data["made_a"]) < 400


def test_data_of_another_tokenizer_is_refused_before_training(capsys, data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    watch = (run, Path(data["dir"]))
    # 1. made by preprocess with tok_a (its record), trained with tok_b
    line = refused(capsys, train_argv(run, custom(data["made_a"], data["tok_b"])), 2,
                   f"data.train: {data['made_a']} was tokenized with {data['tok_a']} (400 pieces",
                   f"but data.tokenizer is {data['tok_b']} (360 pieces", watch=watch)  # fmt: skip
    assert "preprocess the data again with this one" in line
    # 2. made elsewhere (no record): its .bin is scanned
    refused(capsys, train_argv(run, custom(data["foreign"], data["tok_a"])), 2,
            f"data.train: {data['foreign']}.bin holds token id 449, but data.tokenizer {data['tok_a']} has 400 "
            "pieces (ids 0..399)", watch=watch)  # fmt: skip
    # 3. a validation pass larger than the validation set (family 6: it would evaluate the same samples again)
    refused(capsys, train_argv(run, custom(data["made_a"], data["tok_a"], "eval.batches=100000")), 2,
            "eval.batches: each rank's validation pass would read 200,000 samples", watch=watch)  # fmt: skip


@pytest.mark.parametrize("workers", [0, 1])
def test_an_id_out_of_range_read_at_run_time_is_one_line(data, monkeypatch, workers):
    """Past the scan limit (large data made elsewhere), every sample is checked as it is read: one DataError naming
    the file, the id and the vocabulary, from the training thread or a loader worker alike."""
    monkeypatch.setattr(provenance, "SCAN_LIMIT_BYTES", 0)
    tok = Tokenizer(data["tok_a"])
    provenance.check_matches_tokenizer([data["foreign"]], tok, "data.train")  # too large to scan now: passes
    train_ds, _ = build_gpt_datasets(data["foreign"], None, 64, 1234, 64, None, tok,
                                     cache_dir=str(Path(data["dir"]) / f"idx{workers}"))  # fmt: skip
    loader = BatchLoader(train_ds, 2, 0, 1, num_workers=workers)
    try:
        with pytest.raises(DataError) as err:
            next(loader)
    finally:
        loader.close()
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message == (
        f"data.train: {data['foreign']}.bin holds token id 449, but data.tokenizer {tok.path} has 400 pieces "
        "(ids 0..399): the data was made with another tokenizer; pass that one, or preprocess the data again with "
        "this one"
    )


def test_import_hf_refuses_a_garbage_tokenizer(capsys, tmp_path, data):
    from megatron_adamc.hf import export_hf
    from megatron_adamc.model import Llama, LlamaConfig

    cfg = LlamaConfig.from_preset("tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=512)
    hf = tmp_path / "hf"
    export_hf(Llama(cfg, seed=0).state_dict(), cfg, hf, data["tok_a"])
    (hf / "tokenizer.model").write_bytes(b"\x00\x01garbage, not a tokenizer" * 20)
    out = tmp_path / "imported"
    refused(capsys, ["import-hf", hf, "--output", out], 2, "tokenizer.model: neither a SentencePiece model nor a "
            "tiktoken BPE file", watch=(hf, out))  # fmt: skip
    # Llama 3's tiktoken file: imported without a tokenizer, and said so
    (hf / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")
    assert main(["import-hf", str(hf), "--output", str(out)]) == 0
    assert "is a tiktoken BPE file (Llama 3's)" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.model").exists()
