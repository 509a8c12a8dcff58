"""The trainer end to end on this CPU: the run directory's files, the scale features keeping the losses, and every bad
input failing with one line while an existing run directory stays untouched (exact resume: test_resume_rules.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trainer_runs as runs
from cli_runs import cli
from conftest import SMALL_CORPUS_DIR
from trainer_runs import losses, run

from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.train.schedule import lr_multiplier

SMALL = ["eval.interval=6"]


@pytest.fixture(scope="session")
def data_cache() -> str:
    return str(SMALL_CORPUS_DIR)


def train_cmd(out: Path, data_cache: str, *sets: str, nproc: int = 1) -> list[str]:
    return runs.train_cmd(out, *SMALL, f"data.cache_dir={data_cache}", *sets, nproc=nproc)


def test_run_directory_contents(tmp_path, data_cache):
    out = tmp_path / "run"
    # A hair-trigger spike alarm (z > 0.01 over the last 8 steps) so that spike events happen in 12 steps.
    proc = run(
        train_cmd(out, data_cache, "logging.tensorboard=true", "tracking.spike_zscore=0.01", "tracking.interval=5")
    )
    assert "final train loss" in proc.stdout and "validation loss" in proc.stdout
    metrics = MetricsFile(out).read(strict=True)
    records = metrics.rows
    spikes = [e for e in metrics.events if e["event"] == "spike"]
    assert spikes and all(e["kind"] in ("loss", "grad_norm") and e["zscore"] > 0.01 for e in spikes)
    assert all(f"spike at step {e['step']}" in proc.stdout for e in spikes)  # written and printed
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("step", "tokens", "loss", "lr", "weight_decay", "grad_norm", "tokens_per_s"):
        assert key in records[-1], key
    assert records[-1]["tokens"] == 12 * 2 * 64
    assert records[5]["val_loss"] > 0 and records[-1]["loss"] < records[0]["loss"]
    # AdamC: the applied decay follows lr / lr_max with lr_max = optimizer.lr (3e-3), lambda = 0.1
    for r in records:
        assert r["weight_decay"] == pytest.approx(0.1 * r["lr"] / 3e-3, rel=1e-9)
    tracked = [r["step"] for r in records if any(k.startswith("grad_weight_ratio/layers.0.attn.qkv") for k in r)]
    assert tracked[:2] == [5, 10] and tracked[-1] == 12  # every 5 steps and the last (spikes may add steps)
    info = json.loads((out / "run.json").read_text())
    assert info["zero_stage"] == 1 and info["config"]["optimizer"]["type"] == "AdamC"
    (invocation,) = info["invocations"]
    assert invocation["world_size"] == 1 and invocation["num_nodes"] == 1 and invocation["versions"]["deepspeed"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_12"
    assert list((out / "tb").iterdir())


@pytest.mark.parametrize(
    ("sets", "message", "in_process"),
    [
        (["train.stepz=3"], "config: train.stepz: unknown key", True),
        (["optimizer.type=Adam"], "optimizer.type: Input should be 'AdamC' or 'AdamW'", True),
        (["data.default_corpus=false", "data.train=/nonexistent/prefix", "data.tokenizer=/nonexistent.model"],
         "data.train", True),
        (["train.seq_len=4096"], "train.seq_len=4096 is above the model's max_seq_len=256", True),
        # known only once the tokenizer is built, after the process group: a real trainer process
        (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the tokenizer's 512 tokens", False),
        (["train.deepspeed=configs/deepspeed/missing.json"], "train.deepspeed=configs/deepspeed/missing.json: no such",
         True),
    ],
)  # fmt: skip
def test_bad_input_one_line_and_run_dir_untouched(tmp_path, data_cache, sets, message, in_process):
    """Checks that end before any process group run in this process (``cli``), the same code path as the command."""
    out = tmp_path / "existing"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    cmd = train_cmd(out, data_cache, *sets)
    proc = cli(*cmd[cmd.index("train") :]) if in_process else run(cmd, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "megatron-adamc train: error:" in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_deepspeed_json_contradiction(tmp_path, data_cache):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 1}}))
    cmd = train_cmd(tmp_path / "run", data_cache, f"train.deepspeed={bad}")
    proc = cli(*cmd[cmd.index("train") :])
    assert proc.returncode == 2
    assert "train_micro_batch_size_per_gpu=16 contradicts train.micro_batch_size=2" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_schedules_peak_at_one_and_end_at_min(kind):
    f = lr_multiplier(kind, steps=100, warmup=10, min_ratio=0.1, decay_fraction=0.2)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # linear warmup from 1/10
    assert max(values) == pytest.approx(1.0)
    assert values[-1] == pytest.approx(1.0 if kind == "constant" else 0.1)
    if kind == "wsd":
        assert values[79] == 1.0 and values[80] < 1.0  # stable, then the last 20% decays


def test_activation_checkpointing_and_loader_workers_keep_the_losses(tmp_path, data_cache):
    """The scale features through the real trainer: same batches, same losses (the model tests bound them; here
    they come out bitwise equal on one rank)."""
    runs_ = {}
    for name, sets in {
        "plain": ["train.activation_checkpointing=none", "data.num_workers=0"],
        "selective": ["train.activation_checkpointing=selective", "data.num_workers=2"],
        "full": ["train.activation_checkpointing=full", "data.num_workers=1"],
    }.items():
        run(train_cmd(tmp_path / name, data_cache, "train.steps=6", *sets))
        runs_[name] = losses(tmp_path / name)
    assert runs_["selective"] == runs_["plain"] and runs_["full"] == runs_["plain"]
