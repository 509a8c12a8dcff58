"""The figure of ``adamc-at-best``: the phase-1 choice, the held-out validation curves, the paired AdamC - AdamW
difference with its 95% band (what the verdict reads), train loss, gradient norm with the clip line, weight norm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_adamc.experiments._figure import save_figure  # noqa: E402
from megatron_adamc.experiments._trainer_runs import series, smooth  # noqa: E402

ARM_STYLE = {
    "adamw_best": ("tab:red", "-", "AdamW at its best"),
    "adamc_best": ("tab:blue", "-", "AdamC at its best"),
    "control": ("tab:purple", "--", "AdamW control (AdamC's integrated decay)"),
    "no_decay": ("0.4", ":", "no weight decay"),
}


def _mean_curve(runs: list[dict[str, Any]], curve: str, key: str) -> tuple[list[int], list[float]]:
    steps = [p["step"] for p in runs[0][curve]]
    return steps, [sum(r[curve][i][key] for r in runs) / len(runs) for i in range(len(steps))]


def _phase1_panel(ax: Any, results: dict[str, Any]) -> None:
    colors = {"AdamW": "tab:red", "AdamC": "tab:blue"}
    for opt, table in results["phase1"]["means"].items():
        xs = list(range(len(table)))
        ax.plot(xs, [v["final_val_loss"]["mean"] for v in table.values()], "o-", color=colors[opt], label=f"{opt} mean")
        for x, v in zip(xs, table.values(), strict=True):
            ax.plot([x] * len(v["per_seed"]), list(v["per_seed"].values()), ".", color=colors[opt], alpha=0.5)
        best = results["best"][opt]["lr_wd_steps"]
        ax.plot(list(table).index(f"{best:g}"), table[f"{best:g}"]["final_val_loss"]["mean"], "s", mfc="none", ms=12,
                color=colors[opt], label=f"{opt} best: lr*wd*steps {best:g}")  # fmt: skip
    ax.set_xticks(range(len(table)), list(table))
    ax.set(title="phase 1: final val loss (mean of seeds, dots: seeds)", xlabel="lr*lambda*steps", ylabel="val loss")
    ax.legend(fontsize=7)


def _diff_panel(ax: Any, results: dict[str, Any]) -> None:
    comparisons = results["phase2"]["comparisons"]
    for key, color, label in (
        ("adamc_minus_adamw", "k", "AdamC - AdamW (each at its best)"),
        ("adamc_minus_control", "tab:purple", "AdamC - control"),
    ):
        curve = comparisons[key]["curve"]
        steps = [p["step"] for p in curve]
        ax.plot(steps, [p["mean"] for p in curve], "o-", ms=3, color=color, label=label)
        ax.fill_between(steps, [p["lo"] for p in curve], [p["hi"] for p in curve], color=color, alpha=0.15)
    ax.axhline(0, color="0.5", lw=0.8)
    n = comparisons["adamc_minus_adamw"]["curve"][0]["n"]
    ax.set(title=f"paired val-loss difference, 95% t-interval, n={n} seeds", xlabel="step")
    ax.legend(fontsize=7)


def plot(cfg: Any, curves: dict[str, list[dict[str, Any]]], results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    _phase1_panel(axes[0, 0], results)
    phase2 = results["phase2"]["runs"]
    by_arm = {arm: [r for r in phase2 if r["arm"] == arm] for arm in ARM_STYLE}
    start = cfg.steps // 5  # the first fifth drops from ~7 nats: leave it out so the differences show
    width = max(1, cfg.steps // 100)
    for arm, (color, style, label) in ARM_STYLE.items():
        runs = by_arm[arm]
        if not runs:
            continue
        wd = runs[0]["weight_decay"]
        tag = f"{label}, wd {wd:.3g}"
        steps, val = _mean_curve(runs, "curve", "val_loss")
        keep = [i for i, s in enumerate(steps) if s >= start]
        axes[0, 1].plot([steps[i] for i in keep], [val[i] for i in keep], style, color=color, label=tag)
        steps, loss = _mean_curve(runs, "train_curve", "loss")
        keep = [i for i, s in enumerate(steps) if s >= start]
        axes[1, 0].plot([steps[i] for i in keep], [loss[i] for i in keep], style, color=color, label=tag)
        records = curves[runs[0]["name"]]
        grad_steps, grads = series(records, "grad_norm")
        axes[1, 1].plot(
            grad_steps, smooth(grads, width), style, color=color, lw=1, label=f"{tag} (seed {runs[0]['seed']})"
        )
        weight_steps, weights = series(records, "tracking/weight_norm")
        axes[1, 2].plot(weight_steps, weights, style, color=color, lw=1, label=f"{tag} (seed {runs[0]['seed']})")
    axes[0, 1].set(title="held-out seeds: whole-split val loss (mean)", xlabel="step", ylabel="val loss")
    axes[1, 0].set(title=f"train loss (mean over {cfg.steps // cfg.train_curve_points}-step stretches and seeds)",
                   xlabel="step", ylabel="train loss")  # fmt: skip
    if cfg.grad_clip > 0:
        axes[1, 1].axhline(cfg.grad_clip, color="k", lw=0.8, ls="--", label=f"clip {cfg.grad_clip:g}")
    axes[1, 1].set(title=f"global grad norm before clipping ({width}-step mean)", xlabel="step", yscale="log")
    axes[1, 2].set(title="total weight norm (tracked steps)", xlabel="step")
    _diff_panel(axes[0, 2], results)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in (axes[0, 1], axes[1, 0], axes[1, 1], axes[1, 2]):
        ax.legend(fontsize=7)
    c = results["config"]
    save_figure(
        fig,
        path,
        f"AdamC vs AdamW at each one's best weight decay: micro Llama, {c['tokens_per_param']:.1f} tokens/param, "
        f"{cfg.steps} steps, lr {cfg.lr:g}, cosine to 0. Verdict: {results['verdict']['outcome']}",
    )
