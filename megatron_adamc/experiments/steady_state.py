"""Steady-state experiment: does ||g||/||x|| of a normalized layer settle at sqrt(2 lambda / gamma_t)?

An MLP whose hidden weights are each followed by a LayerNorm without affine (so the loss is invariant to the
scale of each weight and <x, g> = 0 exactly, up to the norm's eps) learns a noisy synthetic teacher from fresh
mini-batches, so the gradient noise never dies out. SGD with decoupled decay x <- (1 - lambda_t gamma_t) x - gamma_t g
runs a constant-lr stretch, then decays gamma_t to ~0. The same run is repeated with SGDC (lambda_t = lambda
gamma_t / gamma_max). The measured ratio over the late constant stretch is sqrt(sum ||g||^2 / sum ||x||^2): the norm
recurrence ||x'||^2 = (1 - lambda gamma)^2 ||x||^2 + gamma^2 ||g||^2 is linear in the squares, so that is the
quantity the theory pins, whatever the per-step noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from megatron_adamc.core.decay import corrected_weight_decay
from megatron_adamc.core.theory import equilibrium_steps, sgd_grad_weight_ratio
from megatron_adamc.experiments._figure import save_figure

HEADLINE_KEYS = ("measured_over_predicted", "grad_norm_rise")  # what the CLI prints after a run


class Config(BaseModel):
    """Defaults: lambda*gamma = 5e-3, so equilibrium (~1/(2 lambda gamma) = 100 steps) is reached 15x over."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.1, gt=0, description="gamma_max, the constant-stretch learning rate")
    weight_decay: float = Field(0.05, gt=0, description="lambda")
    steps_constant: int = Field(3000, gt=0)
    steps_decay: int = Field(3000, gt=0)
    decay_shape: Literal["linear", "cosine"] = "linear"
    measure_fraction: float = Field(0.5, gt=0, le=1, description="late share of the constant stretch measured")
    rise_fraction: float = Field(0.05, gt=0, lt=1, description="share of all steps at the end used for the rise")
    batch_size: int = Field(64, gt=0)
    input_dim: int = Field(32, gt=0)
    width: int = Field(128, gt=1)
    depth: int = Field(3, gt=0, description="number of Linear -> LayerNorm -> ReLU blocks")
    classes: int = Field(10, gt=1)
    teacher_temperature: float = Field(0.1, gt=0, description="labels ~ softmax(teacher / T): learnable, but noisy")
    norm_eps: float = Field(1e-8, gt=0)
    seed: int = 0


def lr_at(cfg: Config, step: int) -> float:
    """Constant gamma_max, then linear or cosine decay that reaches gamma_max / steps_decay on the last step."""
    if step < cfg.steps_constant:
        return cfg.lr
    progress = (step - cfg.steps_constant) / cfg.steps_decay
    if cfg.decay_shape == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class NormalizedMLP(torch.nn.Module):
    """Linear(no bias) -> LayerNorm(no affine) -> ReLU blocks: each hidden weight is scale-invariant."""

    def __init__(self, cfg: Config):
        super().__init__()
        dims = [cfg.input_dim] + [cfg.width] * (cfg.depth - 1)
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(d, cfg.width, bias=False) for d in dims)
        self.head = torch.nn.Linear(cfg.width, cfg.classes)
        self.eps = cfg.norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(F.layer_norm(layer(x), (layer.out_features,), eps=self.eps))
        return self.head(x)


def train(cfg: Config, corrected: bool, desc: str) -> dict[str, torch.Tensor]:
    """One run; returns per-step lr, loss and per-hidden-layer ||g||, ||x|| (before the step) and cos(x, g)."""
    torch.manual_seed(cfg.seed)
    teacher = torch.nn.Sequential(
        torch.nn.Linear(cfg.input_dim, cfg.width), torch.nn.Tanh(), torch.nn.Linear(cfg.width, cfg.classes)
    )
    model = NormalizedMLP(cfg)
    data = torch.Generator().manual_seed(cfg.seed + 1)  # same batches for SGD and SGDC
    steps = cfg.steps_constant + cfg.steps_decay
    rec = {k: torch.zeros(steps, cfg.depth) for k in ("grad_norm", "weight_norm", "cos")}
    rec["lr"], rec["loss"] = torch.zeros(steps), torch.zeros(steps)
    for step in tqdm(range(steps), desc=desc, mininterval=2.0):
        inputs = torch.randn(cfg.batch_size, cfg.input_dim, generator=data)
        with torch.no_grad():
            probs = F.softmax(teacher(inputs) / cfg.teacher_temperature, dim=-1)
        labels = torch.multinomial(probs, 1, generator=data).squeeze(1)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), labels)
        loss.backward()
        lr = lr_at(cfg, step)
        wd = corrected_weight_decay(cfg.weight_decay, lr, cfg.lr) if corrected else cfg.weight_decay
        with torch.no_grad():
            for i, layer in enumerate(model.hidden):
                x, g = layer.weight, layer.weight.grad
                rec["grad_norm"][step, i], rec["weight_norm"][step, i] = g.norm(), x.norm()
                rec["cos"][step, i] = (x * g).sum() / (x.norm() * g.norm() + 1e-30)
            for p in model.parameters():  # decoupled decay: x <- (1 - lambda_t gamma_t) x - gamma_t g
                p.mul_(1.0 - wd * lr).add_(p.grad, alpha=-lr)
        rec["lr"][step], rec["loss"][step] = lr, loss.detach()
    return rec


def per_layer(values: torch.Tensor) -> dict[str, float]:
    return {f"layer{i}": float(v) for i, v in enumerate(values)}


def rms_ratio(rec: dict[str, torch.Tensor], steps: slice) -> torch.Tensor:
    """sqrt(sum ||g||^2 / sum ||x||^2) per layer: the quantity the (linear in squares) norm recurrence pins."""
    return (rec["grad_norm"][steps].pow(2).mean(0) / rec["weight_norm"][steps].pow(2).mean(0)).sqrt()


def predicted_grad_norms(cfg: Config, corrected: bool) -> torch.Tensor:
    """||g_t|| from the norm recurrence alone, if ||g|| ||x|| (the gradient at unit weight norm) stayed constant.

    Starts at the constant-lr fixed point, iterates ||x||^2 <- (1 - lambda_t gamma_t)^2 ||x||^2 + gamma_t^2 / ||x||^2:
    so it includes the lag of the norm behind the schedule late in the decay, which sqrt(2 lambda / gamma_t) omits.
    """
    lam = cfg.weight_decay
    x2 = cfg.lr / math.sqrt(2 * lam * cfg.lr - (lam * cfg.lr) ** 2)
    grads = []
    for step in range(cfg.steps_constant + cfg.steps_decay):
        lr = lr_at(cfg, step)
        wd = corrected_weight_decay(lam, lr, cfg.lr) if corrected else lam
        grads.append(1.0 / math.sqrt(x2))
        x2 = (1 - wd * lr) ** 2 * x2 + lr**2 / x2
    return torch.tensor(grads)


def windows(cfg: Config) -> tuple[slice, slice]:
    """The late constant stretch (measured against the theory) and the last steps (for the rise of ||g||)."""
    steps = cfg.steps_constant + cfg.steps_decay
    window = slice(cfg.steps_constant - max(1, int(cfg.measure_fraction * cfg.steps_constant)), cfg.steps_constant)
    return window, slice(steps - max(1, int(cfg.rise_fraction * steps)), steps)


def summarize(cfg: Config, runs: dict[str, dict[str, torch.Tensor]]) -> dict:
    """The numbers of results.json: measured/predicted per layer, and the ||g|| rise over the decay."""
    steps = cfg.steps_constant + cfg.steps_decay
    window, tail = windows(cfg)
    predicted = sgd_grad_weight_ratio(cfg.weight_decay, cfg.lr)  # SGD and SGDC agree on the constant stretch
    sgd, sgdc = runs["sgd"], runs["sgdc"]
    out = {
        "measured_over_predicted": per_layer(rms_ratio(sgd, window) / predicted),
        "mean_step_ratio_over_predicted": per_layer(
            (sgd["grad_norm"] / sgd["weight_norm"])[window].mean(0) / predicted
        ),
        "sgdc_decay_measured_over_predicted": per_layer(rms_ratio(sgdc, slice(cfg.steps_constant, steps)) / predicted),
        "predicted_ratio_constant": predicted,
        "max_abs_cos_x_g": float(max(rec["cos"].abs().max() for rec in runs.values())),
        "measure_window_steps": [window.start, window.stop],
        "rise_window_steps": [tail.start, tail.stop],
        "grad_norm_rise": {},
        "grad_norm_rise_predicted": {},
        "ratio_end_over_predicted": {},
        "final_loss": {},
    }
    for name, rec in runs.items():
        total = rec["grad_norm"].pow(2).sum(1).sqrt()  # all normalized layers together
        rise = per_layer(rec["grad_norm"][tail].mean(0) / rec["grad_norm"][window].mean(0))
        out["grad_norm_rise"][name] = {**rise, "all_normalized": float(total[tail].mean() / total[window].mean())}
        theory = predicted_grad_norms(cfg, corrected=name == "sgdc")
        out["grad_norm_rise_predicted"][name] = float(theory[tail].mean() / theory[window].mean())
        lr_max = cfg.lr if name == "sgdc" else None
        pred = torch.tensor([sgd_grad_weight_ratio(cfg.weight_decay, float(lr), lr_max) for lr in rec["lr"][tail]])
        ratio = rec["grad_norm"][tail] / rec["weight_norm"][tail]
        out["ratio_end_over_predicted"][name] = per_layer((ratio / pred[:, None]).mean(0))
        out["final_loss"][name] = float(rec["loss"][tail].mean())
    rises = out["grad_norm_rise"]
    out["sgd_rise_over_sgdc_rise"] = rises["sgd"]["all_normalized"] / rises["sgdc"]["all_normalized"]
    return out


def smooth(y: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average along steps (per column), so per-step mini-batch noise does not hide the trend."""
    width = max(1, min(width, y.shape[0]))
    kernel = torch.ones(1, 1, width) / width
    cols = y.T.unsqueeze(1)
    return F.conv1d(F.pad(cols, (width - 1, 0), mode="replicate"), kernel).squeeze(1).T


def plot(cfg: Config, runs: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Row 1: ||g||/||x|| per layer against sqrt(2 lambda_t / gamma_t); row 2: ||g|| against the norm recurrence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = torch.arange(cfg.steps_constant + cfg.steps_decay)
    width = max(1, (cfg.steps_constant + cfg.steps_decay) // 200)
    fig, axes = plt.subplots(2, cfg.depth, figsize=(4.2 * cfg.depth, 7), sharex=True, squeeze=False)
    colors = {"sgd": "tab:red", "sgdc": "tab:blue"}
    theory_colors = {"sgd": "darkred", "sgdc": "navy"}  # dashed, drawn on top: visible where they coincide
    for name, rec in runs.items():
        lr_max = cfg.lr if name == "sgdc" else None
        pred = [sgd_grad_weight_ratio(cfg.weight_decay, float(lr), lr_max) for lr in rec["lr"]]
        theory, window = predicted_grad_norms(cfg, corrected=name == "sgdc"), windows(cfg)[0]
        ratio, grad = smooth(rec["grad_norm"] / rec["weight_norm"], width), smooth(rec["grad_norm"], width)
        late = slice(window.start, None)  # the recurrence starts from the measured equilibrium
        measured = dict(color=colors[name], lw=1.2, label=f"{name.upper()} measured")
        dashed = dict(color=theory_colors[name], ls="--", lw=1, zorder=3)
        for i in range(cfg.depth):
            scale = rec["grad_norm"][window, i].mean() / theory[window].mean()  # c = ||g|| ||x|| from the window
            axes[0, i].plot(steps, ratio[:, i], **measured)
            axes[0, i].plot(steps, pred, **dashed, label=f"{name.upper()} sqrt(2 lambda_t/gamma_t)")
            axes[1, i].plot(steps, grad[:, i], **measured)
            axes[1, i].plot(steps[late], (theory * scale)[late], **dashed, label=f"{name.upper()} recurrence")
    for i in range(cfg.depth):
        axes[0, i].set(title=f"hidden layer {i}: ||g||/||x||", yscale="log")
        axes[0, i].sharey(axes[0, 0])
        axes[1, i].set(title=f"hidden layer {i}: ||g||", xlabel="step")
        for ax in axes[:, i]:
            ax.axvspan(cfg.steps_constant, cfg.steps_constant + cfg.steps_decay, color="0.92", zorder=0)
            ax.grid(alpha=0.3)
    for ax in axes[0]:  # the SGD prediction diverges as gamma_t -> 0; keep the measured curves readable
        ax.set_ylim(top=5 * sgd_grad_weight_ratio(cfg.weight_decay, cfg.lr))
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=8)
    save_figure(
        fig,
        path,
        f"SGD vs SGDC, lambda={cfg.weight_decay} gamma_max={cfg.lr} ({cfg.decay_shape} decay shaded; "
        f"moving average over {width} steps)",
    )


def run(cfg: Config, output_dir: Path) -> dict:
    """Train SGD and SGDC, write results.json and steady_state.png under output_dir; return the results."""
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    try:
        runs = {name: train(cfg, name == "sgdc", desc=name.upper()) for name in ("sgd", "sgdc")}
    finally:
        torch.set_num_threads(threads)
    results = summarize(cfg, runs)
    results["config"] = cfg.model_dump()
    results["config"]["lambda_gamma"] = cfg.weight_decay * cfg.lr
    results["config"]["lambda_gamma_steps_constant"] = cfg.weight_decay * cfg.lr * cfg.steps_constant
    results["config"]["lambda_gamma_steps"] = cfg.weight_decay * cfg.lr * (cfg.steps_constant + cfg.steps_decay)
    results["config"]["equilibrium_steps"] = equilibrium_steps(cfg.weight_decay, cfg.lr)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(cfg, runs, output_dir / "steady_state.png")
    return results
