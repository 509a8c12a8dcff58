"""Learning-rate sweeps of the stability methods, the way the small-scale-proxy papers run them: warmup then cosine
decay, a fine lr grid (factor sqrt(2), over two decades), several seeds per cell and two model widths.

Variants (Rybakov et al. arXiv 2410.16682; Takase et al. arXiv 2312.16903; Wortsman et al. arXiv 2309.14322): the
baseline; QK-norm; QK-norm + tanh softmax capping (method 3); QKV-norm with the attention pre-norm removed (method 2);
norms after QK, Proj and FC2 (method 1); scaled embeddings + small init. A run has diverged when its loss goes
non-finite (the trainer's divergence guard stops such a run with exit 3), or climbs after warmup (10-step mean)
above its first-step loss L0 (everything learned is lost; under a cosine decay such a run may later recover part of
it, so the final loss alone misses it), or ends above the unigram entropy of the training tokens. Per variant and
width: the largest stable lr of each seed (the largest grid lr with it and every smaller lr stable) and its spread,
Wortsman's LR sensitivity E_lr[min(L(lr), L0)] - min_lr L(lr) (L0: the loss at initialization; L the final
validation loss, L0 where it is non-finite or the run was skipped; a run flagged diverged by the stricter rules above
but with a finite loss enters at min(L, L0), as in Wortsman et al.), and the best loss.
A ladder (variant, width, seed) stops after ``skip_after_diverged`` consecutive diverged lrs: the lrs above count
as diverged, at L0.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from megatron_adamc.errors import UserError
from megatron_adamc.experiments._trainer_runs import (
    LlmConfig,
    Run,
    RunQueue,
    Task,
    data_cache,
    mean_std,
    series,
    window_mean,
)

HEADLINE_KEYS = ("max_stable_lr", "lr_sensitivity", "best_loss")
VariantName = Literal["baseline", "qk_norm", "qk_norm_cap", "qkv_norm", "qk_proj_fc2_norm", "scaled_embed"]
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "qk_norm": {"qk_norm": True},
    "qk_norm_cap": {"qk_norm": True},  # + softmax_cap from the config
    "qkv_norm": {"qkv_norm": True},  # the model drops the attention pre-norm with it (Rybakov's method 2)
    "qk_proj_fc2_norm": {"qk_norm": True, "post_proj_norm": True, "post_fc2_norm": True},
    "scaled_embed": {"embedding_scale": "sqrt_d", "init": "small"},
}
DEFAULT_VARIANTS = ["baseline", "qk_norm", "qk_norm_cap", "qkv_norm"]
ACTIVATIONS = ("attn.qkv", "attn.proj", "mlp.fc2")
FINAL_FRACTION = 0.1  # the final train loss is the mean over the last 10% of steps: one step is too noisy
SPIKE_WINDOW = 10  # a run whose loss, averaged over this many steps after warmup, climbs above L0 has diverged


def sqrt2_grid(first: int, last: int) -> list[float]:
    """1e-3 * sqrt(2)^k for k = first..last, to 3 significant digits: one fixed ladder, so grids overlap exactly."""
    return [float(f"{1e-3 * 2 ** (k / 2):.3g}") for k in range(first, last + 1)]


class Config(LlmConfig):
    """Defaults: 4 variants x 2 widths x 20 lrs (0.00141 to 1.02, factor sqrt(2)) x 2 seeds = 320 runs of 200 steps,
    fewer with the ladders cut after two diverged lrs. Measured on this 2-core CPU, idle: 315 runs trained in 28 min,
    two ladders side by side (docs/results_stability.md)."""

    variants: list[VariantName] = Field(default_factory=lambda: list(DEFAULT_VARIANTS), min_length=1)
    widths: list[int] = Field(default_factory=lambda: [64, 128], min_length=1, description="model dims d")
    ffn_ratio: float = Field(3.0, gt=0, description="ffn_dim = ffn_ratio * d")
    lrs: list[float] = Field(
        default_factory=lambda: sqrt2_grid(1, 20), min_length=1, description="peak lrs; default 0.00141 to 1.02"
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    common_lr: float | None = Field(0.016, gt=0, description="the lr whose losses and activations are compared")
    steps: int = Field(200, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, lt=1, description="cosine down to this share of the peak")
    weight_decay: float = Field(0.1, ge=0, description="AdamW")
    softmax_cap: float = Field(20.0, gt=0, description="qk_norm_cap's tanh cap of the attention logits")
    divergence_loss: float | None = Field(
        None, gt=0, description="final loss above this = diverged; default: the unigram entropy of the train tokens"
    )
    skip_after_diverged: int = Field(
        2, ge=0, description="stop a ladder after this many diverged lrs in a row (0: never)"
    )
    tracking_interval: int = Field(10, gt=0)
    eval_batches: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _fits(self) -> Config:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        if any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs={self.lrs}: every lr must be positive")
        if self.common_lr is not None and self.common_lr not in self.lrs:
            raise ValueError(f"common_lr={self.common_lr} is not one of lrs={self.lrs}")
        if any(w <= 0 for w in self.widths):
            raise ValueError(f"widths={self.widths}: every width must be positive")
        return self


def run_name(variant: str, width: int, lr: float, seed: int) -> str:
    return f"{variant}-d{width}-lr{lr:g}-seed{seed}"


def overrides(cfg: Config, variant: str, width: int, lr: float, seed: int) -> list[str]:
    model = {"dim": width, "ffn_dim": round(cfg.ffn_ratio * width), **VARIANTS[variant]}
    if variant == "qk_norm_cap":
        model["softmax_cap"] = cfg.softmax_cap
    sets = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in model.items()]
    return sets + [
        f"seed={seed}",
        "optimizer.type=AdamW",
        f"optimizer.lr={lr}",
        f"optimizer.weight_decay={cfg.weight_decay}",
        "scheduler.type=cosine",
        f"scheduler.warmup_steps={cfg.warmup_steps}",
        f"scheduler.min_lr={cfg.min_lr_ratio * lr}",
        f"eval.interval={cfg.steps}",
        f"eval.batches={cfg.eval_batches}",
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
    tracked step up to ``stop_step``, and their ratio (the growth before a divergence); the max attention logit."""
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


def summarize_run(
    cfg: Config,
    records: list[dict[str, Any]],
    variant: str,
    lr: float,
    threshold: float,
    stopped: dict[str, Any] | None = None,
) -> dict:
    """Diverged or not, and why; the first-step loss (L0) and the final losses; the activation growth. ``stopped``:
    the trainer's divergence guard ended the run early (``RunQueue.diverged``), which counts as diverged."""
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    bad = next((s for s, v in losses if v is None or not math.isfinite(v)), None)
    final = window_mean(records, "loss", 1.0 - FINAL_FRACTION, 1.0, cfg.steps)
    initial = losses[0][1]
    after = [v for s, v in losses if s > cfg.warmup_steps]
    spike = max(
        (sum(after[i : i + SPIKE_WINDOW]) / SPIKE_WINDOW for i in range(len(after) - SPIKE_WINDOW + 1)),
        default=math.nan,
    )
    reason = None
    if stopped is not None:
        reason = f"stopped by the trainer's divergence guard at step {stopped['step']} (exit 3)"
    elif bad is not None or not math.isfinite(final):
        reason = f"non-finite loss at step {bad}"
    elif spike > initial:
        reason = (
            f"loss ({SPIKE_WINDOW}-step mean) rose to {spike:.3f} after warmup, above the first step's {initial:.3f}"
        )
    elif final > threshold:
        reason = f"final loss {final:.3f} above the unigram level {threshold:.3f}"
    val_steps, val = series(records, "val_loss")
    return {
        "variant": variant,
        "lr": lr,
        "skipped": False,
        "diverged": reason is not None,
        "reason": reason,
        "stopped_at_step": stopped["step"] if stopped is not None else None,
        "initial_loss": initial,
        "final_train_loss": final,
        "final_val_loss": val[-1] if val and math.isfinite(val[-1]) else math.nan,
        "max_loss_after_warmup": spike,
        "activations": activation_growth(records, (bad - 1) if bad is not None else records[-1]["step"]),
    }


def skipped_run(variant: str, width: int, lr: float, seed: int, initial: float, limit: int) -> dict[str, Any]:
    return {
        "name": run_name(variant, width, lr, seed),
        "variant": variant,
        "width": width,
        "seed": seed,
        "lr": lr,
        "skipped": True,
        "diverged": True,
        "reason": f"not run: the {limit} lrs below diverged",
        "stopped_at_step": None,
        "initial_loss": initial,
        "final_train_loss": math.nan,
        "final_val_loss": math.nan,
        "activations": {},
    }


def ladder_stats(ladder: list[dict[str, Any]]) -> dict[str, Any]:
    """One (variant, width, seed) ladder sorted by lr: largest stable lr, Wortsman's LR sensitivity, best loss."""
    stable = None
    for r in ladder:
        if r["diverged"]:
            break
        stable = r["lr"]
    l0 = sum(r["initial_loss"] for r in ladder) / len(ladder)
    losses = [r["final_val_loss"] for r in ladder]
    capped = [min(v, l0) if math.isfinite(v) else l0 for v in losses]  # a run that was not run, or blew up: L0
    best = min(capped)
    return {
        "max_stable_lr": stable,
        "first_diverged_lr": next((r["lr"] for r in ladder if r["diverged"]), None),
        "lr_sensitivity": sum(capped) / len(capped) - best,
        "best_loss": best,
        "best_lr": ladder[capped.index(best)]["lr"],
        "initial_loss": l0,
    }


def _log_spread(values: list[float]) -> dict[str, Any]:
    """Geometric mean, min, max of positive values, and their spread in grid steps of sqrt(2)."""
    logs = [math.log(v) for v in values]
    return {
        "geomean": float(f"{math.exp(sum(logs) / len(logs)):.4g}"),
        "min": min(values),
        "max": max(values),
        "spread_sqrt2_steps": round((max(logs) - min(logs)) / math.log(math.sqrt(2)), 2),
        "per_seed": values,
    }


def summarize(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and width (key ``variant@d<width>``): per-seed ladder numbers and their spread; the best loss of
    the seed-averaged curve; the loss at the common lr; activation growth; and lr ratios over QK-norm per seed."""
    cells: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    for width in cfg.widths:
        per_variant_seed: dict[tuple[str, int], Any] = {}
        for variant in cfg.variants:
            key = f"{variant}@d{width}"
            seeds = {}
            for seed in cfg.seeds:
                ladder = sorted(
                    (r for r in runs if (r["variant"], r["width"], r["seed"]) == (variant, width, seed)),
                    key=lambda r: r["lr"],
                )
                seeds[seed] = ladder_stats(ladder)
                per_variant_seed[variant, seed] = seeds[seed]["max_stable_lr"]
            stable = [s["max_stable_lr"] for s in seeds.values()]
            by_lr: dict[float, list[float]] = {}
            for r in runs:
                if (r["variant"], r["width"]) == (variant, width) and not r["diverged"]:
                    by_lr.setdefault(r["lr"], []).append(r["final_val_loss"])
            curve = {lr: sum(v) / len(v) for lr, v in by_lr.items() if len(v) == len(cfg.seeds)}
            best_lr = min(curve, key=curve.get) if curve else None
            common = [r for r in runs if (r["variant"], r["width"], r["lr"]) == (variant, width, cfg.common_lr)]
            common_ok = bool(common) and not any(r["diverged"] for r in common)
            cells[key] = {
                "variant": variant,
                "width": width,
                "max_stable_lr": _log_spread(stable) if all(stable) else {"per_seed": stable},
                "lr_sensitivity": mean_std([s["lr_sensitivity"] for s in seeds.values()]),
                "best_loss": {"loss": curve[best_lr], "lr": best_lr} if best_lr else None,
                "best_loss_per_seed": mean_std([s["best_loss"] for s in seeds.values()]),
                "loss_at_common_lr": mean_std([r["final_val_loss"] for r in common]) if common_ok else None,
                "per_seed": {str(s): v for s, v in seeds.items()},
                "activations_at_common_lr": next((r["activations"] for r in common if r["seed"] == cfg.seeds[0]), None),
            }
        if "qk_norm" in cfg.variants:
            for variant in cfg.variants:
                pairs = [(per_variant_seed[variant, s], per_variant_seed["qk_norm", s]) for s in cfg.seeds]
                if variant != "qk_norm" and all(a and b for a, b in pairs):
                    ratios[f"{variant}@d{width}"] = mean_std([a / b for a, b in pairs]) | {
                        "per_seed": [a / b for a, b in pairs]
                    }
    return {"cells": cells, "lr_ratio_over_qk_norm": ratios}


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The per-cell figures the CLI prints: geometric-mean max stable lr, sensitivity mean, best loss."""
    cells = summary["cells"]
    return {
        "max_stable_lr": {k: c["max_stable_lr"].get("geomean") for k, c in cells.items()},
        "lr_sensitivity": {k: round(c["lr_sensitivity"]["mean"], 4) for k, c in cells.items()},
        "best_loss": {k: c["best_loss"] for k, c in cells.items()},
    }


def run(cfg: Config, output_dir: Path) -> dict:
    """Sweep every (variant, width, seed) ladder, ladders side by side (``workers``); write results.json and
    stability.png; return the results."""
    from megatron_adamc.experiments._stability_figures import plot

    output_dir.mkdir(parents=True, exist_ok=True)
    cache = data_cache(cfg)
    lrs = sorted(cfg.lrs)
    ladders = [(w, v, s) for w in cfg.widths for s in cfg.seeds for v in cfg.variants]
    total = len(ladders) * len(lrs)
    queue = RunQueue(cfg, output_dir, total_steps=total * cfg.steps, total_runs=total)
    threshold: list[float] = [cfg.divergence_loss] if cfg.divergence_loss is not None else []
    curves: dict[str, list[dict[str, Any]]] = {}

    def divergence_loss() -> float:
        if not threshold:
            threshold.append(unigram_entropy(cache))  # a finished run has built the data
        return threshold[0]

    def ladder(width: int, variant: str, seed: int) -> Task[list[dict[str, Any]]]:
        """One (variant, width, seed) ladder, lr by lr, cut after ``skip_after_diverged`` divergences in a row."""
        runs: list[dict[str, Any]] = []
        streak = 0
        for lr in lrs:
            if cfg.skip_after_diverged and streak >= cfg.skip_after_diverged:
                initial = runs[-1]["initial_loss"]
                runs.append(skipped_run(variant, width, lr, seed, initial, cfg.skip_after_diverged))
                queue.total_steps -= cfg.steps
                continue
            name = run_name(variant, width, lr, seed)
            records = yield Run(name, overrides(cfg, variant, width, lr, seed), cfg.steps, may_diverge=True)
            curves[name] = records
            stopped = queue.diverged(name)
            result = summarize_run(cfg, records, variant, lr, divergence_loss(), stopped)
            runs.append({"name": name, "width": width, "seed": seed, **result})
            streak = streak + 1 if result["diverged"] else 0
        return runs

    per_ladder = queue.parallel([ladder(*key) for key in ladders])
    runs = [r for ladder_runs in per_ladder for r in ladder_runs]
    summary = summarize(cfg, runs)
    results = {
        **headline(summary),
        **summary,
        "divergence_loss": divergence_loss(),
        "divergence_rule": "non-finite loss or updates (the trainer's guard stops the run: exit 3), or the "
        f"{SPIKE_WINDOW}-step mean of the loss after warmup above the first step's loss, or the final train loss (mean "
        "of the last 10% of steps) above divergence_loss (default: the unigram entropy of the training tokens)",
        "runs": runs,
        "config": cfg.model_dump(),
        "command": queue.shared_command(),
        "run_sets": {r["name"]: queue.run_sets(r["name"]) for r in runs if not r["skipped"]},
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    plot(cfg, curves, results, output_dir / "stability.png")
    return results
