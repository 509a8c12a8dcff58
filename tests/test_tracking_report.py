"""``megatron-adamc report`` on synthetic AdamW and AdamC runs whose ratios follow the theory."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest

from megatron_adamc.cli import report as report_cli
from megatron_adamc.core.theory import sgd_grad_weight_ratio
from megatron_adamc.errors import UserError
from megatron_adamc.metrics_file import MetricsFile


def main(argv: list[str]) -> int:
    """The ``report`` sub-command alone (the full CLI imports every other sub-command too)."""
    parser = argparse.ArgumentParser()
    report_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


LAYERS = [f"layers.{i}.{m}.weight" for i in range(4) for m in ("attn.qkv", "mlp.fc2")]


def synthetic_run(path: Path, adamc: bool, steps: int = 400, interval: int = 10, seed: int = 0) -> Path:
    """Cosine lr from 1e-3; each layer's measured ratio relaxes toward the predicted one, with noise."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    metrics = MetricsFile(path)
    lam, lr_max = 0.1, 1e-3
    ratios = {name: 0.5 * sgd_grad_weight_ratio(lam, lr_max) for name in LAYERS}
    for step in range(steps):
        lr = lr_max * 0.5 * (1 + math.cos(math.pi * step / steps)) + 1e-5
        row: dict = {"step": step, "loss": 4.0 * math.exp(-step / 150) + 2.0 + 0.02 * rng.random(), "lr": lr}
        row["weight_decay"] = lam * lr / lr_max if adamc else lam
        grad_norm = 0.0
        for name in LAYERS:
            predicted = sgd_grad_weight_ratio(lam, lr, lr_max if adamc else None)
            ratios[name] += 0.05 * (predicted - ratios[name])
            weight = 10.0 + 5.0 * math.sin(step / 80)
            grad_norm += (ratios[name] * weight) ** 2
            if step % interval == 0:
                row[f"weight_norm/{name}"] = weight
                row[f"grad_norm/{name}"] = ratios[name] * weight
                row[f"grad_weight_ratio/{name}"] = ratios[name] * (1 + 0.03 * rng.gauss(0, 1))
                row[f"predicted_ratio/{name}"] = predicted
                row[f"update_weight_ratio/{name}"] = math.sqrt(lr * lam) * (1 + 0.05 * rng.random())
                row[f"predicted_update_ratio/{name}"] = math.sqrt(2 * lr * row["weight_decay"] * 0.1 / 1.9)
                module = name.removesuffix(".weight")
                row[f"act_rms/{module}"] = 1.0 + step / steps * (2 if adamc else 4)
        if step % interval == 0:
            for layer in range(4):
                row[f"max_attn_logit/layers.{layer}"] = 5.0 + layer + step / steps * (3 if adamc else 30)
        row["grad_norm"] = math.sqrt(grad_norm)
        if step % interval == 0 and step > 0:
            row["fp8/weight/overflow_frac"] = 0.0
            row["fp8/grad/overflow_frac"] = 1e-4 * (step / steps) * (1 if adamc else 5)
            row["bf16_stale_frac"] = 0.1 + 0.5 * (1 - lr / lr_max)
        metrics.append(row)
    metrics.append_event("spike", 123, kind="loss", value=9.0, zscore=8.0)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    adamw = synthetic_run(root / "adamw", adamc=False)
    adamc = synthetic_run(root / "adamc", adamc=True, seed=1)
    out = root / "report"
    assert main(["report", str(adamw), str(adamc), "--output", str(out)]) == 0
    return out


def test_report_writes_every_figure(report: Path) -> None:
    for name in ("loss", "grad_norm", "ratio", "update_ratio", "weight_norms", "max_logit", "act_rms", "fp8_overflow"):
        png = report / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 10_000, name  # a blank canvas is smaller


def test_summary_compares_runs(report: Path) -> None:
    summary = (report / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| adamw") or line.startswith("| adamc")]
    assert len(rows) == 2
    gap = {row.split("|")[1].strip(): float(row.split("|")[7]) for row in rows}
    # AdamC sits on its flat line; under AdamW the prediction runs away at the end and the layers lag behind it.
    assert gap["adamc"] == pytest.approx(1.0, abs=0.1)
    assert 0.5 < gap["adamw"] < 0.9
    assert "![Per-layer ||g||/||x||" in summary and "## Spikes" in summary
    logit = {row.split("|")[1].strip(): float(row.split("|")[8]) for row in rows}
    # The largest logit: layer 3 at the last tracked step (3 significant digits in the table).
    assert logit == pytest.approx({"adamw": 8.0 + 30 * 390 / 400, "adamc": 8.0 + 3 * 390 / 400}, rel=5e-3)


def test_missing_metrics_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        main(["report", str(tmp_path)])
    assert "no metrics.jsonl" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"step": 0, "loss": 1.0}) + "\n"
    (tmp_path / "metrics.jsonl").write_text(good + "{oops\n" + good)  # a torn LAST line would be dropped instead
    with pytest.raises(UserError, match="metrics.jsonl:2"):
        main(["report", str(tmp_path), "-o", str(tmp_path / "r")])
