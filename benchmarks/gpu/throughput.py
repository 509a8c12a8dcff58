"""Step 2, throughput: the trainer at the 125M and 1B presets, bf16 ZeRO-1, sequence 2048, 30 steps each.

Per run: tokens/s and MFU over the steps after the warm-up (the trainer's own ``step_time_s``), the peak memory the
trainer logs (``peak_memory_gb``) and nvidia-smi's, against ``megatron-adamc plan``'s prediction for the same config.
Variants: eager, ``train.compile=true``, ``train.activation_checkpointing=full|selective``; they run in the order of
``PLAN`` (most telling first) while the step's time lasts, and the rest are listed as skipped; so are the variants of
a model whose eager run failed (they add to it: the same failure again, or nothing new).
"""

from __future__ import annotations

from typing import Any

from gpu.common import StepContext, fmt, table
from gpu.trainer_runs import MODELS, base_sets, fused_adam_built, plan_memory, run_trainer, summarize

VARIANTS: dict[str, list[str]] = {
    "eager": [],
    "compile": ["train.compile=true"],
    "ckpt-full": ["train.activation_checkpointing=full"],
    "ckpt-selective": ["train.activation_checkpointing=selective"],
}
PLAN = {
    "gpu": [("125M", "eager"), ("1B", "eager"), ("1B", "ckpt-full"), ("1B", "compile"), ("125M", "compile"),
            ("1B", "ckpt-selective")],
    "cpu": [("micro", "eager"), ("tiny", "eager"), ("micro", "ckpt-full"), ("micro", "ckpt-selective"),
            ("micro", "compile")],
    "quick": [("micro", "eager"), ("micro", "ckpt-full")],
}  # fmt: skip
# Seconds a run takes, start-up included (GPU: 1B builds its weights on the CPU first); compile adds its build.
ESTIMATE_S = {"125M": 30, "1B": 55, "micro": 15, "tiny": 20}
COMPILE_S = 60


def lengths(ctx: StepContext) -> tuple[int, int]:
    """(steps, warm-up steps dropped from the figures)."""
    return (12, 4) if ctx.cpu else (30, 10)


def run(ctx: StepContext) -> bool:
    steps, warmup = lengths(ctx)
    plan = PLAN["quick" if ctx.quick else "cpu" if ctx.cpu else "gpu"]
    common = base_sets(ctx, fused_adam=fused_adam_built(ctx))
    runs: list[dict[str, Any]] = []
    ok, failed_eager, planner_missing = True, set(), None
    for model, variant in plan:
        estimate = ESTIMATE_S[model] + (COMPILE_S if variant == "compile" else 0)
        entry: dict[str, Any] = {"model": model, "variant": variant}
        if model in failed_eager:  # a variant adds to the eager run: it would fail the same way, or say nothing new
            entry["skipped"] = f"not run: {model} eager failed"
        elif ctx.left() < estimate:
            entry["skipped"] = f"out of time ({ctx.left():.0f} s left, ~{estimate} s needed)"
        else:
            sets = common + MODELS[model] + VARIANTS[variant]
            run_ = run_trainer(ctx, f"{model}-{variant}", sets, steps, timeout=min(ctx.left(), 4 * estimate))
            entry.update(summarize(run_, warmup))
            passed = run_.error is None and entry.get("finite", False)
            ok = ok and passed
            if variant == "eager" and not passed:
                failed_eager.add(model)
            if planner_missing:
                entry["plan"] = planner_missing
            elif ctx.left() > 10:
                entry["plan"] = plan_memory(ctx, f"{model}-{variant}", sets)
                planner_missing = entry["plan"] if "not available" in entry["plan"].get("error", "") else None
                plan_ = entry["plan"]  # like with like: allocator peak vs allocated, nvidia-smi vs the total
                if plan_.get("allocated_gib") and entry.get("peak_allocated_gib"):
                    entry["allocated_over_plan"] = entry["peak_allocated_gib"] / plan_["allocated_gib"]
                if plan_.get("total_gib") and entry.get("gpu_memory_used_gib"):
                    entry["used_over_plan"] = entry["gpu_memory_used_gib"] / plan_["total_gib"]
        runs.append(entry)
        ctx.save(runs=runs, steps=steps, warmup=warmup, ratios=ratios(runs))
        print(f"{model} {variant}: {fmt(entry.get('tokens_per_s'))} tokens/s {entry.get('error', '')}", flush=True)
    return ok


def ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each variant against eager on the same model: tokens/s and peak memory."""
    eager = {r["model"]: r for r in runs if r["variant"] == "eager" and r.get("tokens_per_s")}
    out = {}
    for r in runs:
        base = eager.get(r["model"])
        if r["variant"] == "eager" or base is None or not r.get("tokens_per_s"):
            continue
        out[f"{r['model']} {r['variant']}: tokens/s vs eager"] = r["tokens_per_s"] / base["tokens_per_s"]
        if r.get("peak_allocated_gib") and base.get("peak_allocated_gib"):
            peak = r["peak_allocated_gib"] / base["peak_allocated_gib"]
            out[f"{r['model']} {r['variant']}: peak memory vs eager"] = peak
    return out


def summary(record: dict[str, Any]) -> str:
    parts = []
    for r in record.get("runs", []):
        if r.get("tokens_per_s"):
            mfu = f", MFU {r['mfu'] * 100:.1f}%" if r.get("mfu") else ""
            parts.append(f"{r['model']} {r['variant']} {r['tokens_per_s']:,.0f} tok/s{mfu}")
    return "; ".join(parts)


def markdown(record: dict[str, Any]) -> str:
    rows = []
    for r in record.get("runs", []):
        plan = r.get("plan", {})
        mfu = r["mfu"] * 100 if r.get("mfu") else None
        rows.append([
            r["model"], r["variant"], r.get("params"), r.get("tokens_per_step"), r.get("tokens_per_s"),
            r.get("step_time_s_median"), mfu, r.get("peak_allocated_gib"), plan.get("allocated_gib"),
            r.get("gpu_memory_used_gib"), plan.get("total_gib") or plan.get("error"),
            r.get("error") or r.get("skipped") or "",
        ])  # fmt: skip
    header = ["model", "variant", "params", "tokens/step", "tokens/s", "step s (median)", "MFU %",
              "peak allocated GiB", "planned allocated GiB", "used GiB (nvidia-smi)", "planned total GiB",
              "note"]  # fmt: skip
    text = table(header, rows)
    if record.get("ratios"):
        text += "\n\n" + table(["ratio", "value"], [[k, v] for k, v in record["ratios"].items()])
    return text
