"""PNG plots and a markdown summary of one or more runs' ``metrics.jsonl`` (several runs overlaid).

The figure that matters is the per-layer ratio against its predicted line: with plain AdamW the measured
||g||/||x|| follows sqrt(2 lambda / gamma_t) up as the lr decays; with AdamC it stays at sqrt(2 lambda / gamma_max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from megatron_adamc.metrics_file import FILE_NAME, MetricsFile, MetricsFileError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_LAYERS = 6


class ReportError(ValueError):
    """A run directory that cannot be read; the CLI prints it as one line."""


@dataclass
class Run:
    label: str
    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(row["step"])
                values.append(float(value))
        return steps, values

    def last(self, key: str) -> float | None:
        _, values = self.series(key)
        return values[-1] if values else None

    def keys(self, prefix: str) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for key in row:
                if key.startswith(prefix):
                    seen[key] = None
        return list(seen)


def load_run(path: str | Path) -> Run:
    path = Path(path)
    try:
        metrics = MetricsFile(path).read(strict=True)
    except MetricsFileError as err:
        raise ReportError(str(err)) from err
    if not metrics.rows:
        raise ReportError(f"{path / FILE_NAME}: no line with a 'step' key; nothing to plot")
    return Run(path.name or str(path), path, metrics.rows, metrics.events)


def _labels(runs: list[Run]) -> None:
    """Directory names, or parent/name where two runs share a name."""
    names = [run.label for run in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.path.parent.name}/{run.path.name}"


def _tracked_names(runs: list[Run], prefix: str = "predicted_ratio/") -> list[str]:
    """Up to MAX_LAYERS names under ``prefix`` (default: parameters with a prediction), spread over the depth."""
    names: list[str] = []
    for run in runs:
        for key in run.keys(prefix):
            name = key.split("/", 1)[1]
            if name not in names:
                names.append(name)
    if len(names) <= MAX_LAYERS:
        return names
    step = (len(names) - 1) / (MAX_LAYERS - 1)
    return [names[round(i * step)] for i in range(MAX_LAYERS)]


def _line_plot(runs: list[Run], keys: list[tuple[str, str]], title: str, ylabel: str, out: Path, log: bool) -> bool:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for index, run in enumerate(runs):
        color = f"C{index}"
        for key, style in keys:
            steps, values = run.series(key)
            if steps:
                label = run.label if len(keys) == 1 else f"{run.label} {key.split('/')[1]}"
                ax.plot(steps, values, style, color=color, label=label, lw=1.2)
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _per_layer_plot(
    runs: list[Run], names: list[str], measured: str, predicted: str | None, title: str, out: Path
) -> bool:
    if not names:
        return False
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for index, run in enumerate(runs):
            steps, values = run.series(f"{measured}/{name}")
            if steps:
                label = f"{run.label} measured" if predicted else run.label
                ax.plot(steps, values, "-", color=f"C{index}", lw=1.2, label=label)
            if predicted:
                steps, values = run.series(f"{predicted}/{name}")
                if steps:
                    ax.plot(steps, values, "--", color=f"C{index}", lw=1.2, label=f"{run.label} predicted")
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _mean_ratio_gap(run: Run, names: list[str]) -> float | None:
    """Mean over layers of measured / predicted ||g||/||x|| at the last tracked step (1 = on the theory line)."""
    gaps = []
    for name in names:
        measured, predicted = run.last(f"grad_weight_ratio/{name}"), run.last(f"predicted_ratio/{name}")
        if measured is not None and predicted:
            gaps.append(measured / predicted)
    return sum(gaps) / len(gaps) if gaps else None


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def write_report(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Read every run, write the PNGs and ``summary.md`` into ``output``; returns the summary's path."""
    runs = [load_run(path) for path in run_dirs]
    _labels(runs)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    names = _tracked_names(runs)
    figures: list[tuple[str, str]] = []

    def add(file: str, caption: str, drawn: bool) -> None:
        if drawn:
            figures.append((file, caption))

    add("loss.png", "Loss", _line_plot(runs, [("loss", "-")], "loss", "loss", output / "loss.png", False))
    add(
        "grad_norm.png",
        "Global gradient norm (before clipping)",
        _line_plot(runs, [("grad_norm", "-")], "global grad norm", "||g||", output / "grad_norm.png", True),
    )
    add(
        "ratio.png",
        "Per-layer ||g||/||x|| (solid) against the predicted steady state (dashed)",
        _per_layer_plot(runs, names, "grad_weight_ratio", "predicted_ratio", "||g|| / ||x||", output / "ratio.png"),
    )
    add(
        "update_ratio.png",
        "Per-layer ||update||/||x|| (solid) against Adam's rotational equilibrium (dashed)",
        _per_layer_plot(
            runs, names, "update_weight_ratio", "predicted_update_ratio", "||dx|| / ||x||", output / "update_ratio.png"
        ),
    )
    add(
        "weight_norms.png",
        "Per-layer weight norms",
        _per_layer_plot(runs, names, "weight_norm", None, "||x||", output / "weight_norms.png"),
    )
    add(
        "max_logit.png",
        "Per-layer max attention logit (grows before a divergence; QK-norm / capping hold it)",
        _per_layer_plot(
            runs, _tracked_names(runs, "max_attn_logit/"), "max_attn_logit", None, "max logit", output / "max_logit.png"
        ),
    )
    add(
        "act_rms.png",
        "RMS of the outputs of QKV, attention projection, FC1 and FC2",
        _per_layer_plot(runs, _tracked_names(runs, "act_rms/"), "act_rms", None, "output RMS", output / "act_rms.png"),
    )
    fp8_keys = [(f"fp8/{kind}/overflow_frac", style) for kind, style in (("weight", "-"), ("grad", ":"), ("act", "--"))]
    add(
        "fp8_overflow.png",
        "FP8 overflow fraction (delayed scaling simulation)",
        _line_plot(runs, fp8_keys, "FP8 overflow fraction", "fraction", output / "fp8_overflow.png", False),
    )

    lines = ["# Training report", "", f"Runs: {', '.join(f'`{run.path}`' for run in runs)}", ""]
    lines += [
        "| run | steps | final loss | min loss | final grad norm | max grad norm | "
        "measured/predicted ratio (last) | max attention logit | spikes | max FP8 overflow | bf16 stale (last) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        _, losses = run.series("loss")
        _, norms = run.series("grad_norm")
        overflow = [v for kind in ("weight", "grad", "act") for v in run.series(f"fp8/{kind}/overflow_frac")[1]]
        logits = [v for key in run.keys("max_attn_logit/") for v in run.series(key)[1]]
        lines.append(
            f"| {run.label} | {run.rows[-1]['step']} | {_fmt(losses[-1] if losses else None)} | "
            f"{_fmt(min(losses) if losses else None)} | {_fmt(norms[-1] if norms else None)} | "
            f"{_fmt(max(norms) if norms else None)} | {_fmt(_mean_ratio_gap(run, names), '.3f')} | "
            f"{_fmt(max(logits) if logits else None, '.3g')} | "
            f"{sum(1 for e in run.events if e.get('event') == 'spike')} | "
            f"{_fmt(max(overflow) if overflow else None, '.2e')} | {_fmt(run.last('bf16_stale_frac'), '.3f')} |"
        )
    spikes = [(run.label, e) for run in runs for e in run.events if e.get("event") == "spike"]
    if spikes:
        lines += ["", "## Spikes", ""]
        for label, event in spikes[:20]:
            top = ", ".join(
                f"{layer['metric']} x{math.exp(layer['log_change']):.2f}" for layer in event.get("top_layers", [])[:3]
            )
            lines.append(f"- {label} step {event['step']}: {event['kind']} z={_fmt(event.get('zscore'), '.1f')}; {top}")
    lines += ["", "## Figures", ""]
    for file, caption in figures:
        lines += [f"### {caption}", "", f"![{caption}]({file})", ""]
    summary = output / "summary.md"
    summary.write_text("\n".join(lines), encoding="utf-8")
    return summary
