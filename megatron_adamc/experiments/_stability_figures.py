"""The figure of ``stability``: final loss against the lr per width (seeds and their mean), the largest stable lr of
each seed, Wortsman's LR sensitivity, and the max attention logit against the lr."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_adamc.experiments._figure import save_figure  # noqa: E402

MARKERS = ("o", "s", "^", "D")


def _loss_panel(ax: Any, cfg: Any, runs: list[dict], width: int, colors: dict, threshold: float) -> None:
    """Losses above the unigram level + 0.3 (runs that lost everything, or blew up) are drawn at that ceiling, so the
    part that learned stays readable."""
    ceiling = threshold + 0.3
    for variant in cfg.variants:
        color = colors[variant]
        by_lr: dict[float, list[float]] = {}
        for r in runs:
            if (r["variant"], r["width"]) != (variant, width) or r["skipped"]:
                continue
            y = min(r["final_val_loss"], ceiling) if math.isfinite(r["final_val_loss"]) else ceiling
            by_lr.setdefault(r["lr"], []).append(y)
            ax.plot(r["lr"], y, "x" if r["diverged"] else ".", color=color, ms=7 if r["diverged"] else 5, alpha=0.7)
        lrs = sorted(by_lr)
        ax.plot(lrs, [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs], "-", color=color, lw=1.2, label=variant)
    ax.axhline(threshold, color="0.4", ls=":", lw=1, label=f"unigram level {threshold:.2f}")
    ax.axhline(ceiling, color="0.7", lw=0.8)
    ax.set(xscale="log", xlabel="peak lr", ylabel=f"final validation loss (capped at {ceiling:.1f})")
    ax.set_title(f"d={width}: final val loss vs lr (line: mean of {len(cfg.seeds)} seeds; x = diverged)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _stable_panel(ax: Any, cfg: Any, cells: dict, colors: dict) -> None:
    """One column per variant; per width a marker shape; per seed one point (jittered); the grid as light lines."""
    for lr in cfg.lrs:
        ax.axhline(lr, color="0.92", lw=0.6, zorder=0)
    for i, variant in enumerate(cfg.variants):
        for j, width in enumerate(cfg.widths):
            per_seed = cells[f"{variant}@d{width}"]["max_stable_lr"]["per_seed"]
            for k, lr in enumerate(per_seed):
                x = i + 0.25 * (j - (len(cfg.widths) - 1) / 2) + 0.05 * (k - (len(per_seed) - 1) / 2)
                label = f"d={width}" if i == 0 and k == 0 else None
                y = lr if lr else min(cfg.lrs) / 1.5
                ax.plot(x, y, MARKERS[j % len(MARKERS)], color=colors[variant], mfc="none" if lr else colors[variant],
                        ms=7, label=label)  # fmt: skip
    ax.set_xticks(range(len(cfg.variants)), cfg.variants, rotation=20, fontsize=8)
    per_seed = [lr for c in cells.values() for lr in c["max_stable_lr"]["per_seed"]]
    bottom = min(per_seed) / 1.6 if all(per_seed) else min(cfg.lrs) / 2  # a seed with none stable sits below the grid
    ax.set(yscale="log", ylabel="largest stable lr (per seed; light lines: the grid)")
    ax.set_ylim(bottom, max(cfg.lrs) * 1.4)
    ax.set_title(f"largest stable lr, each seed (grid factor sqrt(2); {len(cfg.seeds)} seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)


def _sensitivity_panel(ax: Any, cfg: Any, cells: dict, colors: dict) -> None:
    width_bar = 0.8 / len(cfg.widths)
    for j, width in enumerate(cfg.widths):
        xs = [i + (j - (len(cfg.widths) - 1) / 2) * width_bar for i in range(len(cfg.variants))]
        stats = [cells[f"{v}@d{width}"]["lr_sensitivity"] for v in cfg.variants]
        ax.bar(xs, [s["mean"] for s in stats], width_bar * 0.9, yerr=[s["std"] for s in stats], capsize=3,
               color=[colors[v] for v in cfg.variants], alpha=0.45 + 0.4 * j / max(1, len(cfg.widths) - 1),
               label=f"d={width}")  # fmt: skip
    ax.set_xticks(range(len(cfg.variants)), cfg.variants, rotation=20, fontsize=8)
    ax.set(ylabel="LR sensitivity (nats; lower = more tolerant)")
    ax.set_title("Wortsman's LR sensitivity: E_lr[min(L, L0)] - min L (mean +- std over seeds)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def _logit_panel(ax: Any, cfg: Any, runs: list[dict], colors: dict, width: int) -> None:
    seed = cfg.seeds[0]
    for variant in cfg.variants:
        pts = sorted(
            (r["lr"], r["activations"]["max_attn_logit"]["max"])
            for r in runs
            if (r["variant"], r["width"], r["seed"]) == (variant, width, seed) and "max_attn_logit" in r["activations"]
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[variant], ms=3, lw=1, label=variant)
    ax.set(xscale="log", yscale="log", xlabel="peak lr", ylabel="max attention logit over the run")
    ax.set_title(f"d={width}, seed {seed}: largest attention logit vs lr", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(cfg: Any, curves: dict, results: dict[str, Any], path: Path) -> None:
    cols = max(3, len(cfg.widths))
    fig, axes = plt.subplots(2, cols, figsize=(5.8 * cols, 9))
    palette = plt.get_cmap("tab10").colors
    colors = {v: palette[i % len(palette)] for i, v in enumerate(cfg.variants)}
    runs, cells, threshold = results["runs"], results["cells"], results["divergence_loss"]
    for ax, width in zip(axes[0], cfg.widths, strict=False):
        _loss_panel(ax, cfg, runs, width, colors, threshold)
    spare = list(axes[0][len(cfg.widths) :])
    if spare and len(cfg.widths) > 1:
        _logit_panel(spare.pop(0), cfg, runs, colors, min(cfg.widths))
    for ax in spare:
        ax.axis("off")
    _stable_panel(axes[1, 0], cfg, cells, colors)
    _sensitivity_panel(axes[1, 1], cfg, cells, colors)
    _logit_panel(axes[1, 2], cfg, runs, colors, max(cfg.widths))
    for ax in axes[1][3:]:
        ax.axis("off")
    save_figure(
        fig,
        path,
        f"Stability methods, model={cfg.model} (2 layers), AdamW wd={cfg.weight_decay:g}, {cfg.warmup_steps} warmup "
        f"steps then cosine to {cfg.min_lr_ratio:g} x peak over {cfg.steps} steps, seeds {cfg.seeds}",
    )
