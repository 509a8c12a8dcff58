"""Learning-rate sweeps of the stability methods on the tiny Llama: which lr does each survive, at what loss?

Variants (Rybakov et al. arXiv 2410.16682; Takase et al. arXiv 2312.16903): the baseline; QK-norm; QK-norm + tanh
softmax capping; QKV-norm with the attention pre-norm removed; norms after QK, Proj and FC2 (Rybakov's method 1);
scaled embeddings + small init. Each runs a constant lr (after a short warmup) on a log grid. A run has diverged
when its loss goes non-finite, or its final loss is no better than the unigram entropy of the training tokens (the
loss of predicting token frequencies alone: everything learned is lost), or above its first-step loss. The RMS of
the QKV, Proj and FC2 outputs is tracked, since Rybakov et al. see them grow step by step before a divergence.
A grid's largest stable lr is coarse (a factor 2 here), so Wortsman et al.'s LR sensitivity is reported beside it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from megatron_adamc.errors import UserError
from megatron_adamc.experiments._figure import save_figure
from megatron_adamc.experiments._trainer_runs import LlmConfig, RunQueue, series, window_mean

HEADLINE_KEYS = ("max_stable_lr", "loss_at_common_lr", "lr_ratio_over_qk_norm", "lr_sensitivity")
VariantName = Literal["baseline", "qk_norm", "qk_norm_cap", "qkv_norm", "qk_proj_fc2_norm", "scaled_embed"]
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "qk_norm": {"qk_norm": True},
    "qk_norm_cap": {"qk_norm": True},  # + softmax_cap from the config
    "qkv_norm": {"qkv_norm": True},  # the model drops the attention pre-norm with it (Rybakov's method 2)
    "qk_proj_fc2_norm": {"qk_norm": True, "post_proj_norm": True, "post_fc2_norm": True},
    "scaled_embed": {"embedding_scale": "sqrt_d", "init": "small"},
}
ACTIVATIONS = ("attn.qkv", "attn.proj", "mlp.fc2")
FINAL_FRACTION = 0.1  # the final loss is the mean over the last 10% of steps: one step is too noisy


class Config(LlmConfig):
    """Defaults: 6 variants x 7 lrs x 200 steps, ~16 minutes on 2 CPU cores (about 22 s a run)."""

    variants: list[VariantName] = Field(default_factory=lambda: list(VARIANTS))
    lrs: list[float] = Field(
        default_factory=lambda: [1e-2, 2e-2, 4e-2, 8e-2, 0.16, 0.32, 0.64], min_length=1, description="a factor-2 grid"
    )
    common_lr: float | None = Field(2e-2, gt=0, description="the lr whose losses are compared; default: one of lrs")
    steps: int = Field(200, gt=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW; constant lr, so AdamC would be identical")
    softmax_cap: float = Field(20.0, gt=0, description="qk_norm_cap's tanh cap of the attention logits")
    divergence_loss: float | None = Field(
        None, gt=0, description="final loss above this = diverged; default: the unigram entropy of the train tokens"
    )
    tracking_interval: int = Field(10, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> Config:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs={self.lrs}: every lr must be positive")
        if self.common_lr is not None and self.common_lr not in self.lrs:
            raise ValueError(f"common_lr={self.common_lr} is not one of lrs={self.lrs}")
        return self


def run_name(variant: str, lr: float) -> str:
    return f"{variant}-lr{lr:g}"


def overrides(cfg: Config, variant: str, lr: float) -> list[str]:
    model = dict(VARIANTS[variant])
    if variant == "qk_norm_cap":
        model["softmax_cap"] = cfg.softmax_cap
    sets = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in model.items()]
    return sets + [
        f"seed={cfg.seed}",
        "optimizer.type=AdamW",
        f"optimizer.lr={lr}",
        f"optimizer.weight_decay={cfg.weight_decay}",
        "scheduler.type=constant",
        f"scheduler.warmup_steps={cfg.warmup_steps}",
        f"eval.interval={cfg.steps}",
        "eval.batches=8",
        "tracking.enabled=true",
        f"tracking.interval={cfg.tracking_interval}",
        "tracking.activations=true",
        "tracking.max_logit_sequences=0",  # the whole batch: the runs are small, the figure is the exact max
    ]


def unigram_entropy(data_cache_dir: str) -> float:
    """Entropy (nats) of the training tokens' frequencies: the loss a model reaches by ignoring the context."""
    import numpy as np

    from megatron_adamc.data.megatron_import import quiet_megatron_import

    quiet_megatron_import()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = os.path.join(os.path.expanduser(data_cache_dir), "train")
    if not os.path.isfile(prefix + ".bin"):
        raise UserError(f"{prefix}.bin: no training tokens to measure; set divergence_loss=<nats> instead")
    dataset = IndexedDataset(prefix)
    counts = np.bincount(np.fromfile(prefix + ".bin", dtype=dataset.index.dtype).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def activation_growth(records: list[dict[str, Any]], stop_step: int) -> dict[str, dict[str, float]]:
    """Per output kind (qkv/proj/fc2): the largest RMS over layers at the first tracked step and at the last finite
    tracked step up to ``stop_step``, and their ratio (the growth before a divergence)."""
    out = {}
    tracked = [r for r in records if r["step"] <= stop_step and any(k.startswith("act_rms/") for k in r)]
    for kind in ACTIVATIONS:

        def largest(record: dict[str, Any], kind: str = kind) -> float:
            vals = [v for k, v in record.items() if k.startswith("act_rms/") and k.endswith(kind)]
            return max(vals) if vals and all(math.isfinite(v) for v in vals) else math.nan

        values = [(r["step"], largest(r)) for r in tracked]
        values = [(s, v) for s, v in values if math.isfinite(v)]
        if not values:
            continue
        (s0, first), (s1, last) = values[0], values[-1]
        out[kind] = {"first_step": s0, "first": first, "last_step": s1, "last": last, "growth": last / first}
    logits = [(r["step"], v) for r in tracked for k, v in r.items() if k.startswith("max_attn_logit/")]
    finite = [v for _, v in logits if math.isfinite(v)]
    if finite:
        last_step = max(s for s, _ in logits)
        out["max_attn_logit"] = {"last": max(v for s, v in logits if s == last_step), "max": max(finite)}
    return out


def summarize_run(cfg: Config, records: list[dict[str, Any]], variant: str, lr: float, threshold: float) -> dict:
    """Diverged or not, and why; the final losses; the activation growth up to the divergence."""
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    bad = next((s for s, v in losses if v is None or not math.isfinite(v)), None)
    final = window_mean(records, "loss", 1.0 - FINAL_FRACTION, 1.0, cfg.steps)
    initial = losses[0][1]
    reason = None
    if bad is not None or not math.isfinite(final):
        reason = f"non-finite loss at step {bad}"
    elif final > initial:
        reason = f"final loss {final:.3f} above the first step's {initial:.3f}"
    elif final > threshold:
        reason = f"final loss {final:.3f} above the unigram level {threshold:.3f}"
    val_steps, val = series(records, "val_loss")
    after = [v for s, v in losses if s > cfg.warmup_steps and not math.isnan(v)]
    return {
        "name": run_name(variant, lr),
        "variant": variant,
        "lr": lr,
        "diverged": reason is not None,
        "reason": reason,
        "initial_loss": initial,
        "final_train_loss": final,
        "final_val_loss": val[-1] if val else math.nan,
        "max_loss_after_warmup": max(after) if after else math.nan,
        "activations": activation_growth(records, (bad - 1) if bad is not None else cfg.steps),
    }


def summarize(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: the largest lr of the grid below which no run diverged, the loss at the common lr, and the
    activation growth at that lr and at the first diverging lr; then the ratios the papers state."""
    common = cfg.common_lr if cfg.common_lr is not None else sorted(cfg.lrs)[len(cfg.lrs) // 2]
    max_stable, first_diverged, loss_common, growth, sensitivity = {}, {}, {}, {}, {}
    for variant in cfg.variants:
        grid = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["lr"])
        # Wortsman et al.'s LR sensitivity: mean over the grid of min(final, initial loss) minus the best final loss.
        capped = [min(r["final_train_loss"], r["initial_loss"]) if math.isfinite(r["final_train_loss"]) else
                  r["initial_loss"] for r in grid]  # fmt: skip
        sensitivity[variant] = sum(capped) / len(capped) - min(capped)
        stable = None
        for r in grid:  # the largest lr with every smaller lr stable too
            if r["diverged"]:
                first_diverged[variant] = r["lr"]
                break
            stable = r["lr"]
        max_stable[variant] = stable
        at = next((r for r in grid if r["lr"] == common), None)
        loss_common[variant] = None if at is None or at["diverged"] else at["final_val_loss"]
        worst = next((r for r in grid if r["diverged"]), grid[-1])
        growth[variant] = {
            "at_common_lr": at["activations"] if at else None,
            "at_first_diverged_or_largest_lr": {"lr": worst["lr"], **worst["activations"]},
        }
    ratio = {}
    base = max_stable.get("qk_norm")
    for variant in ("qk_norm_cap", "qkv_norm", "qk_proj_fc2_norm"):
        if variant in max_stable and base and max_stable[variant]:
            ratio[variant] = max_stable[variant] / base
    return {
        "common_lr": common,
        "max_stable_lr": max_stable,
        "first_diverged_lr": {v: first_diverged.get(v) for v in cfg.variants},
        "loss_at_common_lr": loss_common,
        "lr_ratio_over_qk_norm": ratio,
        "lr_sensitivity": sensitivity,
        "activation_growth": growth,
        "grid_note": "max_stable_lr is the largest grid lr with every lr up to it stable; None: even the smallest "
        "diverged; equal to the largest lr: nothing diverged, the limit is above the grid",
    }


def plot(cfg: Config, curves: dict[str, list[dict]], runs: list[dict], summary: dict, threshold: float, path: Path):
    """Final loss vs lr per variant (x = diverged), and the largest QKV/Proj/FC2 output RMS over steps at the
    largest lr (solid) and the common lr (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors, strict=False))
    ax = axes[0, 0]
    for variant in cfg.variants:
        grid = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in grid]
        finals = [r["final_train_loss"] if math.isfinite(r["final_train_loss"]) else threshold + 1.0 for r in grid]
        ax.plot(lrs, finals, "-", color=colors[variant], lw=1, label=variant)
        for r, y in zip(grid, finals, strict=True):
            ax.plot(r["lr"], y, "x" if r["diverged"] else "o", color=colors[variant], ms=7 if r["diverged"] else 4)
    ax.axhline(threshold, color="0.4", ls=":", lw=1, label=f"unigram level {threshold:.2f} (divergence)")
    ax.set(xscale="log", xlabel="lr (constant)", ylabel=f"train loss, mean of last {FINAL_FRACTION:.0%}")
    ax.set_title(f"final loss vs lr ({cfg.steps} steps; x = diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    top, common = max(cfg.lrs), summary["common_lr"]
    for ax, kind in zip(axes.flat[1:], ACTIVATIONS, strict=True):
        for variant in cfg.variants:
            for lr, style in ((top, "-"), (common, "--")):
                records = curves.get(run_name(variant, lr), [])
                pts = []
                for r in records:
                    vals = [v for k, v in r.items() if k.startswith("act_rms/") and k.endswith(kind)]
                    if vals and all(math.isfinite(v) for v in vals):
                        pts.append((r["step"], max(vals)))
                if pts:
                    label = variant if style == "-" else None
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[variant], lw=1, label=label)
        ax.set(yscale="log", xlabel="step", title=f"max over layers of RMS({kind} output): lr {top:g} -, {common:g} --")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, f"Stability methods, model={cfg.model}, AdamW wd={cfg.weight_decay:g}, seed {cfg.seed}")


def run(cfg: Config, output_dir: Path) -> dict:
    """Sweep every (variant, lr); write results.json and stability.png under output_dir; return the results."""
    output_dir.mkdir(parents=True, exist_ok=True)
    todo = [(v, lr) for v in cfg.variants for lr in sorted(cfg.lrs)]
    queue = RunQueue(cfg, output_dir, total_steps=len(todo) * cfg.steps)
    curves = {}
    for variant, lr in todo:
        name = run_name(variant, lr)
        curves[name] = queue.run(name, overrides(cfg, variant, lr), cfg.steps, len(todo))
    cache = cfg.data_cache_dir or f"~/.cache/megatron-adamc/experiments-v{cfg.vocab_size}"
    threshold = cfg.divergence_loss if cfg.divergence_loss is not None else unigram_entropy(cache)
    runs = [summarize_run(cfg, curves[run_name(v, lr)], v, lr, threshold) for v, lr in todo]
    summary = summarize(cfg, runs)
    results = {
        **summary,
        "divergence_loss": threshold,
        "divergence_rule": "non-finite loss, or final loss above the first step's loss or above divergence_loss "
        "(default: the unigram entropy of the training tokens)",
        "runs": runs,
        "config": cfg.model_dump(),
        "commands": {r["name"]: (queue.runs_dir / r["name"] / "command.txt").read_text().strip() for r in runs},
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    plot(cfg, curves, runs, summary, threshold, output_dir / "stability.png")
    return results
