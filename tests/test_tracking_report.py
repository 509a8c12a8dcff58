"""``megatron-adamc report`` on synthetic AdamW, AdamC and SGD runs whose ratios follow the theory."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest

from megatron_adamc.cli import report as report_cli
from megatron_adamc.core import theory
from megatron_adamc.errors import UserError
from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.tracking import forms


def main(argv: list[str]) -> int:
    """The ``report`` sub-command alone (the full CLI imports every other sub-command too)."""
    parser = argparse.ArgumentParser()
    report_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


LAYERS = [f"layers.{i}.{m}.weight" for i in range(4) for m in ("attn.qkv", "mlp.fc2")] + [
    "tok_embeddings.weight",
    "output.weight",
]
BETA1 = 0.9


def synthetic_run(path: Path, optimizer: str, steps: int = 400, interval: int = 10, seed: int = 0) -> Path:
    """Cosine lr from 1e-3; each layer's measured ratio relaxes toward the line of the form that holds for its
    optimizer (SGD: the SGD form of ||g||/||x||; Adam: Kosson's normalized update), with noise."""
    rng = random.Random(seed)
    path.mkdir(parents=True)
    metrics = MetricsFile(path)
    lam, lr_max, adamc = 0.1, 1e-3, optimizer == "adamc"
    kosson = optimizer != "sgd"
    truth = theory.kosson_normalized_update_ratio if kosson else None

    def line(lr: float) -> float:
        cap = lr_max if adamc else None
        return truth(lam, lr, BETA1, cap) if truth else theory.sgd_grad_weight_ratio(lam, lr, cap)

    ratios = dict.fromkeys(LAYERS, 0.5 * line(lr_max))
    for step in range(steps):
        lr = lr_max * 0.5 * (1 + math.cos(math.pi * step / steps)) + 1e-5
        row: dict = {"step": step, "loss": 4.0 * math.exp(-step / 150) + 2.0 + 0.02 * rng.random(), "lr": lr}
        row["weight_decay"] = lam * lr / lr_max if adamc else lam
        grad_norm = 0.0
        for name in LAYERS:
            ratios[name] += 0.05 * (line(lr) - ratios[name])
            weight = 10.0 + 5.0 * math.sin(step / 80)
            grad_norm += (0.01 * weight) ** 2
            if step % interval == 0:
                measured = ratios[name] * (1 + 0.03 * rng.gauss(0, 1))
                row[f"weight_norm/{name}"] = weight
                row[f"grad_norm/{name}"] = 0.01 * weight
                row[f"cos_weight_grad/{name}"] = 0.01 * rng.gauss(0, 1)
                if kosson:
                    cap = lr_max if adamc else None
                    row[f"grad_weight_ratio/{name}"] = 0.01
                    row[f"update_weight_ratio/{name}"] = measured * lr
                    row[f"normalized_update_ratio/{name}"] = measured
                    row[f"predicted_adam_ratio/{name}"] = theory.adam_normalized_update_ratio(lam, lr, cap)
                    row[f"predicted_kosson_ratio/{name}"] = line(lr)
                else:
                    row[f"grad_weight_ratio/{name}"] = measured
                    row[f"predicted_ratio/{name}"] = line(lr)
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
    runs = [synthetic_run(root / name, name, seed=i) for i, name in enumerate(("adamw", "adamc", "sgd"))]
    out = root / "report"
    assert main(["report", *map(str, runs), "--output", str(out)]) == 0
    return out


def summary_rows(summary: str, header: str) -> dict[str, list[str]]:
    """The rows of the table whose header starts with ``header``, by their first cell (+ second, if not a number)."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        key = cells[0] if header.startswith("| run | steps") else f"{cells[0]} {cells[1]}"
        rows[key] = cells
    return rows


def test_report_writes_every_figure(report: Path) -> None:
    figures = ("loss", "grad_norm", "ratio", "normalized_update", "weight_norms", "max_logit", "act_rms")
    for name in (*figures, "fp8_overflow"):
        png = report / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 10_000, name  # a blank canvas is smaller


def test_summary_uses_the_form_of_each_optimizer(report: Path) -> None:
    summary = (report / "summary.md").read_text()
    rows = summary_rows(summary, "| run | steps")
    assert set(rows) == {"adamw", "adamc", "sgd"}
    assert [rows[r][6] for r in ("adamw", "adamc", "sgd")] == ["Adam", "Adam", "SGD"]
    sgd, adam, kosson = ({r: cells[7 + i] for r, cells in rows.items()} for i in range(3))
    # Each run is compared only with the forms of its own optimizer.
    assert sgd["adamw"] == sgd["adamc"] == "-" and adam["sgd"] == kosson["sgd"] == "-"
    # AdamC sits on Kosson's flat line, so 1/sqrt(19) of Defazio's Adam form.
    assert float(kosson["adamc"]) == pytest.approx(1.0, abs=0.1)
    assert float(adam["adamc"]) == pytest.approx(1 / theory.momentum_factor(BETA1), rel=0.1)
    # Under plain decay (AdamW, SGD) the prediction runs away at the end of the cosine and the layers lag behind it.
    assert 0.5 < float(kosson["adamw"]) < 0.9 and 0.5 < float(sgd["sgd"]) < 0.9
    assert "![Per-layer normalized update" in summary and "## Spikes" in summary
    assert theory.ADAM_FORM in summary and theory.KOSSON_FORM in summary and theory.SGD_FORM in summary
    # The largest logit: layer 3 at the last tracked step (3 significant digits in the table).
    logit = {r: float(cells[10]) for r, cells in rows.items() if r != "sgd"}
    assert logit == pytest.approx({"adamw": 8.0 + 30 * 390 / 400, "adamc": 8.0 + 3 * 390 / 400}, rel=5e-3)


def test_summary_by_layer_type(report: Path) -> None:
    rows = summary_rows((report / "summary.md").read_text(), "| run | form |")
    assert set(rows) == {"adamw adam", "adamw kosson", "adamc adam", "adamc kosson", "sgd sgd"}
    linear, embedding, output = (float(c) for c in rows["adamc kosson"][2:5])
    assert linear == pytest.approx(1.0, abs=0.1) and embedding == pytest.approx(1.0, abs=0.15)
    assert output == pytest.approx(1.0, abs=0.15)


def test_missing_metrics_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        main(["report", str(tmp_path)])
    assert "no metrics.jsonl" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"step": 0, "loss": 1.0}) + "\n"
    (tmp_path / "metrics.jsonl").write_text(good + "{oops\n" + good)  # a torn LAST line would be dropped instead
    with pytest.raises(UserError, match="metrics.jsonl:2"):
        main(["report", str(tmp_path), "-o", str(tmp_path / "r")])


def test_steps_too_small_to_move_fp32_weights_are_left_out() -> None:
    """A cosine to zero ends at lr ~1e-10: the update is lost to the rounding of the FP32 weights, so its measured
    ratio says nothing; the summary's "last" is the last step with lr >= 1e-3 of the peak."""
    rows = [{"step": s, "lr": lr} for s, lr in ((1, 1e-3), (2, 5e-4), (3, 1.1e-6), (4, 1e-10))]
    assert [r["step"] for r in forms.resolvable(rows)] == [1, 2, 3]
    assert forms.resolvable([{"step": 1}]) == [{"step": 1}]
