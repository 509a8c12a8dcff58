"""Bad data input is refused before megatron-core builds anything: damaged .bin/.idx pairs, malformed data.split, and
a dataset too small for its split (which would otherwise hang megatron-core's epoch count forever).

The files are written by megatron-core's own IndexedDatasetBuilder and then damaged; the split arithmetic is checked
against the datasets megatron-core's builder really builds.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import signal
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMALL_TRAIN_SETS, subprocess_env

from megatron_adamc.config.train import load_config
from megatron_adamc.data import build_gpt_datasets, train_tokenizer
from megatron_adamc.data.validate import (
    DEFAULT_SPLIT,
    check_indexed_files,
    check_split_sizes,
    parse_split,
    split_document_ranges,
)
from megatron_adamc.errors import DataError
from megatron_adamc.train.preflight import preflight

pytestmark = pytest.mark.unit  # make test-fast

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"
SEQ = 64  # SMALL_TRAIN_SETS' train.seq_len: every split needs SEQ + 1 = 65 tokens


def write_dataset(prefix: Path, lengths: list[int], seed: int = 0) -> str:
    """PREFIX.bin/.idx with one document per length, written by megatron-core's builder."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for n in lengths:
        builder.add_document(rng.integers(4, 400, n).astype(np.uint16), [n])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("validate")
    rng = np.random.default_rng(1)
    tokenizer = train_tokenizer([inspect.getsource(json), inspect.getsource(subprocess)], str(d / "tok"), 400)
    assert tokenizer.vocab_size == 400
    return {
        "dir": str(d),
        "tok": str(d / "tok.model"),
        "small": write_dataset(d / "small", [60] * 7),  # 420 tokens in 7 documents
        "good": write_dataset(d / "good", rng.integers(30, 90, 40).tolist(), seed=2),
    }


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@contextlib.contextmanager
def no_hang(seconds: int):
    """Fail instead of hanging: megatron-core's epoch loop is pure Python, so SIGALRM interrupts it."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds}s (megatron-core's _get_num_epochs loop?)")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_intact_files_read_as_megatron_core_reads_them(files):
    for name in ("small", "good"):
        checked = check_indexed_files(files[name], "data.train")
        reference = IndexedDataset(files[name])
        assert checked.documents == len(reference) and checked.dtype == "uint16"
        assert checked.sequence_lengths.tolist() == reference.sequence_lengths.tolist()
        assert checked.tokens == int(reference.sequence_lengths.sum())
    assert check_indexed_files(files["small"], "data.train").tokens == 420


def _damage(files: dict[str, str], tmp: Path, kind: str) -> str:
    """A copy of the small pair, damaged one way; returns its prefix."""
    prefix = tmp / kind
    idx, bin_ = bytearray(Path(files["small"] + ".idx").read_bytes()), Path(files["small"] + ".bin").read_bytes()
    if kind == "empty_bin":
        bin_ = b""
    elif kind == "truncated_bin":
        bin_ = bin_[:-10]
    elif kind == "mismatched":
        bin_ = Path(files["good"] + ".bin").read_bytes()
    elif kind == "empty_idx":
        idx = bytearray()
    elif kind == "truncated_idx":
        idx = idx[:-5]
    elif kind == "header_only":
        idx = idx[:20]
    elif kind == "wrong_magic":
        idx[:9] = b"NOTANIDX\x00"
    elif kind == "wrong_version":
        idx[9:17] = struct.pack("<Q", 2)
    elif kind == "unknown_dtype":
        idx[17] = 42
    elif kind == "bad_pointer":
        offset = 34 + 4 * 7 + 8 * 6  # the last sequence pointer
        idx[offset : offset + 8] = struct.pack("<q", 12345)
    Path(f"{prefix}.idx").write_bytes(bytes(idx))
    Path(f"{prefix}.bin").write_bytes(bin_)
    return str(prefix)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty_bin", "{p}.bin is empty (0 bytes), but {p}.idx indexes 420 uint16 tokens (840 bytes)"),
        ("truncated_bin", "{p}.bin is truncated (830 bytes), but {p}.idx indexes 420 uint16 tokens (840 bytes)"),
        ("mismatched", "{p}.bin is longer than its index ("),
        ("empty_idx", "{p}.idx is empty (0 bytes); rerun `megatron-adamc preprocess` for it"),
        ("truncated_idx", "{p}.idx is truncated: 177 bytes, but its header's 7 sequences and 8 document offsets "
                          "take 182"),
        ("header_only", "{p}.idx is truncated (20 bytes; the header alone is 34)"),
        ("wrong_magic", "{p}.idx is not a Megatron indexed-dataset index (it starts with b'NOTANIDX\\x00'"),
        ("wrong_version", "{p}.idx: index version 2, but megatron-core reads version 1"),
        ("unknown_dtype", "{p}.idx: unknown token dtype code 42"),
        ("bad_pointer", "{p}.idx is corrupt: its sequence pointers disagree with its lengths"),
    ],
)  # fmt: skip
def test_damaged_files_are_one_line_naming_field_file_and_sizes(files, tmp_path, kind, message):
    prefix = _damage(files, tmp_path, kind)
    error = one_line_error(check_indexed_files, prefix, "data.valid")
    assert error.startswith("data.valid: ") and message.format(p=prefix) in error, error
    # The same line from the trainer's dataset build, before megatron-core opens anything.
    build = one_line_error(build_gpt_datasets, prefix, None, SEQ, 1, 10, None, files["tok"], files["dir"])
    assert build == error.replace("data.valid", "data.train", 1)


@pytest.mark.parametrize("split", ["abc", "98,2", "98,2,0,0", "-1,2,0", "98;2;0", "1e2,1,1", "", "inf,1,0"])
def test_malformed_split_is_refused(split):
    assert one_line_error(parse_split, split) == (
        f"data.split={split!r}: give three non-negative shares train,validation,test, e.g. 98,2,0"
    )


def test_split_without_data_is_refused():
    assert "the shares sum to 0" in one_line_error(parse_split, "0,0,0")
    assert "the train share is 0" in one_line_error(parse_split, "0,100,0")


@pytest.mark.parametrize("split", ["98,2,0", " 949, 50, 1 ", "1,1,1", "0.7,.2,0.1", "100,0,0"])
def test_accepted_split_reads_as_megatron_core_reads_it(split):
    assert parse_split(split) == pytest.approx(parse_and_normalize_split(split), abs=0)


def test_split_ranges_equal_megatron_cores_arithmetic():
    rng = np.random.default_rng(0)
    cases = ["98,2,0", "949,50,1", "1,1,1", "100,0,0", "0.7,.2,0.1", "60,39,1", "33,33,34"]
    cases += [",".join(str(x) for x in rng.integers(0, 100, 3)) for _ in range(200)]
    for split in (c for c in cases if c.split(",")[0] != "0"):
        shares = parse_split(split)
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for documents in (0, 1, 7, 40, 1001, 123_457):
            # BlendedMegatronDatasetBuilder's own expression for the document indices of a split:
            expected = [
                None if m is None else (int(round(m[0] * documents)), int(round(m[1] * documents))) for m in matrix
            ]
            assert split_document_ranges(shares, documents) == expected, (split, documents)


def test_split_ranges_are_the_documents_megatron_core_builds(files):
    split = "70,20,10"
    expected = split_document_ranges(parse_split(split), 40)
    assert expected == [(0, 28), (28, 36), (36, 40)]
    train_ds, valid_ds = build_gpt_datasets(files["good"], None, SEQ, 3, 10, 4, files["tok"], files["dir"], split)
    assert (train_ds.indices.min(), train_ds.indices.max() + 1, len(train_ds.indices)) == (0, 28, 28)
    assert (valid_ds.indices.min(), valid_ds.indices.max() + 1, len(valid_ds.indices)) == (28, 36, 8)


def test_too_small_for_the_default_split_is_refused_with_the_numbers_not_hung(files):
    message = (
        f"data.split=98,2,0: the validation split of {files['small']} gets 0 documents (0 tokens) of 7; "
        f"it needs at least train.seq_len+1={SEQ + 1} tokens: use more data, a larger validation share, or data.valid"
    )
    assert one_line_error(check_split_sizes, [files["small"]], None, DEFAULT_SPLIT, SEQ) == message
    with no_hang(60):  # without the check, megatron-core loops forever here
        assert one_line_error(build_gpt_datasets, files["small"], None, SEQ, 1, 10, 8, files["tok"], files["dir"],
                              DEFAULT_SPLIT) == message  # fmt: skip
    train = one_line_error(check_split_sizes, [files["small"]], None, "10,90,0", SEQ)
    assert "the train split of" in train and "gets 1 documents (60 tokens) of 7" in train
    test = one_line_error(check_split_sizes, [files["small"]], None, "60,39,1", SEQ)
    assert "the test split of" in test and "gets 0 documents (0 tokens) of 7" in test and "a test share of 0" in test
    check_split_sizes([files["small"]], None, "50,50,0", SEQ)  # 4 and 3 documents: 240 and 180 tokens


def test_too_small_whole_datasets_and_blend_members_are_refused(files):
    whole = one_line_error(check_split_sizes, [files["good"]], [files["small"]], None, 512)
    assert whole == (
        f"data.valid: {files['small']} holds 7 documents (420 tokens); it needs at least train.seq_len+1=513 tokens: "
        f"use more data or a shorter train.seq_len"
    )
    blend = one_line_error(check_split_sizes, [files["good"], files["small"]], None, "90,10,0", SEQ)
    assert f"the validation split of {files['small']} gets 1 documents (60 tokens) of 7" in blend
    with no_hang(60):
        weighted = [0.5, files["good"], 0.5, files["small"]]
        assert one_line_error(build_gpt_datasets, weighted, None, SEQ, 1, 10, 8, files["tok"], files["dir"],
                              "90,10,0") == blend  # fmt: skip


def small_custom(files: dict[str, str], prefix: str, *sets: str) -> list[str]:
    return [*SMALL_TRAIN_SETS, "data.default_corpus=false", f"data.train={prefix}", f"data.tokenizer={files['tok']}",
            *sets]  # fmt: skip


def test_preflight_checks_custom_data_and_the_split_string(files, tmp_path):
    config = load_config(CONFIG, small_custom(files, files["small"]))
    assert "(the default without data.valid): the validation split" in one_line_error(
        preflight, config, tmp_path / "run", 1
    )
    # One validation pass (eval.batches x micro batch) must fit the 2 samples of that split (eval.batches=1).
    fits = small_custom(files, files["small"], "data.split=50,50,0", "eval.batches=1")
    preflight(load_config(CONFIG, fits), tmp_path / "run", 1)
    # A malformed split is refused even where it would be ignored (the default corpus).
    bad = load_config(CONFIG, [*SMALL_TRAIN_SETS, "data.split=98,2"])
    assert one_line_error(preflight, bad, tmp_path / "run", 1).startswith("data.split='98,2': give three")
    both = load_config(CONFIG, small_custom(files, files["good"], f"data.valid={files['good']}", "data.split=9,1,0"))
    assert "data.split and data.valid both given" in one_line_error(preflight, both, tmp_path / "run", 1)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("kind", "sets", "message"),
    [
        ("small", [], "data.split=98,2,0 (the default without data.valid): the validation split of {p} gets 0 "
                      "documents (0 tokens) of 7; it needs at least train.seq_len+1=65 tokens"),
        ("truncated_idx", [], "data.train: {p}.idx is truncated: 177 bytes"),
        ("small", ["data.split=abc"], "data.split='abc': give three non-negative shares"),
    ],
)  # fmt: skip
def test_train_cli_exits_2_with_one_line_and_leaves_the_run_dir(files, tmp_path, kind, sets, message):
    prefix = files["small"] if kind == "small" else _damage(files, tmp_path, kind)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = [sys.executable, "-m", "megatron_adamc.cli", "train", "--config", str(CONFIG), "--output-dir", str(out)]
    for item in small_custom(files, prefix, *sets):
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "megatron-adamc train: error:" in line]
    assert len(lines) == 1 and message.format(p=prefix) in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    shutil.rmtree(out)
