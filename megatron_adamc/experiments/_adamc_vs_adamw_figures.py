"""The two figures of ``adamc-vs-adamw``: the overview (sweep, best runs, control, long pair) and the Adam forms
(per-layer ||dx||/(lr ||x||) against Defazio's Adam form and Kosson's rotational equilibrium, by layer type)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_adamc.core.theory import layer_type  # noqa: E402
from megatron_adamc.experiments._figure import save_figure  # noqa: E402
from megatron_adamc.experiments._trainer_runs import series, smooth  # noqa: E402
from megatron_adamc.tracking.forms import resolvable  # noqa: E402

COLORS = {"AdamW": "tab:red", "AdamC": "tab:blue", "control": "tab:purple"}
TYPES = ("linear", "embedding", "output")
TYPE_TITLES = {"linear": "block linears (qkv, proj, fc1, fc2)", "embedding": "token embedding", "output": "output head"}


def _sweep_panel(ax: Any, results: dict[str, Any], key: str, ylabel: str) -> None:
    """Seed-0 sweep points joined per optimizer; mean +- std over seeds at each best lambda; the control."""
    for opt, points in results["sweep"].items():
        pts = sorted((float(wd), v[key]) for wd, v in points.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[opt], ms=4, lw=1, label=f"{opt} (seed 0)")
    for opt, best in results["best"].items():
        s = best[key]
        ax.errorbar(best["weight_decay"], s["mean"], yerr=s["std"], fmt="s", color=COLORS[opt], ms=8, mfc="none",
                    capsize=4, label=f"{opt} best, {s['n']} seeds")  # fmt: skip
    no_decay = results.get("no_decay")
    if no_decay:
        ax.axhline(no_decay[key], color="0.4", ls=":", lw=1.2, label="no weight decay (seed 0)")
    control = results.get("control") or {}
    if control:
        s = control[key]
        ax.errorbar(control["weight_decay"], s["mean"], yerr=s["std"], fmt="*", color=COLORS["control"], ms=11,
                    capsize=4, label=f"AdamW control (AdamC's decay), {s['n']} seeds")  # fmt: skip
    ax.set(xscale="log", xlabel="weight decay lambda", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _curves_panel(ax: Any, curves: dict, runs: list[dict], key: str, width: int, title: str) -> None:
    for r in runs:
        is_control = r["phase"] in ("control", "long_control")
        color = COLORS["control"] if is_control else COLORS[r["optimizer"]]
        steps, values = series(curves[r["name"]], key)
        if key == "grad_norm":
            values = smooth(values, width)
        label = None
        if r["seed"] == 0:
            what = "AdamW control" if is_control else r["optimizer"]
            label = f"{what} wd={r['weight_decay']:.3g} (lr*wd*steps {r['lr_wd_steps']:.3g})"
        style = "--" if is_control else "-"
        ax.plot(steps, values, style, color=color, lw=1, alpha=0.8, label=label)
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _at_best(run: dict[str, Any], best_wd: dict[str, float]) -> bool:
    return run["phase"] in ("sweep", "seed") and run["weight_decay"] == best_wd.get(run["optimizer"])


def plot_overview(cfg: Any, curves: dict, results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    _sweep_panel(axes[0, 0], results, "final_val_loss", "final validation loss")
    axes[0, 0].set_title(f"lambda sweep: final val loss ({cfg.steps} steps, lr*wd*steps {cfg.lr * cfg.steps:g} lambda)")
    _sweep_panel(axes[0, 1], results, "grad_norm_rise", "grad-norm rise (last 5% / 40-60%)")
    axes[0, 1].axhline(1.0, color="0.5", lw=0.8)
    axes[0, 1].set_title("lambda sweep: gradient-norm rise")
    runs = results["runs"]
    best_wd = {opt: best["weight_decay"] for opt, best in results["best"].items()}
    at_best = [r for r in runs if r["phase"] == "control" or _at_best(r, best_wd)]
    width = max(1, cfg.steps // 50)
    title = f"best lambdas: global grad norm (avg {width} steps)"
    _curves_panel(axes[0, 2], curves, at_best, "grad_norm", width, title)
    _curves_panel(axes[1, 0], curves, at_best, "tracking/weight_norm", width, "best lambdas: total weight norm ||x||")
    long = [r for r in runs if r["phase"] in ("long", "long_control")]
    if long:
        lwidth = max(1, long[0]["steps"] // 50)
        title = f"long trio: global grad norm (avg {lwidth} steps)"
        _curves_panel(axes[1, 1], curves, long, "grad_norm", lwidth, title)
        _curves_panel(axes[1, 2], curves, long, "tracking/weight_norm", lwidth, "long trio: total weight norm ||x||")
    else:
        axes[1, 1].axis("off")
        axes[1, 2].axis("off")
    for ax in (axes[0, 2], axes[1, 0]):
        for lo, hi, shade in ((*results["windows"]["mid"], "0.9"), (*results["windows"]["tail"], "0.8")):
            ax.axvspan(lo * cfg.steps, hi * cfg.steps, color=shade, zorder=0)
    save_figure(
        fig,
        path,
        f"AdamW vs AdamC, model={cfg.model}, lr={cfg.lr:g} cosine to 0, each at its best lambda; control (dashed): "
        "AdamW with AdamC's integrated decay (shaded: 40-60% and the last 5%, the rise's windows)",
    )


def plot_adam_forms(cfg: Any, curves: dict, results: dict[str, Any], path: Path) -> None:
    """Rows: the equilibrium run, the long pair (those that ran); columns: layer types. Thin lines: each parameter's
    measured ||dx||/(lr ||x||); dashed: Defazio's Adam form; dotted: Kosson's; shaded: the settled stretch."""
    rows = [r for r in results["runs"] if r["phase"] in ("equilibrium", "long") and r["seed"] == 0]
    if not rows:
        rows = [r for r in results["runs"] if r["phase"] == "sweep"][-2:]
    fig, axes = plt.subplots(len(rows), len(TYPES), figsize=(5.2 * len(TYPES), 3.3 * len(rows)), squeeze=False)
    for ax_row, r in zip(axes, rows, strict=True):
        records = resolvable(curves[r["name"]])
        names = sorted({k.split("/", 1)[1] for rec in records for k in rec if k.startswith("predicted_adam_ratio/")})
        for ax, kind in zip(ax_row, TYPES, strict=True):
            chosen = [n for n in names if layer_type(n) == kind]
            for i, name in enumerate(chosen):
                label = name.removesuffix(".weight").removeprefix("layers.") if kind == "linear" else "measured"
                ax.plot(*series(records, f"normalized_update_ratio/{name}"), "-", color=f"C{i % 10}", lw=0.9,
                        alpha=0.8, label=label)  # fmt: skip
            if chosen:
                predicted = series(records, f"predicted_adam_ratio/{chosen[0]}")[1]
                measured = [v for n in chosen for v in series(records, f"normalized_update_ratio/{n}")[1]]
                if predicted and measured:  # AdamW's line runs away as lr -> 0: keep the measured part readable
                    ax.set_ylim(0.7 * min(measured), max(3.0 * max(measured), 1.5 * min(predicted)))
                ax.plot(*series(records, f"predicted_adam_ratio/{chosen[0]}"), "--", color="k", lw=1.3,
                        label="Adam form (Defazio)")  # fmt: skip
                ax.plot(*series(records, f"predicted_kosson_ratio/{chosen[0]}"), ":", color="k", lw=1.6,
                        label="rotational eq. (Kosson)")  # fmt: skip
            settled = r["steady_state"]["settled_steps"]
            if settled:
                ax.axvspan(*settled, color="0.9", zorder=0, label="settled")
            what = "constant lr" if r["phase"] == "equilibrium" else "cosine"
            ax.set_title(f"{r['optimizer']} wd={r['weight_decay']:.3g} {what}, lr*wd*steps {r['lr_wd_steps']:.3g}\n"
                         f"{TYPE_TITLES[kind]} ({len(chosen)})", fontsize=9)  # fmt: skip
            ax.set(yscale="log", xlabel="step")
            ax.grid(alpha=0.3)
            if kind == "linear":
                ax.set_ylabel("||dx|| / (lr ||x||)")
                ax.legend(fontsize=6, ncol=3, loc="upper right")
            elif kind == "embedding":
                ax.legend(fontsize=7)
    save_figure(fig, path, "Which Adam form holds: per-layer normalized update against the two predictions")
