"""The Adam steady-state constant, measured: at constant lr, does ||dx|| / (lr ||x||) of a normalized layer settle at
Defazio's sqrt(2 lambda / lr) or at Kosson's sqrt(2 lambda / lr) * sqrt((1 - beta1) / (1 + beta1))?

The two forms differ only by the momentum factor, 1, 1.73 and 4.36 at beta1 0, 0.5 and 0.9, so one beta1 cannot tell
"Kosson's form" from "Defazio's form times a constant". Runs at three beta1 and two lrs 4x apart (lambda fixed)
measure the constant C = measured / sqrt(2 lambda / lr) as a function of beta1, and the lr exponent a of the
measured ratio (both forms: -1/2). Two models: the micro Llama through the trainer (its tracker's per-parameter
ratios, the model the earlier "Kosson fits" finding came from), and the normalized MLP of ``steady-state``, whose
hidden weights are exactly scale-invariant (the setting both derivations assume), in process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from megatron_adamc.core.theory import adam_normalized_update_ratio, layer_type, momentum_factor
from megatron_adamc.experiments import steady_state
from megatron_adamc.experiments._trainer_runs import LlmConfig, Run, RunQueue, Task
from megatron_adamc.tracking.forms import geometric_mean, per_parameter

HEADLINE_KEYS = ("constants", "exponents")
FIT = (0.8, 1.25)  # a form fits when measured / predicted is within this band at every beta1 and lr
EXPONENT_TOLERANCE = 0.1
RULE = (
    "C = measured ||dx||/(lr ||x||) / sqrt(2 lambda / lr) per layer type, geometric mean over the settled tracked "
    "steps (sum_t lr_t lambda >= settled_decay) and over the type's parameters. Defazio's Adam form predicts C = 1, "
    "Kosson's C = sqrt((1 - beta1)/(1 + beta1)). A form fits a layer type when measured/predicted lies within "
    f"[{FIT[0]}, {FIT[1]}] at every beta1 and both lrs. The lr exponent a = log(r(lr_1)/r(lr_2)) / log(lr_1/lr_2) at "
    f"fixed lambda; both forms predict -1/2; the data agree when |a + 1/2| <= {EXPONENT_TOLERANCE}."
)


class Config(LlmConfig):
    """Defaults: the micro Llama at lr 3e-3 and 7.5e-4 (lambda 2, constant lr after 20 warmup steps, 770 and 3020
    steps: sum lr*lambda = 2 to settle, 2.5 measured), beta1 0 / 0.5 / 0.9, one seed: 6 runs, ~11k steps; the MLP at
    lr 1e-2 and 2.5e-3 (lambda 0.5), two seeds, in process."""

    beta1s: list[float] = Field(default_factory=lambda: [0.0, 0.5, 0.9], min_length=2)
    beta2: float = Field(0.95, gt=0, lt=1)
    lrs: list[float] = Field(default_factory=lambda: [3e-3, 7.5e-4], min_length=2, max_length=2)
    weight_decay: float = Field(2.0, gt=0)
    warmup_steps: int = Field(20, ge=0)
    settled_decay: float = Field(2.0, gt=0, description="sum_t lr_t lambda before a step counts as settled")
    measured_decay: float = Field(2.5, gt=0, description="sum_t lr_t lambda measured after settling")
    tracking_interval: int = Field(10, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    mlp_lrs: list[float] = Field(default_factory=lambda: [1e-2, 2.5e-3], min_length=2, max_length=2)
    mlp_weight_decay: float = Field(0.5, gt=0)
    mlp_seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)

    @model_validator(mode="after")
    def _apart(self) -> Config:
        for name in ("lrs", "mlp_lrs"):
            a, b = sorted(getattr(self, name))
            if b < 4 * a:
                raise ValueError(f"{name}={getattr(self, name)}: the two lrs must be at least 4x apart")
        if any(not 0 <= b < 1 for b in self.beta1s):
            raise ValueError(f"beta1s={self.beta1s}: each in [0, 1)")
        return self


def steps_for(cfg: Config, lr: float, weight_decay: float) -> int:
    """Warmup, then sum lr*lambda = settled_decay + measured_decay, rounded up to the tracking interval."""
    steps = cfg.warmup_steps + (cfg.settled_decay + cfg.measured_decay) / (lr * weight_decay)
    return math.ceil(steps / cfg.tracking_interval) * cfg.tracking_interval


def overrides(cfg: Config, beta1: float, lr: float, seed: int) -> list[str]:
    return [
        f"seed={seed}",
        "optimizer.type=AdamW",
        f"optimizer.lr={lr}",
        f"optimizer.weight_decay={cfg.weight_decay}",
        f"optimizer.betas=[{beta1},{cfg.beta2}]",
        "scheduler.type=constant",
        f"scheduler.warmup_steps={cfg.warmup_steps}",
        f"eval.interval={steps_for(cfg, lr, cfg.weight_decay)}",
        "eval.batches=1",
        "logging.interval=1",  # every step's lr and lambda: the settled point is summed from them
        "tracking.enabled=true",
        f"tracking.interval={cfg.tracking_interval}",
        "tracking.activations=false",
    ]


def settled(cfg: Config, records: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """The tracked rows after sum_t lr_t lambda reached settled_decay."""
    total, out = 0.0, []
    for r in records:
        total += r.get("lr", 0.0) * weight_decay
        if total >= cfg.settled_decay and any(k.startswith("normalized_update_ratio/") for k in r):
            out.append(r)
    return out


def by_type(values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Geometric mean, min and max of per-parameter values, by layer type."""
    out = {}
    for kind in sorted({layer_type(n) for n in values}):
        group = [v for n, v in values.items() if layer_type(n) == kind]
        out[kind] = {"mean": geometric_mean(group), "min": min(group), "max": max(group), "params": len(group)}
    return out


def llama_run(cfg: Config, records: list[dict[str, Any]], beta1: float, lr: float, seed: int) -> dict[str, Any]:
    rows = settled(cfg, records, cfg.weight_decay)
    ratios = {}  # per parameter: geometric mean of measured ||dx||/(lr ||x||) over the settled rows
    for row in rows:
        for key, value in row.items():
            if key.startswith("normalized_update_ratio/") and value > 0:
                ratios.setdefault(key.split("/", 1)[1], []).append(value)
    measured = {n: geometric_mean(v) for n, v in ratios.items()}
    return {
        "model": "llama",
        "beta1": beta1,
        "lr": lr,
        "weight_decay": cfg.weight_decay,
        "seed": seed,
        "steps": records[-1]["step"],
        "settled_steps": [rows[0]["step"], rows[-1]["step"]] if rows else None,
        "normalized_ratio": by_type(measured),
        "constant": by_type(per_parameter(rows, "adam")),  # measured / sqrt(2 lambda / lr)
    }


def mlp_run(cfg: Config, beta1: float, lr: float, seed: int) -> dict[str, Any]:
    """The normalized MLP of ``steady-state`` under torch AdamW (decoupled decay) at constant lr: per hidden layer
    the geometric mean of ||dx|| / (lr ||x||) over the settled steps."""
    mlp_cfg = steady_state.Config(seed=seed)
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(mlp_cfg.input_dim, mlp_cfg.width),
        torch.nn.Tanh(),
        torch.nn.Linear(mlp_cfg.width, mlp_cfg.classes),
    )
    model = steady_state.NormalizedMLP(mlp_cfg)
    hidden = [layer.weight for layer in model.hidden]
    head = list(model.head.parameters())
    opt = torch.optim.AdamW(
        [{"params": hidden, "weight_decay": cfg.mlp_weight_decay}, {"params": head, "weight_decay": 0.0}],
        lr=lr, betas=(beta1, cfg.beta2),
    )  # fmt: skip
    data = torch.Generator().manual_seed(seed + 1)
    steps = math.ceil((cfg.settled_decay + cfg.measured_decay) / (lr * cfg.mlp_weight_decay))
    logs: dict[str, list[float]] = {f"layer{i}": [] for i in range(len(hidden))}
    total = 0.0
    for _ in range(steps):
        inputs = torch.randn(mlp_cfg.batch_size, mlp_cfg.input_dim, generator=data)
        with torch.no_grad():
            probs = F.softmax(teacher(inputs) / mlp_cfg.teacher_temperature, dim=-1)
        labels = torch.multinomial(probs, 1, generator=data).squeeze(1)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        before = [w.detach().clone() for w in hidden]
        opt.step()
        total += lr * cfg.mlp_weight_decay
        if total >= cfg.settled_decay:
            for i, (w, w0) in enumerate(zip(hidden, before, strict=True)):
                logs[f"layer{i}"].append(float((w.detach() - w0).norm() / (lr * w0.norm())))
    predicted = adam_normalized_update_ratio(cfg.mlp_weight_decay, lr)
    measured = {name: geometric_mean(v) for name, v in logs.items()}
    return {
        "model": "mlp",
        "beta1": beta1,
        "lr": lr,
        "weight_decay": cfg.mlp_weight_decay,
        "seed": seed,
        "steps": steps,
        "settled_steps": [steps - len(logs["layer0"]) + 1, steps],
        "normalized_ratio": {"normalized": {"mean": geometric_mean(measured.values()), **_spread(measured)}},
        "constant": {"normalized": {"mean": geometric_mean(v / predicted for v in measured.values()),
                                    **_spread({n: v / predicted for n, v in measured.items()})}},
    }  # fmt: skip


def _spread(values: dict[str, float]) -> dict[str, float]:
    return {"min": min(values.values()), "max": max(values.values()), "params": len(values)}


def summarize(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model, layer type and beta1: the constant (mean over lrs and seeds) against both forms and whether each
    fits; the lr exponent from the two lrs (mean over seeds)."""
    constants: dict[str, Any] = {}
    exponents: dict[str, Any] = {}
    for model in sorted({r["model"] for r in runs}):
        group = [r for r in runs if r["model"] == model]
        lrs = sorted({r["lr"] for r in group})
        for kind in sorted({k for r in group for k in r["constant"]}):
            for beta1 in cfg.beta1s:
                cell = [r for r in group if r["beta1"] == beta1 and kind in r["constant"]]
                per_lr = {
                    f"{lr:g}": geometric_mean(r["constant"][kind]["mean"] for r in cell if r["lr"] == lr) for lr in lrs
                }
                ratio = {
                    lr: geometric_mean(r["normalized_ratio"][kind]["mean"] for r in cell if r["lr"] == lr) for lr in lrs
                }
                kosson = 1.0 / momentum_factor(beta1)
                measured = geometric_mean(per_lr.values())
                constants.setdefault(model, {}).setdefault(kind, {})[f"{beta1:g}"] = {
                    "measured": measured,
                    "per_lr": per_lr,
                    "defazio": 1.0,
                    "kosson": kosson,
                    "over_kosson": measured / kosson,
                    "fits_defazio": all(FIT[0] <= v <= FIT[1] for v in per_lr.values()),
                    "fits_kosson": all(FIT[0] <= v / kosson <= FIT[1] for v in per_lr.values()),
                }  # fmt: skip
                lo, hi = lrs
                exponents.setdefault(model, {}).setdefault(kind, {})[f"{beta1:g}"] = math.log(
                    ratio[hi] / ratio[lo]
                ) / math.log(hi / lo)
    return {"constants": constants, "exponents": exponents}


def verdict(cfg: Config, summary: dict[str, Any]) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    for model, kinds in summary["constants"].items():
        for kind, cells in kinds.items():
            forms = [f for f in ("defazio", "kosson") if all(c[f"fits_{f}"] for c in cells.values())]
            exps = list(summary["exponents"][model][kind].values())
            outcome.setdefault(model, {})[kind] = {
                "fits": forms or ["neither"],
                "constant_by_beta1": {b: round(c["measured"], 3) for b, c in cells.items()},
                "exponent_range": [min(exps), max(exps)],
                "exponent_agrees": all(abs(a + 0.5) <= EXPONENT_TOLERANCE for a in exps),
            }
    return {
        "claim": "at constant lr the normalized update ||dx||/(lr ||x||) of a normalized layer settles at "
        "C(beta1) * sqrt(2 lambda / lr): C = 1 (Defazio) or sqrt((1-beta1)/(1+beta1)) (Kosson)",
        "statistic": "geometric mean over settled steps and parameters of measured / sqrt(2 lambda / lr)",
        "interval": "min-max over the parameters of a layer type (one value per parameter); seeds as listed",
        "rule": RULE,
        "outcome": outcome,
    }


def run(cfg: Config, output_dir: Path) -> dict:
    """The Llama runs (side by side), the MLP runs (in process), results.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    specs = [(b, lr, s) for b in cfg.beta1s for lr in cfg.lrs for s in cfg.seeds]
    total = sum(steps_for(cfg, lr, cfg.weight_decay) for _, lr, _ in specs)
    queue = RunQueue(cfg, output_dir, total_steps=total, total_runs=len(specs))

    def train(beta1: float, lr: float, seed: int) -> Task[dict[str, Any]]:
        name = f"beta1_{beta1:g}-lr{lr:g}-seed{seed}"
        steps = steps_for(cfg, lr, cfg.weight_decay)
        records = yield Run(name, overrides(cfg, beta1, lr, seed), steps)
        return {"name": name, **llama_run(cfg, records, beta1, lr, seed)}

    runs = queue.parallel([train(*spec) for spec in sorted(specs, key=lambda s: s[1])])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs += [mlp_run(cfg, b, lr, s) for b in cfg.beta1s for lr in cfg.mlp_lrs for s in cfg.mlp_seeds]
    finally:
        torch.set_num_threads(threads)
    summary = summarize(cfg, runs)
    results = {
        **summary,
        "verdict": verdict(cfg, summary),
        "runs": runs,
        "config": {**cfg.model_dump(), "momentum_factors": {f"{b:g}": momentum_factor(b) for b in cfg.beta1s}},
        "command": queue.shared_command(),
        "run_sets": {r["name"]: queue.run_sets(r["name"]) for r in runs if r["model"] == "llama"},
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(cfg, results, output_dir / "adam_steady_state.png")
    return results


def plot(cfg: Config, results: dict[str, Any], path: Path) -> None:
    """Per model and layer type: the measured constant against beta1 at each lr, with Defazio's (1) and Kosson's
    sqrt((1 - beta1)/(1 + beta1)) lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_adamc.experiments._figure import save_figure

    panels = [(m, k) for m, kinds in results["constants"].items() for k in kinds]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    grid = [i / 100 for i in range(0, 96)]
    for ax, (model, kind) in zip(axes[0], panels, strict=True):
        cells = results["constants"][model][kind]
        for i, lr in enumerate(next(iter(cells.values()))["per_lr"]):
            betas = [float(b) for b in cells]
            ax.plot(betas, [c["per_lr"][lr] for c in cells.values()], "o", color=f"C{i}", label=f"measured, lr {lr}")
        ax.plot(grid, [1.0] * len(grid), "--", color="k", lw=1, label="Defazio: 1")
        ax.plot(grid, [1 / momentum_factor(b) for b in grid], ":", color="k", lw=1.5, label="Kosson")
        ax.set(title=f"{model}: {kind}", xlabel="beta1", ylabel="||dx||/(lr ||x||) / sqrt(2 lambda/lr)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, "Adam steady-state constant at constant lr (settled steps)")
