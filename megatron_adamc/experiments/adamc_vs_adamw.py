"""AdamW vs AdamC on the tiny Llama: does AdamW's gradient norm rise at the end of a cosine-to-zero run, AdamC's not?

The two optimizers differ in one thing only: AdamC's decay follows the schedule (lambda_t = lambda lr_t / lr_max).
The rise shows only when the run is long against AdamW's timescale 1/(lr wd) steps, so lr*wd*steps is the knob:
the main setting (3 seeds per optimizer) has it large, and a one-seed sweep over weight decay shows where the rise
starts. The rise is the mean global gradient norm over the last 5% of steps over its mean over the 40-60% stretch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from megatron_adamc.experiments._figure import save_figure
from megatron_adamc.experiments._trainer_runs import LlmConfig, RunQueue, mean_std, series, smooth, window_mean

HEADLINE_KEYS = ("summary",)
OPTIMIZERS = ("AdamW", "AdamC")
MID = (0.4, 0.6)  # the stretch the rise is measured against: the lr is still half its peak, the norms have settled


class Config(LlmConfig):
    """Defaults: lr*wd*steps = 3e-3 * 2.0 * 1000 = 6, as in the issue's run where AdamW's norm nearly tripled (sized
    so that 8 runs finish in ~10 minutes on 2 idle CPU cores); the sweep adds lr*wd*steps = 0.6."""

    lr: float = Field(3e-3, gt=0, description="peak lr; cosine to zero after a short warmup")
    weight_decay: float = Field(2.0, ge=0, description="the main setting, run with every seed")
    seeds: int = Field(3, gt=0)
    steps: int = Field(1000, gt=0)
    warmup_steps: int = Field(20, ge=0)
    sweep_weight_decays: list[float] = Field(
        default_factory=lambda: [0.2], description="extra weight decays run with sweep_seeds seeds each"
    )
    sweep_seeds: int = Field(1, ge=0)
    tail_fraction: float = Field(0.05, gt=0, lt=0.4, description="the last share of steps whose grad norm is 'end'")
    tracking_interval: int = Field(20, gt=0, description="steps between per-layer norm measurements")
    eval_points: int = Field(20, gt=0, description="validation evaluations over the run (the last at the end)")
    eval_batches: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _fits(self) -> Config:
        if self.warmup_steps >= MID[0] * self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must end before the 40% mark of steps={self.steps}")
        if int(self.tail_fraction * self.steps) < 1:
            raise ValueError(f"tail_fraction*steps={self.tail_fraction * self.steps:g}: the tail needs >= 1 step")
        return self


def plan(cfg: Config) -> list[tuple[float, int, str]]:
    """(weight_decay, seed, optimizer) of every run: the main setting first, optimizers interleaved per seed."""
    runs = [(cfg.weight_decay, seed, opt) for seed in range(cfg.seeds) for opt in OPTIMIZERS]
    for wd in cfg.sweep_weight_decays:
        if wd != cfg.weight_decay:
            runs += [(wd, seed, opt) for seed in range(cfg.sweep_seeds) for opt in OPTIMIZERS]
    return runs


def run_name(optimizer: str, wd: float, seed: int) -> str:
    return f"{optimizer.lower()}-wd{wd:g}-seed{seed}"


def overrides(cfg: Config, optimizer: str, wd: float, seed: int) -> list[str]:
    """Everything but the optimizer type is the same for AdamW and AdamC."""
    return [
        f"seed={seed}",
        f"optimizer.type={optimizer}",
        f"optimizer.lr={cfg.lr}",
        f"optimizer.weight_decay={wd}",
        "scheduler.type=cosine",
        f"scheduler.warmup_steps={cfg.warmup_steps}",
        "scheduler.min_lr=0.0",
        f"eval.interval={max(1, cfg.steps // cfg.eval_points)}",
        f"eval.batches={cfg.eval_batches}",
        "tracking.enabled=true",
        f"tracking.interval={cfg.tracking_interval}",
        "tracking.activations=false",  # norms only: the activation hooks cost time and this run needs none
    ]


def summarize_run(cfg: Config, records: list[dict[str, Any]], optimizer: str, wd: float, seed: int) -> dict[str, Any]:
    """One run's numbers: the global grad norm over the mid stretch and the tail, its rise, norms and final losses."""
    steps, tail = cfg.steps, 1.0 - cfg.tail_fraction
    mid = window_mean(records, "grad_norm", *MID, steps)
    end = window_mean(records, "grad_norm", tail, 1.0, steps)
    per_layer = {}
    for key in sorted(k for k in records[-1] if k.startswith("grad_norm/")):
        layer_mid, layer_end = window_mean(records, key, *MID, steps), window_mean(records, key, tail, 1.0, steps)
        per_layer[key.removeprefix("grad_norm/")] = layer_end / layer_mid if layer_mid > 0 else math.nan
    val_steps, val = series(records, "val_loss")
    return {
        "name": run_name(optimizer, wd, seed),
        "optimizer": optimizer,
        "weight_decay": wd,
        "lr": cfg.lr,
        "steps": steps,
        "seed": seed,
        "lr_wd_steps": round(cfg.lr * wd * steps, 10),
        "grad_norm_mid": mid,
        "grad_norm_end": end,
        "grad_norm_rise": end / mid,
        "weight_norm_mid": window_mean(records, "tracking/weight_norm", *MID, steps),
        "weight_norm_end": window_mean(records, "tracking/weight_norm", tail, 1.0, steps),
        "final_train_loss": window_mean(records, "loss", tail, 1.0, steps),
        "final_val_loss": val[-1] if val_steps and val_steps[-1] == steps else math.nan,
        "per_layer_grad_norm_rise": per_layer,
    }


def summarize(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per weight decay: mean +- std over seeds of each optimizer's numbers, and AdamC - AdamW paired by seed."""
    keys = ("grad_norm_rise", "grad_norm_mid", "grad_norm_end", "final_train_loss", "final_val_loss")
    out: dict[str, Any] = {}
    for wd in sorted({r["weight_decay"] for r in runs}):
        group = [r for r in runs if r["weight_decay"] == wd]
        entry: dict[str, Any] = {"weight_decay": wd, "lr_wd_steps": round(cfg.lr * wd * cfg.steps, 10)}
        for opt in OPTIMIZERS:
            entry[opt] = {k: mean_std([r[k] for r in group if r["optimizer"] == opt]) for k in keys}
        by_seed = {(r["optimizer"], r["seed"]): r for r in group}
        seeds = sorted({s for _, s in by_seed if ("AdamW", s) in by_seed and ("AdamC", s) in by_seed})
        entry["adamc_minus_adamw"] = {
            k: mean_std([by_seed["AdamC", s][k] - by_seed["AdamW", s][k] for s in seeds])
            for k in ("final_train_loss", "final_val_loss")
        }
        out[f"wd={wd:g}"] = entry
    return out


def plot(cfg: Config, curves: dict[str, list[dict[str, Any]]], runs: list[dict[str, Any]], path: Path) -> None:
    """Global grad norm, total weight norm and losses of the main setting (every seed), and the rise vs lr*wd*steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"AdamW": "tab:red", "AdamC": "tab:blue"}
    width = max(1, cfg.steps // 100)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_g, ax_w), (ax_l, ax_r) = axes
    for r in runs:
        if r["weight_decay"] != cfg.weight_decay:
            continue
        records, color = curves[r["name"]], colors[r["optimizer"]]
        label = r["optimizer"] if r["seed"] == 0 else None
        steps, grad = series(records, "grad_norm")
        ax_g.plot(steps, smooth(grad, width), color=color, lw=1, alpha=0.8, label=label)
        ax_w.plot(*series(records, "tracking/weight_norm"), color=color, lw=1, alpha=0.8, label=label)
        steps, loss = series(records, "loss")
        ax_l.plot(steps, smooth(loss, width), color=color, lw=0.8, alpha=0.6, label=label and f"{label} train")
        ax_l.plot(*series(records, "val_loss"), "o--", color=color, ms=3, lw=0.8, label=label and f"{label} val")
    for ax in (ax_g, ax_w, ax_l):
        for lo, hi, shade in ((*MID, "0.9"), (1 - cfg.tail_fraction, 1.0, "0.8")):
            ax.axvspan(lo * cfg.steps, hi * cfg.steps, color=shade, zorder=0)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lwd = cfg.lr * cfg.weight_decay * cfg.steps
    ax_g.set(title=f"global grad norm (moving avg {width} steps), wd={cfg.weight_decay:g}, lr*wd*steps={lwd:g}")
    ax_w.set(title="total weight norm ||x||")
    ax_l.set(title="loss (train: moving average; val: dots)")
    finals = [r["final_train_loss"] for r in runs if r["weight_decay"] == cfg.weight_decay]
    if finals:
        ax_l.set_ylim(min(finals) - 0.3, min(finals) + 2.0)
    for opt in OPTIMIZERS:
        pts = sorted((r["lr_wd_steps"], r["grad_norm_rise"]) for r in runs if r["optimizer"] == opt)
        ax_r.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=colors[opt], alpha=0.7, label=opt)
    ax_r.axhline(1.0, color="0.5", lw=0.8)
    ticks = sorted({r["lr_wd_steps"] for r in runs})
    ax_r.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax_r.minorticks_off()
    ax_r.set(
        title="grad-norm rise (last 5% / 40-60%) per run",
        xlabel="lr * wd * steps",
        ylabel="rise",
        xscale="log",
    )
    ax_r.grid(alpha=0.3)
    ax_r.legend(fontsize=8)
    save_figure(
        fig,
        path,
        f"AdamW vs AdamC, model={cfg.model}, lr={cfg.lr:g} cosine to 0, {cfg.steps} steps, {cfg.seeds} seeds "
        f"(shaded: 40-60% and the last {cfg.tail_fraction:.0%})",
    )


def run(cfg: Config, output_dir: Path) -> dict:
    """Train every (weight decay, seed, optimizer) run, write results.json and adamc_vs_adamw.png; return results."""
    output_dir.mkdir(parents=True, exist_ok=True)
    todo = plan(cfg)
    queue = RunQueue(cfg, output_dir, total_steps=len(todo) * cfg.steps)
    curves, runs = {}, []
    for wd, seed, opt in todo:
        name = run_name(opt, wd, seed)
        curves[name] = queue.run(name, overrides(cfg, opt, wd, seed), cfg.steps, len(todo))
        runs.append(summarize_run(cfg, curves[name], opt, wd, seed))
    results = {
        "summary": summarize(cfg, runs),
        "runs": runs,
        "windows": {"mid": list(MID), "tail": [1.0 - cfg.tail_fraction, 1.0]},
        "config": cfg.model_dump(),
        "commands": {r["name"]: (queue.runs_dir / r["name"] / "command.txt").read_text().strip() for r in runs},
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(cfg, curves, runs, output_dir / "adamc_vs_adamw.png")
    return results
