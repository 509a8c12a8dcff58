"""AdamW vs AdamC on the micro Llama, each at its own best weight decay, with the control that separates "corrected
schedule" from "less total decay".

At equal nominal lambda AdamC decays less in total (its per-step decay is lr_t * lambda * lr_t / lr_max), so a
comparison at one lambda cannot tell a better schedule from a smaller decay. The experiment therefore:

1. sweeps lambda for each optimizer (one seed, cosine to 0) and picks each one's best by final validation loss;
2. runs more seeds at each best lambda: final train/val loss, the gradient-norm rise (mean global grad norm over
   the last 5% of steps over its mean over the 40-60% stretch), and the per-layer steady state by layer type
   against Defazio's Adam form and Kosson's rotational equilibrium;
3. the control: AdamW with lambda chosen so that sum_t lr_t lambda equals AdamC's sum_t lr_t^2 lambda_C / lr_max at
   AdamC's best lambda (integrated over the schedule the runs logged), every seed; and one run without decay;
4. a long trio (AdamW and AdamC at one lambda, and AdamW at AdamC's integrated decay) with lr*wd*steps large against
   AdamW's timescale 1/(lr wd), where the rise has room to show, and one constant-lr AdamW run long enough to sit at
   equilibrium, which settles which Adam form the per-layer update ratios follow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from megatron_adamc.core.theory import integrated_decay, matched_adamw_decay
from megatron_adamc.experiments._trainer_runs import LlmConfig, Run, RunQueue, Task, mean_std, series, window_mean
from megatron_adamc.tracking.forms import (
    by_layer_type,
    closer_form,
    cosine_by_layer_type,
    forms_present,
    per_parameter,
    resolvable,
)

HEADLINE_KEYS = ("best", "control")
OPTIMIZERS = ("AdamW", "AdamC")
MID = (0.4, 0.6)  # the stretch the rise is measured against: the lr is still half its peak
STAT_KEYS = ("final_train_loss", "final_val_loss", "grad_norm_rise", "grad_norm_mid", "grad_norm_end")


class Config(LlmConfig):
    """Defaults: lr 3e-3, 1000 steps, 6 lambdas from 0.01 to 3 (lr*wd*steps 0.03 to 9), 3 seeds at each best, the
    control, a long trio of 6667 steps x 3 seeds and a 2500-step equilibrium run: 30 runs, 82.5k steps, 22 minutes on
    this 2-core CPU, idle, two runs side by side (docs/results_adamc_vs_adamw.md)."""

    lr: float = Field(3e-3, gt=0, description="peak lr; cosine to zero after a short warmup")
    steps: int = Field(1000, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decays: list[float] = Field(
        default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0, 3.0], min_length=1, description="the sweep, run for both"
    )
    seeds: int = Field(3, gt=0, description="seeds at each optimizer's best lambda (seed 0 is the sweep's run)")
    control: bool = Field(True, description="AdamW at the lambda matching AdamC's integrated decay, every seed")
    no_decay_reference: bool = Field(True, description="one run without weight decay (AdamW = AdamC there)")
    long_weight_decay: float = Field(0.3, gt=0, description="lambda of the long trio's AdamW and AdamC")
    long_seeds: int = Field(3, gt=0, description="seeds of the long trio")
    long_lr_wd_steps: float = Field(
        6.0,
        ge=0,
        description="the long trio runs lr*wd*steps = this (0: no long trio); its control is AdamW at "
        "AdamC's integrated decay",
    )
    equilibrium_weight_decay: float = Field(1.0, gt=0, description="lambda of the constant-lr equilibrium run")
    equilibrium_steps: int = Field(2500, ge=0, description="steps of the constant-lr AdamW run (0: none)")
    settled_decay: float = Field(
        2.0, gt=0, description="a run counts as settled once sum_t lr_t lambda_t >= this (squared norm relaxed e^-4)"
    )
    settled_lr_fraction: float = Field(
        0.5, gt=0, le=1, description="...and while lr_t >= this share of the peak (AdamW's target still moves slowly)"
    )
    tail_fraction: float = Field(0.05, gt=0, lt=0.4, description="the last share of steps whose grad norm is 'end'")
    tracking_interval: int = Field(20, gt=0, description="steps between per-layer norm measurements")
    eval_points: int = Field(20, gt=0, description="validation evaluations over a run (the last at the end)")
    eval_batches: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _fits(self) -> Config:
        if self.warmup_steps >= MID[0] * self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must end before the 40% mark of steps={self.steps}")
        if int(self.tail_fraction * self.steps) < 1:
            raise ValueError(f"tail_fraction*steps={self.tail_fraction * self.steps:g}: the tail needs >= 1 step")
        if any(wd <= 0 for wd in self.weight_decays):
            raise ValueError(f"weight_decays={self.weight_decays}: every weight decay must be > 0")
        if 0 < self.equilibrium_steps <= self.warmup_steps:
            raise ValueError(f"equilibrium_steps={self.equilibrium_steps} must exceed warmup_steps")
        return self


def run_name(optimizer: str, wd: float, seed: int, kind: str = "cosine", steps: int | None = None) -> str:
    suffix = "" if kind == "cosine" else f"-{kind}{steps}"
    return f"{optimizer.lower()}-wd{wd:.4g}-seed{seed}{suffix}"


def overrides(cfg: Config, optimizer: str, wd: float, seed: int, steps: int, schedule: str = "cosine") -> list[str]:
    """Everything but the optimizer type and lambda is the same for every run of one length."""
    return [
        f"seed={seed}",
        f"optimizer.type={optimizer}",
        f"optimizer.lr={cfg.lr}",
        f"optimizer.weight_decay={wd}",
        f"scheduler.type={schedule}",
        f"scheduler.warmup_steps={cfg.warmup_steps}",
        "scheduler.min_lr=0.0",
        f"eval.interval={max(1, steps // cfg.eval_points)}",
        f"eval.batches={cfg.eval_batches}",
        "logging.interval=1",  # every step's lr and lambda_t: the integrated decay is summed from them
        "tracking.enabled=true",
        f"tracking.interval={max(cfg.tracking_interval, steps // 100)}",
        "tracking.activations=false",  # norms only: the activation hooks cost time and this run needs none
    ]


def measured_decay(records: list[dict[str, Any]]) -> float:
    """sum_t lr_t lambda_t from the rows: the row's ``weight_decay`` is the lambda_t the step applied (AdamC's
    corrected one), its ``lr`` that step's lr."""
    return sum(r["lr"] * r["weight_decay"] for r in records if "lr" in r and "weight_decay" in r)


def settled_rows(cfg: Config, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The tracked rows where the run sits at its equilibrium: integrated decay so far >= settled_decay, lr still
    >= settled_lr_fraction of the peak. Returns them and their first and last step (None: never settled)."""
    total, out = 0.0, []
    for r in records:
        total += r.get("lr", 0.0) * r.get("weight_decay", 0.0)
        if total >= cfg.settled_decay and r.get("lr", 0.0) >= cfg.settled_lr_fraction * cfg.lr:
            if any(k.startswith("normalized_update_ratio/") or k.startswith("grad_weight_ratio/") for k in r):
                out.append(r)
    return out, ([out[0]["step"], out[-1]["step"]] if out else None)


def steady_state(cfg: Config, records: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Per window (mid 40-60%, the last 5%, settled) and prediction form: measured/predicted by layer type (steps
    whose lr is too small to move the FP32 weights left out, see ``forms.LR_FLOOR``)."""
    tail, kept = 1.0 - cfg.tail_fraction, resolvable(records)
    windows = {
        "mid": [r for r in kept if MID[0] * steps < r["step"] <= MID[1] * steps],
        "end": [r for r in kept if r["step"] > tail * steps],
    }
    windows["settled"], settled_steps = settled_rows(cfg, records)
    forms = forms_present(records)
    out: dict[str, Any] = {"forms": forms, "settled_steps": settled_steps}
    for window, rows in windows.items():
        out[window] = {form: by_layer_type(rows, form) for form in forms} if rows else None
    out["cos_weight_grad_mid"] = cosine_by_layer_type(windows["mid"])
    if windows["settled"]:
        out["settled_per_parameter"] = {form: per_parameter(windows["settled"], form) for form in forms}
    return out


def summarize_run(
    cfg: Config, records: list[dict[str, Any]], optimizer: str, wd: float, seed: int, phase: str, steps: int
) -> dict[str, Any]:
    """One run's numbers: losses, the global grad norm over the mid stretch and the tail and its rise, weight norms,
    per-layer rises, integrated decay and the per-layer-type steady state."""
    tail = 1.0 - cfg.tail_fraction
    mid = window_mean(records, "grad_norm", *MID, steps)
    end = window_mean(records, "grad_norm", tail, 1.0, steps)
    per_layer = {}
    for key in sorted(k for k in records[-1] if k.startswith("grad_norm/")):
        layer_mid, layer_end = window_mean(records, key, *MID, steps), window_mean(records, key, tail, 1.0, steps)
        per_layer[key.removeprefix("grad_norm/")] = layer_end / layer_mid if layer_mid > 0 else math.nan
    val_steps, val = series(records, "val_loss")
    return {
        "phase": phase,
        "optimizer": optimizer,
        "weight_decay": wd,
        "seed": seed,
        "lr": cfg.lr,
        "steps": steps,
        "lr_wd_steps": round(cfg.lr * wd * steps, 10),
        "integrated_decay": measured_decay(records),
        "final_train_loss": window_mean(records, "loss", tail, 1.0, steps),
        "final_val_loss": val[-1] if val_steps and val_steps[-1] == steps else math.nan,
        "grad_norm_mid": mid,
        "grad_norm_end": end,
        "grad_norm_rise": end / mid,
        "weight_norm_mid": window_mean(records, "tracking/weight_norm", *MID, steps),
        "weight_norm_end": window_mean(records, "tracking/weight_norm", tail, 1.0, steps),
        "per_layer_grad_norm_rise": per_layer,
        "steady_state": steady_state(cfg, records, steps),
    }


def stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: mean_std([r[k] for r in runs]) for k in STAT_KEYS}


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """a - b per seed present in both, for the losses and the rise: a difference with its own spread."""
    by_seed = {r["seed"]: r for r in b}
    common = [r for r in a if r["seed"] in by_seed]
    if not common:
        return {}
    keys = ("final_train_loss", "final_val_loss", "grad_norm_rise")
    return {k: mean_std([r[k] - by_seed[r["seed"]][k] for r in common]) for k in keys}


def type_means(runs: list[dict[str, Any]], window: str) -> dict[str, Any]:
    """Mean over runs of each form's per-layer-type measured/predicted in ``window`` (runs that have it)."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        for form, types in (r["steady_state"].get(window) or {}).items():
            for kind, value in types.items():
                out.setdefault(form, {}).setdefault(kind, []).append(value["mean"])
    return {form: {kind: mean_std(v) for kind, v in types.items()} for form, types in out.items()}


def best_weight_decays(sweep: list[dict[str, Any]]) -> dict[str, float]:
    """Per optimizer, the swept lambda with the lowest final validation loss (finite losses only)."""
    best = {}
    for opt in OPTIMIZERS:
        finite = [r for r in sweep if r["optimizer"] == opt and math.isfinite(r["final_val_loss"])]
        if finite:
            best[opt] = min(finite, key=lambda r: r["final_val_loss"])["weight_decay"]
    return best


def adam_forms(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Which Adam form the settled stretches support, per layer type: the mean measured/predicted of each form over
    every settled run, and the form nearer 1."""
    settled = [r for r in runs if r["steady_state"]["settled"]]
    means = type_means(settled, "settled")
    verdict = {}
    for kind in sorted({k for types in means.values() for k in types}):
        ratios = {form: {"mean": types[kind]["mean"]} for form, types in means.items() if kind in types}
        verdict[kind] = closer_form({f: v for f, v in ratios.items() if f in ("adam", "kosson")})
    return {
        "runs": [r["name"] for r in settled],
        "rule": f"tracked steps with sum_t lr_t lambda_t >= {cfg.settled_decay:g} and lr_t >= "
        f"{cfg.settled_lr_fraction:g} * lr_max",
        "measured_over_predicted": means,
        "closer_form": verdict,
    }


class _Runs:
    """The experiment's trainer runs: trains (or reuses) them, a batch of independent ones side by side, and keeps
    their records and summaries (in the order the batches list them, whatever order they finish in)."""

    def __init__(self, cfg: Config, output_dir: Path) -> None:
        self.cfg = cfg
        sweep = len(cfg.weight_decays) * len(OPTIMIZERS) + int(cfg.no_decay_reference)
        long = 3 * cfg.long_seeds if cfg.long_lr_wd_steps > 0 else 0
        self.total = sweep + 2 * (cfg.seeds - 1) + cfg.seeds * int(cfg.control) + long + int(cfg.equilibrium_steps > 0)
        estimate = (sweep + 2 * (cfg.seeds - 1) + cfg.seeds * int(cfg.control)) * cfg.steps + cfg.equilibrium_steps
        self.queue = RunQueue(cfg, output_dir, total_steps=estimate + long * long_steps(cfg), total_runs=self.total)
        self.curves: dict[str, list[dict[str, Any]]] = {}
        self.summaries: list[dict[str, Any]] = []

    def train(
        self, opt: str, wd: float, seed: int, phase: str, steps: int, schedule: str = "cosine"
    ) -> Task[dict[str, Any]]:
        """The task of one run: its summary."""
        kind = "constant" if schedule == "constant" else "long" if steps != self.cfg.steps else "cosine"
        name = run_name(opt, wd, seed, kind, steps)
        self.curves[name] = yield Run(name, overrides(self.cfg, opt, wd, seed, steps, schedule), steps)
        return {"name": name, **summarize_run(self.cfg, self.curves[name], opt, wd, seed, phase, steps)}

    def batch(self, specs: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """Train the runs ``specs`` (``train``'s arguments each), independent of one another, longest first."""
        order = sorted(range(len(specs)), key=lambda i: -specs[i][4])  # the longest first: the batch ends sooner
        done = dict(zip(order, self.queue.parallel([self.train(*specs[i]) for i in order]), strict=True))
        results = [done[i] for i in range(len(specs))]
        self.summaries += results
        return results

    def control(self, adamc: dict[str, Any]) -> dict[str, Any]:
        """AdamW's lambda whose sum_t lr_t lambda equals the AdamC run ``adamc``'s, over the lrs it logged."""
        lrs = [r["lr"] for r in self.curves[adamc["name"]] if "lr" in r]
        return {
            "rule": "AdamW lambda = sum_t lr_t^2 lambda_C / lr_max / sum_t lr_t, over the lrs the AdamC run logged",
            "weight_decay": float(f"{matched_adamw_decay(lrs, adamc['weight_decay'], self.cfg.lr):.4g}"),
            "adamc_weight_decay": adamc["weight_decay"],
            "adamc_integrated_decay": integrated_decay(lrs, adamc["weight_decay"], self.cfg.lr),
        }


def long_steps(cfg: Config) -> int:
    """Steps of the long trio: lr * long_weight_decay * steps = long_lr_wd_steps (rounded up)."""
    return math.ceil(round(cfg.long_lr_wd_steps / (cfg.lr * cfg.long_weight_decay), 6))


def near_best(sweep: list[dict[str, Any]], best: dict[str, Any], opt: str) -> list[float]:
    """The swept lambdas whose seed-0 loss is within 2 std (over the best lambda's seeds) of the best seed-0 loss:
    the ones the sweep cannot tell from the best."""
    runs = [r for r in sweep if r["optimizer"] == opt]
    top = next(r for r in runs if r["weight_decay"] == best["weight_decay"])["final_val_loss"]
    margin = 2 * best["final_val_loss"]["std"]
    return sorted(r["weight_decay"] for r in runs if r["final_val_loss"] <= top + margin)


def run(cfg: Config, output_dir: Path) -> dict:
    """Two batches of independent runs, each side by side: (1) the sweep, the no-decay reference, the long AdamW and
    AdamC runs and the equilibrium run; (2) what depends on them: more seeds at each best lambda, the control, the
    long trio's control. Then results.json and the figures."""
    from megatron_adamc.experiments._adamc_vs_adamw_figures import plot_adam_forms, plot_overview

    output_dir.mkdir(parents=True, exist_ok=True)
    runs = _Runs(cfg, output_dir)
    long_n, long_wd = long_steps(cfg), cfg.long_weight_decay
    first: list[tuple[Any, ...]] = [(opt, wd, 0, "sweep", cfg.steps) for wd in cfg.weight_decays for opt in OPTIMIZERS]
    if cfg.no_decay_reference:
        first.append(("AdamW", 0.0, 0, "no_decay", cfg.steps))
    if cfg.long_lr_wd_steps > 0:
        first += [(opt, long_wd, seed, "long", long_n) for seed in range(cfg.long_seeds) for opt in OPTIMIZERS]
    if cfg.equilibrium_steps:
        first.append(("AdamW", cfg.equilibrium_weight_decay, 0, "equilibrium", cfg.equilibrium_steps, "constant"))
    done = runs.batch(first)
    sweep = [r for r in done if r["phase"] == "sweep"]
    no_decay = next((r for r in done if r["phase"] == "no_decay"), None)
    long_runs = {(r["optimizer"], r["seed"]): r for r in done if r["phase"] == "long"}

    best_wd = best_weight_decays(sweep)
    second: list[tuple[Any, ...]] = [
        (opt, wd, seed, "seed", cfg.steps) for seed in range(1, cfg.seeds) for opt, wd in best_wd.items()
    ]
    control: dict[str, Any] = {}
    if cfg.control and "AdamC" in best_wd:
        adamc = next(r for r in sweep if (r["optimizer"], r["weight_decay"]) == ("AdamC", best_wd["AdamC"]))
        control = runs.control(adamc)
        second += [("AdamW", control["weight_decay"], seed, "control", cfg.steps) for seed in range(cfg.seeds)]
    long_control = [runs.control(long_runs["AdamC", seed]) for seed in range(cfg.long_seeds)] if long_runs else []
    second += [("AdamW", c["weight_decay"], seed, "long_control", long_n) for seed, c in enumerate(long_control)]
    runs.batch(second)

    tuned = [r for r in runs.summaries if r["phase"] in ("sweep", "seed")]
    at_best = {
        opt: sorted((r for r in tuned if (r["optimizer"], r["weight_decay"]) == (opt, wd)), key=lambda r: r["seed"])
        for opt, wd in best_wd.items()
    }
    best = {
        opt: {
            "weight_decay": best_wd[opt],
            "lr_wd_steps": round(cfg.lr * best_wd[opt] * cfg.steps, 10),
            "integrated_decay": mean_std([r["integrated_decay"] for r in group]),
            **stats(group),
            "steady_state_mid": type_means(group, "mid"),
            "steady_state_end": type_means(group, "end"),
        }
        for opt, group in at_best.items()
    }
    for opt in best:
        best[opt]["near_best_weight_decays"] = near_best(sweep, best[opt], opt)
    if control:
        group = [r for r in runs.summaries if r["phase"] == "control"]
        control["control_integrated_decay"] = mean_std([r["integrated_decay"] for r in group])
        control.update({**stats(group), "adamc_minus_control": paired(at_best["AdamC"], group)})
    long: dict[str, Any] = {}
    if long_runs:
        trios = {
            "AdamW": [long_runs["AdamW", seed] for seed in range(cfg.long_seeds)],
            "AdamC": [long_runs["AdamC", seed] for seed in range(cfg.long_seeds)],
            "AdamW_control": [r for r in runs.summaries if r["phase"] == "long_control"],
        }
        last = trios["AdamW_control"][-1]["integrated_decay"]
        info = {**long_control[-1], "control_integrated_decay": mean_std([last])}
        long = {"steps": long_n, "lr_wd_steps": round(cfg.lr * long_wd * long_n, 10), "control": info}
        for key, group in trios.items():
            long[key] = {
                "weight_decay": group[0]["weight_decay"],
                "lr_wd_steps": group[0]["lr_wd_steps"],
                "integrated_decay": group[0]["integrated_decay"],
                "names": [r["name"] for r in group],
                **stats(group),
            }
        long["adamc_minus_adamw"] = paired(trios["AdamC"], trios["AdamW"])
        long["adamc_minus_control"] = paired(trios["AdamC"], trios["AdamW_control"])
    results = {
        "best": best,
        "adamc_minus_adamw_at_best": paired(at_best.get("AdamC", []), at_best.get("AdamW", [])),
        "control": control,
        "no_decay": {k: no_decay[k] for k in ("name", *STAT_KEYS)} if no_decay else None,
        "long": long,
        "adam_forms": adam_forms(cfg, runs.summaries),
        "sweep": {
            opt: {
                f"{r['weight_decay']:g}": {k: r[k] for k in ("final_val_loss", "grad_norm_rise", "lr_wd_steps")}
                for r in sweep
                if r["optimizer"] == opt
            }
            for opt in OPTIMIZERS
        },  # fmt: skip
        "runs": runs.summaries,
        "windows": {"mid": list(MID), "tail": [1.0 - cfg.tail_fraction, 1.0]},
        "config": cfg.model_dump(),
        "commands": {
            r["name"]: (runs.queue.runs_dir / r["name"] / "command.txt").read_text().strip() for r in runs.summaries
        },
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_overview(cfg, runs.curves, results, output_dir / "adamc_vs_adamw.png")
    plot_adam_forms(cfg, runs.curves, results, output_dir / "adam_forms.png")
    return results
