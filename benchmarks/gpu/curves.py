"""Step 6, with the time left: AdamW vs AdamC on the 125M preset, a whole cosine-to-zero schedule each.

The runs share what is left of the check's time; the step count follows from the 125M step time the throughput
step measured. The weight decay is chosen so that lr * wd * steps = 6 (the tiny-Llama experiment's main setting,
docs/results_adamc_vs_adamw.md), where AdamW's gradient norm rises at the end of the schedule and AdamC's should not.
The rise is the mean gradient norm over the last 5% of steps over its mean over the 40-60% stretch.
Writes curves.png (gradient norm and loss against the step) into the results folder.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from gpu.common import StepContext, table
from gpu.trainer_runs import MODELS, base_sets, fused_adam_built, run_trainer, summarize
from megatron_adamc.metrics_file import GRAD_NORM, LOSS, STEP

LR = 1e-3
LR_WD_STEPS = 6.0
START_S = {"gpu": 25.0, "cpu": 8.0}  # a run's start-up before its first step (process, data, engine)
STEP_S = {"gpu": 0.06, "cpu": 0.03}  # a step when the throughput step measured none (GPU: 125M at 8 x 2048)
MICRO_BATCH = {"gpu": 8, "cpu": 2}
STEP_LIMITS = {"gpu": (100, 3000), "cpu": (30, 80), "quick": (30, 40)}
TAIL, MID = (0.95, 1.0), (0.4, 0.6)


def step_seconds(ctx: StepContext, model: str) -> float:
    """The step time at this step's micro batch, scaled from the throughput step's eager run of the same model."""
    kind = "cpu" if ctx.cpu else "gpu"
    for run_ in ctx.earlier.get("throughput", {}).get("runs", []):
        if run_.get("model") == model and run_.get("variant") == "eager" and run_.get("tokens_per_s"):
            tokens = MICRO_BATCH[kind] * (64 if ctx.cpu else 2048)
            return tokens / run_["tokens_per_s"]
    return STEP_S[kind]


def window_mean(rows: list[dict[str, Any]], key: str, window: tuple[float, float], steps: int) -> float:
    values = [float(r[key]) for r in rows if window[0] * steps < r[STEP] <= window[1] * steps and key in r]
    return statistics.fmean(values) if values else math.nan


def plot(runs: dict[str, list[dict[str, Any]]], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in runs.items():
        steps = [r[STEP] for r in rows]
        axes[0].plot(steps, [r.get(GRAD_NORM, math.nan) for r in rows], label=name, linewidth=0.8)
        axes[1].plot(steps, [r.get(LOSS, math.nan) for r in rows], label=name, linewidth=0.8)
    for ax, label in zip(axes, ("global gradient norm", "train loss"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(ctx: StepContext) -> bool | None:
    kind = "cpu" if ctx.cpu else "gpu"
    model = "micro" if ctx.cpu else "125M"
    per_run = ctx.left() / 2 - 5
    low, high = STEP_LIMITS["quick" if ctx.quick else kind]
    steps = min(high, int((per_run - START_S[kind]) / step_seconds(ctx, model)))
    if steps < low:
        ctx.save(skipped=f"too little time left for two runs of {low} steps ({ctx.left():.0f} s)")
        return None
    wd = LR_WD_STEPS / (LR * steps)
    sets = base_sets(ctx, fused_adam=fused_adam_built(ctx)) + MODELS[model]
    sets += [f"train.micro_batch_size={MICRO_BATCH[kind]}", f"optimizer.lr={LR}", f"optimizer.weight_decay={wd}"]
    sets += [f"scheduler.warmup_steps={max(1, steps // 20)}", "scheduler.type=cosine", "scheduler.min_lr=0"]
    ctx.save(model=model, steps=steps, lr=LR, weight_decay=wd, lr_wd_steps=LR_WD_STEPS)
    rows: dict[str, list[dict[str, Any]]] = {}
    figures: dict[str, dict[str, Any]] = {}
    ok = True
    for index, optimizer in enumerate(("AdamW", "AdamC")):
        timeout = max(ctx.left() / (2 - index), 1)
        run_ = run_trainer(ctx, optimizer, [*sets, f"optimizer.type={optimizer}"], steps, timeout, schedule_steps=steps)
        rows[optimizer] = run_.rows
        entry = summarize(run_, warmup=0)
        entry["grad_norm_mid"] = window_mean(run_.rows, GRAD_NORM, MID, steps)
        entry["grad_norm_end"] = window_mean(run_.rows, GRAD_NORM, TAIL, steps)
        entry["grad_norm_rise"] = entry["grad_norm_end"] / entry["grad_norm_mid"]
        entry["final_loss"] = window_mean(run_.rows, LOSS, TAIL, steps)
        figures[optimizer] = {k: v for k, v in entry.items() if k != "run"}
        ok = ok and run_.error is None
        ctx.save(runs=figures)
    if any(rows.values()):
        title = f"{model}: AdamW vs AdamC, lr {LR:g} cosine to 0, wd {wd:.3g}, {steps} steps"
        plot(rows, ctx.out / "curves.png", title)
        ctx.save(figure="curves.png")
    return ok


def summary(record: dict[str, Any]) -> str:
    runs = record.get("runs", {})
    parts = [f"{name} rise {r['grad_norm_rise']:.3f}" for name, r in runs.items() if r.get("grad_norm_rise")]
    if record.get("steps"):
        parts.append(f"{record['steps']} steps, lr*wd*steps {record.get('lr_wd_steps')}")
    return "; ".join(parts)


def markdown(record: dict[str, Any]) -> str:
    rows = [
        [name, r.get("steps"), r.get("grad_norm_mid"), r.get("grad_norm_end"), r.get("grad_norm_rise"),
         r.get("final_loss"), r.get("tokens_per_s"), r.get("error", "")]
        for name, r in record.get("runs", {}).items()
    ]  # fmt: skip
    header = ["optimizer", "steps", "grad norm 40-60%", "grad norm last 5%", "rise", "loss last 5%", "tokens/s"]
    header.append("error")
    text = table(header, rows)
    return text + ("\n\n![curves](curves.png)" if record.get("figure") else "")
