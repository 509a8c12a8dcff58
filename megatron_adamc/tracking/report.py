"""PNG plots and a markdown summary of one or more runs' ``metrics.jsonl`` (several runs overlaid).

The figures that matter set each layer's measured ratio against the steady state of ITS optimizer, labelled
(``tracking/forms.py``): for SGD ||g||/||x|| against sqrt(2 lambda_t / gamma_t); for Adam the normalized update
||dx||/(lr_t ||x||) against Defazio's Adam form sqrt(2 lambda_t / lr_t) and Kosson's rotational equilibrium, a factor
sqrt((1 + beta1) / (1 - beta1)) lower. With plain AdamW the prediction climbs as the lr decays; with AdamC it stays
at its lr_max value. Adam's raw ||g||/||x|| is plotted too, with no line: no form predicts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

from megatron_adamc.metrics_file import FILE_NAME, MetricsFile, MetricsFileError
from megatron_adamc.tracking.forms import (
    FORMS,
    by_layer_type,
    cosine_by_layer_type,
    forms_present,
    geometric_mean,
    resolvable,
    row_ratios,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MAX_LAYERS = 6
SHOWN_TYPES = ("linear", "embedding", "output")  # the decayed kinds (norm gains get no decay, so no prediction)


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


PREDICTED_PREFIXES = tuple(dict.fromkeys(form.predicted + "/" for form in FORMS.values()))


def _tracked_names(runs: list[Run], prefixes: tuple[str, ...] = PREDICTED_PREFIXES) -> list[str]:
    """Up to MAX_LAYERS names under ``prefixes`` (default: parameters with a prediction), spread over the depth."""
    names: list[str] = []
    for run in runs:
        for prefix in prefixes:
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
    runs: list[Run], names: list[str], measured: str, predicted: list[tuple[str, str, str]], title: str, out: Path
) -> bool:
    """One panel per name: each run's measured ``measured/<name>`` (solid) and each ``(prefix, style, label)`` of
    ``predicted`` (that run's colour, the given line style) where the run has it."""
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
            for prefix, style, what in predicted:
                steps, values = run.series(f"{prefix}/{name}")
                if steps:
                    ax.plot(steps, values, style, color=f"C{index}", lw=1.2, label=f"{run.label} {what}")
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


def _last_predicted_row(run: Run, form: str) -> dict[str, Any] | None:
    """The last row holding a prediction of ``form`` (a tracked step) whose lr still moves the FP32 weights."""
    prefix = FORMS[form].predicted + "/"
    return next((row for row in reversed(resolvable(run.rows)) if any(key.startswith(prefix) for key in row)), None)


def _last_gap(run: Run, form: str) -> float | None:
    """Geometric mean over parameters of measured / predicted in ``form`` at the last tracked step (1 = on the line);
    None when the run has no prediction of that form (it does not apply to the run's optimizer)."""
    row = _last_predicted_row(run, form)
    return geometric_mean(row_ratios(row, form).values()) if row else None


def _prediction_kind(run: Run) -> str:
    forms = forms_present(run.rows)
    if "adam" in forms:
        return "Adam"
    return "SGD" if "sgd" in forms else "-"


def _layer_type_section(runs: list[Run]) -> list[str]:
    """Measured/predicted at the last tracked step by layer type, per form that applies, and mean cos(x, g): which
    kind of tensor sits on which line (the theory assumes the loss is blind to the weight's scale, cos = 0)."""
    lines = ["", "## Steady state by layer type (last tracked step)", ""]
    lines += [f"- `{form.name}`: {form.label}" for form in FORMS.values()]
    lines += ["", "| run | form | linear | embedding | output | cos(x, g): linear / embedding / output |"]
    lines += ["|---|---|---|---|---|---|"]
    drawn = False
    for run in runs:
        for form in forms_present(run.rows):
            row = _last_predicted_row(run, form)
            types = by_layer_type([row], form) if row else {}
            cos = cosine_by_layer_type([row]) if row else {}
            cells = " | ".join(
                _fmt(types[k]["mean"], ".3f") if k in types else "-" for k in ("linear", "embedding", "output")
            )
            cos_cell = " / ".join(_fmt(cos.get(k), ".3f") for k in ("linear", "embedding", "output"))
            lines.append(f"| {run.label} | {form} | {cells} | {cos_cell} |")
            drawn = True
    return lines if drawn else []


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
        "Per-layer ||g||/||x|| (solid); dashed: the " + FORMS["sgd"].label + ", drawn for SGD runs only (Adam's raw "
        "gradient does not settle: its forms are in the next figure)",
        _per_layer_plot(
            runs,
            names,
            "grad_weight_ratio",
            [("predicted_ratio", "--", "SGD form")],
            "||g|| / ||x||",
            output / "ratio.png",
        ),  # fmt: skip
    )
    add(
        "normalized_update.png",
        "Per-layer normalized update ||dx||/(lr_t ||x||) of Adam runs (solid); dashed: "
        + FORMS["adam"].label
        + "; dotted: "
        + FORMS["kosson"].label,
        _per_layer_plot(
            runs,
            names,
            "normalized_update_ratio",
            [("predicted_adam_ratio", "--", "Adam form (Defazio)"), ("predicted_kosson_ratio", ":", "Kosson")],
            "||dx|| / (lr ||x||)",
            output / "normalized_update.png",
        ),
    )
    add(
        "weight_norms.png",
        "Per-layer weight norms",
        _per_layer_plot(runs, names, "weight_norm", [], "||x||", output / "weight_norms.png"),
    )
    add(
        "max_logit.png",
        "Per-layer max attention logit (grows before a divergence; QK-norm / capping hold it)",
        _per_layer_plot(
            runs,
            _tracked_names(runs, ("max_attn_logit/",)),
            "max_attn_logit",
            [],
            "max logit",
            output / "max_logit.png",
        ),
    )
    add(
        "act_rms.png",
        "RMS of the outputs of QKV, attention projection, FC1 and FC2",
        _per_layer_plot(runs, _tracked_names(runs, ("act_rms/",)), "act_rms", [], "output RMS", output / "act_rms.png"),
    )
    fp8_keys = [(f"fp8/{kind}/overflow_frac", style) for kind, style in (("weight", "-"), ("grad", ":"), ("act", "--"))]
    add(
        "fp8_overflow.png",
        "FP8 overflow fraction (delayed scaling simulation)",
        _line_plot(runs, fp8_keys, "FP8 overflow fraction", "fraction", output / "fp8_overflow.png", False),
    )

    lines = ["# Training report", "", f"Runs: {', '.join(f'`{run.path}`' for run in runs)}", ""]
    lines += [
        "| run | steps | final loss | min loss | final grad norm | max grad norm | prediction | "
        "measured/predicted (last): SGD form | Adam form (Defazio) | rotational (Kosson) | "
        "max attention logit | spikes | max FP8 overflow | bf16 stale (last) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        _, losses = run.series("loss")
        _, norms = run.series("grad_norm")
        overflow = [v for kind in ("weight", "grad", "act") for v in run.series(f"fp8/{kind}/overflow_frac")[1]]
        logits = [v for key in run.keys("max_attn_logit/") for v in run.series(key)[1]]
        gaps = " | ".join(_fmt(_last_gap(run, form), ".3f") for form in FORMS)
        lines.append(
            f"| {run.label} | {run.rows[-1]['step']} | {_fmt(losses[-1] if losses else None)} | "
            f"{_fmt(min(losses) if losses else None)} | {_fmt(norms[-1] if norms else None)} | "
            f"{_fmt(max(norms) if norms else None)} | {_prediction_kind(run)} | {gaps} | "
            f"{_fmt(max(logits) if logits else None, '.3g')} | "
            f"{sum(1 for e in run.events if e.get('event') == 'spike')} | "
            f"{_fmt(max(overflow) if overflow else None, '.2e')} | {_fmt(run.last('bf16_stale_frac'), '.3f')} |"
        )
    lines += _layer_type_section(runs)
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
