"""Step 3, tracking overhead at GPU speed: the 125M run with norm tracking off, every step, and every 10 steps.

Three trainer runs of the same config, 30 steps each; the overhead of a mode is its mean step time over steps 11-30
(two tracked steps in twenty for every-10) against off. The mean, not the median: every-10 pays one step in ten.
The rows of the configured steps must carry the per-parameter norms (none when off), or the mode did not run.
On the CPU, benchmarks/tracking_overhead.py measures the tracker's own CPU time on 2 ranks; here it is wall time on
one GPU, where the tracker's reductions queue behind the step's kernels.
"""

from __future__ import annotations

from typing import Any

from gpu.common import StepContext, fmt, table
from gpu.trainer_runs import MODELS, base_sets, fused_adam_built, run_trainer, summarize
from megatron_adamc.metrics_file import STEP

MODES: dict[str, list[str]] = {
    "off": [],
    "every step": ["tracking.enabled=true", "tracking.interval=1"],
    "every 10 steps": ["tracking.enabled=true", "tracking.interval=10"],
}
STEPS, WARMUP = 30, 10
TRACKED_KEY_PREFIX = "weight_norm/"  # one of the tracker's per-parameter keys


def tracked_steps(rows: list[dict[str, Any]]) -> list[int]:
    return [r[STEP] for r in rows if any(k.startswith(TRACKED_KEY_PREFIX) for k in r)]


def run(ctx: StepContext) -> bool:
    model = "micro" if ctx.cpu else "125M"
    common = base_sets(ctx, fused_adam=fused_adam_built(ctx)) + MODELS[model]
    estimate = 15 if ctx.cpu else 30
    modes: dict[str, dict[str, Any]] = {}
    ok = True
    for mode, sets in MODES.items():
        if ctx.left() < estimate:
            modes[mode] = {"skipped": f"out of time ({ctx.left():.0f} s left)"}
            ok = False  # an overhead needs all three
            continue
        run_ = run_trainer(ctx, mode.replace(" ", "-"), common + sets, STEPS, timeout=min(ctx.left(), 4 * estimate))
        entry = summarize(run_, WARMUP)
        entry["tracked_steps"] = tracked_steps(run_.rows)
        interval = {"off": None, "every step": 1, "every 10 steps": 10}[mode]
        want = [] if interval is None else [s for s in range(1, STEPS + 1) if s % interval == 0]
        # Every configured step, and none when off (a spike may force one extra tracked step: the tracker's design).
        tracked = set(entry["tracked_steps"])
        entry["tracked_as_configured"] = set(want) <= tracked if want else not tracked
        ok = ok and run_.error is None and entry["tracked_as_configured"]
        modes[mode] = entry
        ctx.save(model=model, modes=modes, overhead=overheads(modes))
    return ok


def overheads(modes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean step time of each mode over off's, minus one (0.02 = 2% slower)."""
    off = modes.get("off", {}).get("step_time_s_mean")
    return {
        mode: entry["step_time_s_mean"] / off - 1
        for mode, entry in modes.items()
        if mode != "off" and off and entry.get("step_time_s_mean")
    }


def summary(record: dict[str, Any]) -> str:
    over = record.get("overhead", {})
    return ", ".join(f"{mode} {value * 100:+.1f}%" for mode, value in over.items())


def markdown(record: dict[str, Any]) -> str:
    over = record.get("overhead", {})
    rows = [
        [mode, e.get("step_time_s_mean"), fmt(over[mode] * 100) + "%" if mode in over else "-",
         len(e.get("tracked_steps", [])), e.get("tracked_as_configured"), e.get("error") or e.get("skipped") or ""]
        for mode, e in record.get("modes", {}).items()
    ]  # fmt: skip
    header = ["mode", "mean step s (steps 11-30)", "overhead vs off", "tracked steps", "as configured", "note"]
    return f"model {record.get('model')}\n\n" + table(header, rows)
