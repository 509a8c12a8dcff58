"""Continued pretraining from released weights, end to end: a run's checkpoint -> export to Hugging Face -> import-hf
-> ``train`` with ``checkpoint.init_from``. The new run starts from exactly those weights: its first validation loss
(after one step at a negligible lr) equals the exported run's last one on the same validation batches."""

from __future__ import annotations

import pytest
from trainer_runs import run, train_cmd

from megatron_adamc.cli import main
from megatron_adamc.metrics_file import MetricsFile

pytest.importorskip("transformers")


def test_export_import_and_continue(tmp_path, capsys) -> None:
    first, second = tmp_path / "first", tmp_path / "continued"
    run(train_cmd(first, "eval.interval=6", steps=6))
    assert main(["export", str(first), "--format", "hf", "--output", str(tmp_path / "hf")]) == 0
    assert main(["import-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    capsys.readouterr()
    weights = tmp_path / "imported" / "model.safetensors"
    proc = run(train_cmd(second, f"checkpoint.init_from={weights}", "optimizer.lr=1.0e-30", "eval.interval=1", steps=3))
    assert f"initialised the model from {weights}" in proc.stdout
    last = MetricsFile(first).read(strict=True).rows[-1]["val_loss"]
    start = MetricsFile(second).read(strict=True).rows[0]["val_loss"]
    assert start == pytest.approx(last, rel=1e-6), (start, last)
    # A resume of the continued run ignores init_from: it continues from its own checkpoint.
    resumed = run(train_cmd(second, f"checkpoint.init_from={weights}", "optimizer.lr=1.0e-30", steps=4))
    assert "initialised the model" not in resumed.stdout and "resumed from" in resumed.stdout
