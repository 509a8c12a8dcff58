"""docs/results_steady_state.md, docs/results_adam_steady_state.md and the results section of docs/tracking.md: their
tables and quoted figures, from their results JSON."""

from __future__ import annotations

import math

from results_format import load, num, num_range, pm
from results_quotes_adamc import _settled, _span

# ------------------------------------------------------------------------------------------------ steady state


def _layers(values: dict, digits: int) -> str:
    return " / ".join(f"{values[f'layer{i}']:.{digits}f}" for i in range(3))


def steady_table() -> list[str]:
    lin, cos = load("steady_state"), load("steady_state_cosine")

    def rise(r: dict, name: str) -> str:
        per = r["grad_norm_rise"][name]
        return f"**{per['all_normalized']:.3f}** ({_layers(per, 2)})"

    cells = {
        "SGD, constant stretch: measured / sqrt(2 lambda / gamma) (`measured_over_predicted`)":
            lambda r: _layers(r["measured_over_predicted"], 3),
        "same, but mean of the per-step ratio (lower: Jensen)":
            lambda r: _layers(r["mean_step_ratio_over_predicted"], 3),
        "SGDC, whole decay: measured / sqrt(2 lambda / gamma_max)":
            lambda r: _layers(r["sgdc_decay_measured_over_predicted"], 3),
        "SGD, last 5% of steps: measured / sqrt(2 lambda / gamma_t)":
            lambda r: _layers(r["ratio_end_over_predicted"]["sgd"], 2),
        "‖g‖ rise, SGD (last 5% of steps / steps 1500-3000), all normalized layers (per layer)":
            lambda r: rise(r, "sgd"),
        "‖g‖ rise, SGDC": lambda r: rise(r, "sgdc"),
        "‖g‖ rise from the norm recurrence (constant ‖g‖·‖x‖): SGD / SGDC":
            lambda r: f"{r['grad_norm_rise_predicted']['sgd']:.3f} / {r['grad_norm_rise_predicted']['sgdc']:.3f}",
        "SGD rise / SGDC rise": lambda r: f"{r['sgd_rise_over_sgdc_rise']:.2f}",
        "train loss, last 5% of steps: SGD / SGDC (one seed)":
            lambda r: f"{r['final_loss']['sgd']:.3f} / {r['final_loss']['sgdc']:.3f}",
    }  # fmt: skip
    return [f"| {label} | {cell(lin)} | {cell(cos)} |" for label, cell in cells.items()]


def steady_quotes() -> list[str]:
    lin, cos = load("steady_state"), load("steady_state_cosine")
    within = max(abs(v - 1) for v in lin["measured_over_predicted"].values())
    sgdc = max(abs(v - 1) for r in (lin, cos) for v in r["sgdc_decay_measured_over_predicted"].values())
    return [
        f"max |cos(x, g)| = {lin['max_abs_cos_x_g']:.1e}",
        f"within {math.ceil(within * 1000) / 10:.1f}%",
        f"within {math.ceil(sgdc * 1000) / 10:.1f}% through the whole decay",
        f"rises over the decay: {lin['grad_norm_rise']['sgd']['all_normalized']:.2f}x "
        f"({cos['grad_norm_rise']['sgd']['all_normalized']:.2f}x under the cosine)",
        f"The rise we measure ({lin['grad_norm_rise']['sgd']['all_normalized']:.3f}) matches the one the norm "
        f"recurrence predicts ({lin['grad_norm_rise_predicted']['sgd']:.3f})",
        f"SGDC's ||g|| still rises {(lin['grad_norm_rise']['sgdc']['all_normalized'] - 1) * 100:.0f}%",
        f"The loss is {num_range([r['final_loss']['sgd'] - r['final_loss']['sgdc'] for r in (lin, cos)], 2)} lower "
        "with SGDC",
    ]


# ------------------------------------------------------------------------------------------------ adam steady state

KINDS = {
    ("llama", "linear"): "micro Llama: block linears",
    ("llama", "embedding"): "micro Llama: embedding",
    ("llama", "output"): "micro Llama: output head",
    ("mlp", "normalized"): "normalized MLP: hidden layers",
}


def adam_constant_table() -> list[str]:
    """Per model and layer type: the measured C at each beta1 (both lrs: lr1 / lr2), the forms' predictions, which
    form fits, and the lr exponent's range over beta1."""
    res = load("adam_steady_state")
    rows = []
    for (model, kind), label in KINDS.items():
        cells = res["constants"][model][kind]
        per_beta = [" / ".join(f"{v:.3f}" for v in c["per_lr"].values()) for c in cells.values()]
        kosson = " / ".join(f"{c['kosson']:.3f}" for c in cells.values())
        fit = res["verdict"]["outcome"][model][kind]
        exps = fit["exponent_range"]
        rows.append(
            f"| {label} | " + " | ".join(per_beta) + f" | {kosson} | {', '.join(fit['fits'])} | "
            f"{num(exps[0], 2)} to {num(exps[1], 2)} |"
        )
    return rows


def adam_ratio_table() -> list[str]:
    """Per model and layer type and beta1: measured C over Kosson's prediction (mean over lrs and seeds)."""
    res = load("adam_steady_state")
    rows = []
    for (model, kind), label in KINDS.items():
        cells = res["constants"][model][kind]
        rows.append(f"| {label} | " + " | ".join(f"{c['over_kosson']:.2f}" for c in cells.values()) + " |")
    return rows


def _over_kosson(model: str, kind: str) -> str:
    cells = load("adam_steady_state")["constants"][model][kind]
    return " / ".join(f"{c['over_kosson']:.2f}" for c in cells.values())


def _exponents(model: str, kind: str) -> str:
    low, high = load("adam_steady_state")["verdict"]["outcome"][model][kind]["exponent_range"]
    return f"{num(low, 2)} to {num(high, 2)}"


def adam_quotes() -> list[str]:
    res = load("adam_steady_state")
    over, span = _over_kosson, _exponents
    head = [c["over_kosson"] for c in res["constants"]["llama"]["output"].values()]
    mlp = res["verdict"]["outcome"]["mlp"]["normalized"]
    assert mlp["fits"] == ["kosson"] and res["verdict"]["outcome"]["llama"]["linear"]["fits"] == ["neither"]
    return [
        f"at 0.93 of it at every β1 ({over('mlp', 'normalized')})",
        f"the lr exponent is {span('mlp', 'normalized')} (−1/2 predicted)",
        f"({over('llama', 'embedding')} of Kosson's, exponent {span('llama', 'embedding')})",
        f"({over('llama', 'linear')} at β1 0 / 0.5 / 0.9)",
        f"scales as lr^({span('llama', 'linear')}), not",
        f"({min(head):.2f}-{max(head):.2f} of Kosson's, exponent {span('llama', 'output')})",
    ]


KINDS_TRACKING = {
    ("mlp", "normalized"): "exactly normalized MLP layers",
    ("llama", "embedding"): "micro Llama token embedding",
    ("llama", "linear"): "micro Llama block linears",
    ("llama", "output"): "micro Llama output head",
}


def tracking_quotes() -> list[str]:
    """docs/tracking.md's results section: the settled Adam forms (adamc_vs_adamw.json, all 9 settled runs) and the
    beta1 / lr measurement (adam_steady_state.json)."""
    forms = load("adamc_vs_adamw")["adam_forms"]
    names = forms["runs"]
    per = lambda pick: [v for n in names for p, v in _settled(n).items() if pick(p)]  # noqa: E731
    means = forms["measured_over_predicted"]
    rows = [
        f"| block linears (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) | {pm(means['adam']['linear'], 2)} | "
        f"**{pm(means['kosson']['linear'], 2)}** | qkv {_span(per(lambda p: 'qkv' in p))}, proj "
        f"{_span(per(lambda p: 'proj' in p))}, fc1/fc2 {_span(per(lambda p: 'fc1' in p or 'fc2' in p))} |",
        f"| token embedding | {pm(means['adam']['embedding'], 2)} | {pm(means['kosson']['embedding'], 2)} | "
        f"{_span(per(lambda p: p.startswith('tok_embeddings')))} |",
        f"| output head | {pm(means['adam']['output'], 2)} | {pm(means['kosson']['output'], 2)} | "
        f"{_span(per(lambda p: p.startswith('output')))} |",
    ]
    adam = load("adam_steady_state")
    rows += [f"| {KINDS_TRACKING[key]} | {_over_kosson(*key)} | {_exponents(*key)} |" for key in KINDS_TRACKING]
    emb = [c["over_kosson"] for c in adam["constants"]["llama"]["embedding"].values()]
    return rows + [f"the embedding at {min(emb):.2f}-{max(emb):.2f}"]


# ------------------------------------------------------------------------------ tracking overhead (tracking.md)

OVERHEAD_MAIN = "8x256 fp32"


def _overhead_rows(key: str) -> dict[str, dict]:
    return {row["mode"]: row for row in load("tracking_overhead")["runs"][key]["rows"]}


def overhead_table() -> list[str]:
    """The main benchmark's table, as ``benchmarks/tracking_overhead.py`` prints it."""
    lines = [
        "| mode | step ms (median) | step ratio to off | tracker's own ms per step | tracker / off step |",
        "|---|---|---|---|---|",
    ]
    for mode, row in _overhead_rows(OVERHEAD_MAIN).items():
        lines.append(
            f"| {mode} | {row['step_ms']:.1f} | {row['step_ratio']:.4f} | {row['own_ms']:.2f} | {row['own_pct']:.2f}% |"
        )
    return lines


def overhead_sizes_table() -> list[str]:
    """One line per micro-batch and dtype the benchmark ran at."""
    runs = load("tracking_overhead")["runs"]
    lines = []
    for key, run in runs.items():
        rows = _overhead_rows(key)
        every, norms = rows["tracking every step"], rows["norms only (no activation hooks) every step"]
        full = run["safe_get_full_ms"]
        lines.append(
            f"| {key} | {rows['off']['step_ms']:.1f} | {every['own_ms']:.2f} ms = {every['own_pct']:.2f}% | "
            f"{rows['tracking every 10 steps']['own_pct']:.2f}% | {norms['own_ms']:.2f} ms = {norms['own_pct']:.2f}% | "
            f"{full / norms['own_ms']:.1f}x / {full / every['own_ms']:.1f}x |"
        )
    return lines


def overhead_quotes() -> list[str]:
    rows, run = _overhead_rows(OVERHEAD_MAIN), load("tracking_overhead")["runs"][OVERHEAD_MAIN]
    every, norms = rows["tracking every step"], rows["norms only (no activation hooks) every step"]
    full = run["safe_get_full_ms"]
    return [
        f"tracking every step: **{every['own_pct']:.2f}%, met**",
        f"every 10 steps: **{rows['tracking every 10 steps']['own_pct']:.2f}%, not met**",
        f"with the norms only (no activation hooks) {norms['own_pct']:.2f}% every step",
        f"costs {full:.1f} ms per step timed directly: **{full / norms['own_ms']:.1f}x** the tracker's "
        f"{norms['own_ms']:.2f} ms for the same per-layer norms, {full / every['own_ms']:.1f}x its "
        f"{every['own_ms']:.2f} ms with the activations",
        f"({rows['tracking+low precision every step']['own_pct']:.2f}% at every step here",
    ]
