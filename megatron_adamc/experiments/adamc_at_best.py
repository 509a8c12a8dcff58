"""The decisive comparison: AdamC vs AdamW, each at its own best weight decay, where weight decay can matter, decided
on held-out seeds by a rule fixed before the run.

The earlier sweep (``adamc-vs-adamw``) ran at ~2 tokens per parameter, where no weight decay was best, and picked
each best lambda on the seed it then reused. Here:

- Data: one epoch of the whole default corpus slice (no sample repeats), ~12 tokens per parameter by default.
- Grid: lr*lambda*steps in {0, 0.5, 1, 2, 4, 8} for each optimizer at a fixed peak lr, cosine to 0 (lambda 0 is one
  run: AdamW = AdamC there).
- Phase 1 picks each optimizer's lambda by the mean final validation loss of two seeds.
- Phase 2, held out: four new seeds at AdamW's best, AdamC's best, the control (AdamW with AdamC's integrated decay,
  sum_t lr_t lambda_t) and lambda 0.
- Validation: every token of the validation split (``eval.full_split``), the same windows for every seed, at
  ``eval_points`` evaluations per run; train loss curves; per-layer ||x||, ||g||, ||dx|| through the last step; the
  share of steps whose gradient norm was clipped.

The decision rule (``RULE``) is part of the code and of results.json, written before the runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from megatron_adamc.core.theory import matched_adamw_decay
from megatron_adamc.errors import UserError
from megatron_adamc.experiments._paired import paired, sign, t_interval
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
from megatron_adamc.experiments.adamc_vs_adamw import measured_decay

HEADLINE_KEYS = ("best", "verdict")
OPTIMIZERS = ("AdamW", "AdamC")
ARMS = ("adamw_best", "adamc_best", "control", "no_decay")
MID, TAIL = (0.4, 0.6), 0.05
RULE_FRACTION = 0.8  # "lower throughout training": the interval below 0 at >= this share of the evaluations
RULE = (
    "Primary statistic: the paired difference AdamC - AdamW (each at its phase-1 best weight decay) of the whole-split "
    "validation loss at every evaluation, over the phase-2 (held-out) seeds, with its two-sided 95% Student-t "
    f"interval. 'AdamC lower throughout training' if the interval lies below 0 at >= {RULE_FRACTION:.0%} of the "
    f"evaluations; 'AdamW lower throughout training' if it lies above 0 at >= {RULE_FRACTION:.0%}; otherwise the "
    "final evaluation decides 'lower at the end only' (interval excludes 0) or 'no difference resolvable' (it holds "
    "0). If both optimizers' best weight decay is 0 the two arms are one run: 'weight decay does not help at this "
    "scale'."
)


class Config(LlmConfig):
    """Defaults: the micro Llama (237,888 parameters) on the whole default corpus slice (max_bytes 16M: ~4.9M train
    tokens, ~96k validation tokens), 512 tokens a step, 5600 steps (2.87M tokens: 12 tokens per parameter, 0.58 of
    an epoch), lr 3e-3: 22 phase-1 runs and up to 16 phase-2 runs (docs/results_adamc_at_best.md)."""

    max_bytes: int = Field(16_000_000, gt=0, description="bytes of Python stdlib source (all of it: ~12 MB)")
    lr: float = Field(3e-3, gt=0, description="peak lr; cosine to zero after the warmup")
    steps: int = Field(5600, gt=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="the trainer's default; the share of clipped steps is reported")
    lr_wd_steps: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 4.0, 8.0], min_length=2, description="lambda = this / (lr*steps)"
    )
    phase1_seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    phase2_seeds: list[int] = Field(default_factory=lambda: [2, 3, 4, 5], min_length=2)
    eval_points: int = Field(28, gt=0, description="evaluations per run, evenly spaced, the last at the last step")
    tracking_interval: int = Field(56, gt=0, description="steps between per-layer norm measurements")
    train_curve_points: int = Field(56, gt=0, description="train loss curve: means over this many equal stretches")

    @model_validator(mode="after")
    def _fits(self) -> Config:
        for name in ("eval_points", "tracking_interval", "train_curve_points"):
            value = getattr(self, name)
            if self.steps % value:
                raise ValueError(f"{name}={value} must divide steps={self.steps} (the last step is measured)")
        if self.warmup_steps >= MID[0] * self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must end before the 40% mark of steps={self.steps}")
        if any(v < 0 for v in self.lr_wd_steps) or 0.0 not in self.lr_wd_steps:
            raise ValueError(f"lr_wd_steps={self.lr_wd_steps}: values >= 0, and 0 (no decay) among them")
        if set(self.phase1_seeds) & set(self.phase2_seeds):
            raise ValueError(f"phase2_seeds={self.phase2_seeds} must be new seeds, not in phase1_seeds")
        return self


def weight_decay(cfg: Config, lr_wd_steps: float) -> float:
    """lambda with lr * lambda * steps = ``lr_wd_steps``, to 4 significant digits."""
    return float(f"{lr_wd_steps / (cfg.lr * cfg.steps):.4g}")


def run_name(optimizer: str, wd: float, seed: int) -> str:
    """Without decay AdamW and AdamC are the same optimizer: one run, named without it."""
    return f"wd0-seed{seed}" if wd == 0 else f"{optimizer.lower()}-wd{wd:.4g}-seed{seed}"


def overrides(cfg: Config, optimizer: str, wd: float, seed: int) -> list[str]:
    """Everything but the optimizer type and lambda is the same for every run."""
    return [
        f"seed={seed}",
        f"optimizer.type={'AdamW' if wd == 0 else optimizer}",
        f"optimizer.lr={cfg.lr}",
        f"optimizer.weight_decay={wd}",
        "scheduler.type=cosine",
        f"scheduler.warmup_steps={cfg.warmup_steps}",
        "scheduler.min_lr=0.0",
        f"train.grad_clip={cfg.grad_clip}",
        f"eval.interval={cfg.steps // cfg.eval_points}",
        "eval.full_split=true",
        "eval.batches=1",  # the seed's own validation sample is built but not used
        "logging.interval=1",  # every step's loss, grad norm, lr and lambda_t
        "tracking.enabled=true",
        f"tracking.interval={cfg.tracking_interval}",
        "tracking.activations=false",
    ]


def per_layer(records: list[dict[str, Any]], steps: int) -> dict[str, dict[str, Any]]:
    """Per parameter: ||x||, ||g||, ||dx|| over the mid stretch, the last 5% and at the last tracked step (and
    which step that was), from every tracked row (not only the last one)."""
    names = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("grad_norm/")})
    out = {}
    for name in names:
        entry: dict[str, Any] = {}
        for kind in ("weight_norm", "grad_norm", "update_norm"):
            key = f"{kind}/{name}"
            tracked, values = series(records, key)
            entry[kind] = {
                "mid": window_mean(records, key, *MID, steps),
                "end": window_mean(records, key, 1.0 - TAIL, 1.0, steps),
                "last": values[-1] if values else math.nan,
            }
            entry["last_step"] = tracked[-1] if tracked else None
        out[name] = entry
    return out


def train_curve(records: list[dict[str, Any]], steps: int, points: int) -> list[dict[str, float]]:
    """Mean train loss over ``points`` equal stretches of the run, at each stretch's last step."""
    width = steps // points
    return [
        {"step": (i + 1) * width, "loss": window_mean(records, "loss", i / points, (i + 1) / points, steps)}
        for i in range(points)
    ]  # fmt: skip


def summarize_run(cfg: Config, records: list[dict[str, Any]], optimizer: str, wd: float, seed: int) -> dict[str, Any]:
    """One run's numbers: the validation and train curves, final losses, the global grad norm's rise and the share
    of clipped steps, integrated decay, per-layer norms."""
    val_steps, val = series(records, "val_loss")
    grad_steps, grads = series(records, "grad_norm")
    tracked = [r["step"] for r in records if "tracking/weight_norm" in r]
    mid = window_mean(records, "grad_norm", *MID, cfg.steps)
    end = window_mean(records, "grad_norm", 1.0 - TAIL, 1.0, cfg.steps)
    return {
        "name": run_name(optimizer, wd, seed),
        "optimizer": "AdamW" if wd == 0 else optimizer,
        "weight_decay": wd,
        "lr_wd_steps": round(cfg.lr * wd * cfg.steps, 6),
        "seed": seed,
        "integrated_decay": measured_decay(records),
        "curve": [{"step": s, "val_loss": v} for s, v in zip(val_steps, val, strict=True)],
        "train_curve": train_curve(records, cfg.steps, cfg.train_curve_points),
        "final_val_loss": val[-1] if val_steps and val_steps[-1] == cfg.steps else math.nan,
        "final_train_loss": window_mean(records, "loss", 1.0 - TAIL, 1.0, cfg.steps),
        "grad_norm_mid": mid,
        "grad_norm_end": end,
        "grad_norm_rise": end / mid,
        "clipped_fraction": sum(g > cfg.grad_clip for g in grads) / len(grads) if cfg.grad_clip > 0 else 0.0,
        "logged_steps": len(grad_steps),
        "tracked_last_step": tracked[-1] if tracked else None,
        "per_layer": per_layer(records, cfg.steps),
    }


def choose_best(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per optimizer, the lambda with the lowest mean final validation loss over the phase-1 seeds (lambda 0, shared
    by both, included); the table of means behind the choice."""
    means: dict[str, dict[str, Any]] = {}
    for opt in OPTIMIZERS:
        table = {}
        for v in cfg.lr_wd_steps:
            wd = weight_decay(cfg, v)
            group = [r for r in runs if r["weight_decay"] == wd and (wd == 0 or r["optimizer"] == opt)]
            table[f"{v:g}"] = {
                "weight_decay": wd,
                "final_val_loss": mean_std([r["final_val_loss"] for r in group]),
                "per_seed": {str(r["seed"]): r["final_val_loss"] for r in group},
            }
        means[opt] = table
    best = {}
    for opt, table in means.items():
        key = min(table, key=lambda k: table[k]["final_val_loss"]["mean"])
        edge = key == f"{max(cfg.lr_wd_steps):g}"
        best[opt] = {
            "weight_decay": table[key]["weight_decay"],
            "lr_wd_steps": float(key),
            "phase1_final_val_loss": table[key]["final_val_loss"],
            "at_grid_edge": edge,  # the largest lr*lambda*steps: the optimum may lie beyond the grid
        }
    return {"best": best, "phase1_means": means}


def arm_runs(phase2: list[dict[str, Any]], arm: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in phase2 if r["arm"] == arm}


def paired_curve(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """a - b of the validation loss at each evaluation step, paired by seed, with its t-interval."""
    steps = [p["step"] for p in next(iter(a.values()))["curve"]]
    out = []
    for i, step in enumerate(steps):
        diff = paired(
            {s: r["curve"][i]["val_loss"] for s, r in a.items()}, {s: r["curve"][i]["val_loss"] for s, r in b.items()}
        )
        out.append({"step": step, **diff})
    return out


def compare(phase2: list[dict[str, Any]], arm_a: str, arm_b: str) -> dict[str, Any]:
    """arm_a - arm_b: the paired curve, the share of evaluations whose interval lies below / above 0, and the final
    validation loss, train loss, rise and clipped share with their intervals."""
    a, b = arm_runs(phase2, arm_a), arm_runs(phase2, arm_b)
    curve = paired_curve(a, b)
    signs = [sign(p) for p in curve]
    finals = {
        key: paired({s: r[key] for s, r in a.items()}, {s: r[key] for s, r in b.items()})
        for key in ("final_val_loss", "final_train_loss", "grad_norm_rise", "clipped_fraction")
    }
    return {
        "curve": curve,
        "fraction_below_zero": signs.count(-1) / len(signs),
        "fraction_above_zero": signs.count(1) / len(signs),
        "same_runs": all(a[s]["name"] == b[s]["name"] for s in a),
        **finals,
    }


def decide(diff: dict[str, Any], first: str, second: str) -> str:
    """The outcome of RULE for ``first - second``."""
    if diff["same_runs"]:  # only when both arms are lambda 0: every other pair differs in optimizer or lambda
        return "weight decay does not help at this scale: both arms are the runs without weight decay"
    if diff["fraction_below_zero"] >= RULE_FRACTION:
        return f"{first} lower throughout training"
    if diff["fraction_above_zero"] >= RULE_FRACTION:
        return f"{second} lower throughout training"
    final = sign(diff["final_val_loss"])
    if final < 0:
        return f"{first} lower at the end only, not throughout training"
    if final > 0:
        return f"{second} lower at the end only, not throughout training"
    return "no difference resolvable (the final interval holds 0)"


def verdict(best: dict[str, Any], comparisons: dict[str, Any]) -> dict[str, Any]:
    """The verdict block: the claim, statistic, interval, rule, outcome; and the secondary questions (does decay help
    each optimizer; corrected schedule or less total decay)."""
    main = comparisons["adamc_minus_adamw"]
    helps = {}
    for opt, key in (("AdamW", "adamw_minus_no_decay"), ("AdamC", "adamc_minus_no_decay")):
        if best[opt]["weight_decay"] == 0:
            helps[opt] = f"no: {opt}'s best weight decay is 0"
        else:
            s = sign(comparisons[key]["final_val_loss"])
            helps[opt] = {-1: "yes", 1: "no: worse than no decay", 0: "not resolvable (the interval holds 0)"}[s]
    return {
        "claim": "AdamC reaches a lower validation loss than AdamW throughout training, each at its own best weight "
        "decay (Defazio 2025)",
        "statistic": "paired AdamC - AdamW whole-split validation loss per evaluation, held-out seeds",
        "interval": "two-sided 95% Student-t interval of the mean paired difference",
        "rule": RULE,
        "outcome": decide(main, "AdamC", "AdamW"),
        "fraction_below_zero": main["fraction_below_zero"],
        "fraction_above_zero": main["fraction_above_zero"],
        "final_val_loss": main["final_val_loss"],
        "decay_helps_final_val_loss": helps,
        "adamc_vs_control": decide(comparisons["adamc_minus_control"], "AdamC", "the control"),
    }


def corpus_tokens(cfg: Config) -> dict[str, int]:
    """Train and validation tokens of the corpus slice (prepared here, once, before any run)."""
    import os

    from megatron_adamc.data import prepare_default_data
    from megatron_adamc.data.megatron_import import quiet_megatron_import

    cache = os.path.expanduser(data_cache(cfg))
    paths = prepare_default_data(cache, cfg.vocab_size, cfg.max_bytes)
    quiet_megatron_import()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = {}
    for split, prefix in (("train", paths.train_prefix), ("valid", paths.valid_prefix)):
        dataset = IndexedDataset(prefix)  # held while reading: its arrays view a memory map it closes when collected
        counts[split] = int(dataset.sequence_lengths.sum())
    return counts


def run(cfg: Config, output_dir: Path) -> dict:
    """Phase 1, the choice, phase 2, then results.json and adamc_at_best.png."""
    from megatron_adamc.experiments._adamc_at_best_figures import plot

    started = time.monotonic()
    output_dir.mkdir(parents=True, exist_ok=True)
    tokens = corpus_tokens(cfg)
    per_step = cfg.seq_len * cfg.micro_batch_size
    if cfg.steps * per_step > tokens["train"] - cfg.seq_len:
        raise UserError(
            f"steps={cfg.steps} x {per_step} tokens is more than the {tokens['train']} training tokens of "
            f"max_bytes={cfg.max_bytes}: data would repeat; lower steps or raise max_bytes"
        )
    lambdas = [weight_decay(cfg, v) for v in cfg.lr_wd_steps]
    first = sorted(
        {(("AdamW" if wd == 0 else opt), wd, s) for wd in lambdas for opt in OPTIMIZERS for s in cfg.phase1_seeds}
    )
    queue = RunQueue(cfg, output_dir, total_steps=(len(first) + 4 * len(cfg.phase2_seeds)) * cfg.steps)
    curves: dict[str, list[dict[str, Any]]] = {}

    def train(opt: str, wd: float, seed: int) -> Task[dict[str, Any]]:
        name = run_name(opt, wd, seed)
        curves[name] = yield Run(name, overrides(cfg, opt, wd, seed), cfg.steps)
        return summarize_run(cfg, curves[name], opt, wd, seed)

    queue.total_runs = len(first)
    phase1 = queue.parallel([train(*spec) for spec in first])
    chosen = choose_best(cfg, phase1)
    best = chosen["best"]
    adamc = next(
        r for r in phase1 if r["name"] == run_name("AdamC", best["AdamC"]["weight_decay"], cfg.phase1_seeds[0])
    )
    lrs = [r["lr"] for r in curves[adamc["name"]] if "lr" in r]
    control_wd = float(f"{matched_adamw_decay(lrs, best['AdamC']['weight_decay'], cfg.lr):.4g}")
    arm_specs = {
        "adamw_best": ("AdamW", best["AdamW"]["weight_decay"]),
        "adamc_best": ("AdamC", best["AdamC"]["weight_decay"]),
        "control": ("AdamW", control_wd),
        "no_decay": ("AdamW", 0.0),
    }
    second = sorted(
        {(("AdamW" if wd == 0 else opt), wd, s) for opt, wd in arm_specs.values() for s in cfg.phase2_seeds}
    )
    queue.total_runs, queue.count = len(second), 0
    queue.total_steps = queue.done_steps + len(second) * cfg.steps
    by_name = {r["name"]: r for r in queue.parallel([train(*spec) for spec in second])}
    phase2 = [
        {"arm": arm, **by_name[run_name(opt, wd, seed)]}
        for arm, (opt, wd) in arm_specs.items()
        for seed in cfg.phase2_seeds
    ]
    comparisons = {
        "adamc_minus_adamw": compare(phase2, "adamc_best", "adamw_best"),
        "adamc_minus_control": compare(phase2, "adamc_best", "control"),
        "adamw_minus_no_decay": compare(phase2, "adamw_best", "no_decay"),
        "adamc_minus_no_decay": compare(phase2, "adamc_best", "no_decay"),
    }
    num_params = json.loads((queue.runs_dir / phase1[0]["name"] / "run.json").read_text())["num_params"]
    arms = {
        arm: {
            "optimizer": opt,
            "weight_decay": wd,
            "lr_wd_steps": round(cfg.lr * wd * cfg.steps, 6),
            **{
                key: t_interval([r[key] for r in arm_runs(phase2, arm).values()])
                for key in (
                    "final_val_loss",
                    "final_train_loss",
                    "grad_norm_rise",
                    "clipped_fraction",
                    "integrated_decay",
                )
            },
        }
        for arm, (opt, wd) in arm_specs.items()
    }
    results = {
        "config": {
            **cfg.model_dump(),
            "lambdas": lambdas,
            "num_params": num_params,
            "tokens_per_step": per_step,
            "tokens": cfg.steps * per_step,
            "tokens_per_param": cfg.steps * per_step / num_params,
            "train_tokens": tokens["train"],
            "valid_tokens": tokens["valid"],
            "epochs": cfg.steps * per_step / tokens["train"],
            "eval_steps": [p["step"] for p in phase1[0]["curve"]],
        },
        "phase1": {"runs": phase1, "means": chosen["phase1_means"]},
        "best": best,
        "control": {
            "weight_decay": control_wd,
            "rule": "AdamW lambda = lambda_C sum_t lr_t^2 / lr_max / sum_t lr_t (lrs logged by AdamC's phase-1 run)",
        },
        "phase2": {"runs": phase2, "arms": arms, "comparisons": comparisons},
        "verdict": verdict(best, comparisons),
        "wall_time_s": time.monotonic() - started,
        "command": queue.shared_command(),
        "run_sets": {name: queue.run_sets(name) for name in sorted(curves)},
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(cfg, curves, results, output_dir / "adamc_at_best.png")
    return results
