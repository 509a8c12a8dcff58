"""Every number the results docs quote is read from its results JSON here: the tables are generated from the JSON
(``python tests/test_results_docs.py`` prints them) and each figure quoted in the prose is formatted from the JSON
and looked up verbatim (whitespace aside), so text and data cannot drift apart. Reads files only: no run, ~1 s.

Negative numbers are written with a minus sign (U+2212), as the docs do.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # make test-fast

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t(0.975, df)


@cache
def load(name: str) -> dict:
    return json.loads((DOCS / "results" / f"{name}.json").read_text())


def num(x: float, digits: int, plus: bool = False) -> str:
    """Fixed-point with a real minus sign (and an explicit + when asked)."""
    text = f"{x:+.{digits}f}" if plus else f"{x:.{digits}f}"
    return text.replace("-", "−")


def pm(stat: dict, digits: int, plus: bool = False) -> str:
    """mean ± std (sample std over seeds), as the older results state their spread."""
    return f"{num(stat['mean'], digits, plus)} ± {num(stat['std'], digits)}"


def interval(stat: dict, digits: int) -> str:
    """The two-sided 95% Student-t interval of a mean from its mean, std and n: ``[lo, hi]``."""
    half = T975[stat["n"] - 1] * stat["std"] / math.sqrt(stat["n"])
    return f"[{num(stat['mean'] - half, digits)}, {num(stat['mean'] + half, digits)}]"


def g3(x: float) -> str:
    """3 significant digits; large values in e-notation (the max attention logits)."""
    return f"{x:.1e}" if abs(x) >= 1e4 else f"{x:.3g}"


# ---------------------------------------------------------------------------------------------------- stability

VARIANT_NAMES = {
    "baseline": "baseline",
    "qk_norm": "QK-norm",
    "qk_norm_cap": "QK-norm + cap 20 (method 3)",
    "qkv_norm": "QKV-norm, no pre-norm (method 2)",
    "qk_proj_fc2_norm": "QK + Proj + FC2 norms (method 1)",
    "scaled_embed": "scaled embed + sqrt(2/(5d)) init",
}


def _stab_run(variant: str, width: int, lr: float, seed: int) -> dict:
    key = (variant, width, lr, seed)
    return next(r for r in load("stability")["runs"] if (r["variant"], r["width"], r["lr"], r["seed"]) == key)


def _stable(value: float | None, top: float) -> str:
    return f"≥{top:g}" if value == top else f"{value:g}"


def _lr_mean(variant: str, width: int, lr: float) -> float:
    runs = [r for r in load("stability")["runs"] if (r["variant"], r["width"], r["lr"]) == (variant, width, lr)]
    return sum(r["final_val_loss"] for r in runs) / len(runs)


def stability_table() -> list[str]:
    res = load("stability")
    top = max(res["config"]["lrs"])
    rows = []
    for variant, label in VARIANT_NAMES.items():
        for width in res["config"]["widths"]:
            cell = res["cells"][f"{variant}@d{width}"]
            stable = " / ".join(_stable(v, top) for v in cell["max_stable_lr"]["per_seed"])
            ratio = res["lr_ratio_over_qk_norm"].get(f"{variant}@d{width}")
            over = "1" if variant == "qk_norm" else " / ".join(f"{v:.2f}" for v in ratio["per_seed"])
            best = cell["best_loss"]
            logits = [_stab_run(variant, width, lr, 0)["activations"]["max_attn_logit"]["max"] for lr in (0.016, 0.512)]
            rows.append(
                f"| {label} | {width} | {stable} | {over} | {pm(cell['lr_sensitivity'], 2)} | "
                f"{best['loss']:.2f} ({best['lr']:g}) | {pm(cell['loss_at_common_lr'], 2)} | "
                f"{g3(logits[0])} / {g3(logits[1])} |"
            )
    return rows


def _flagged_at_l0_excess() -> float:
    """How much higher the sensitivity of a cell would be if every flagged run counted at L0 (the largest)."""
    res = load("stability")
    excess = []
    for cell in res["cells"].values():
        per_seed = []
        for seed, stats in cell["per_seed"].items():
            ladder = [
                r
                for r in res["runs"]
                if (r["variant"], r["width"], r["seed"]) == (cell["variant"], cell["width"], int(seed))
            ]
            l0 = stats["initial_loss"]
            losses = [l0 if r["diverged"] else min(r["final_val_loss"], l0) for r in ladder]
            per_seed.append(sum(losses) / len(losses) - min(losses))
        excess.append(sum(per_seed) / len(per_seed) - cell["lr_sensitivity"]["mean"])
    return max(excess)


def _range(values: list[float], digits: int) -> str:
    lo, hi = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return lo if lo == hi else f"{lo}-{hi}"


def stability_quotes() -> list[str]:
    res = load("stability")
    cells, runs = res["cells"], res["runs"]
    l0 = [s["initial_loss"] for c in cells.values() for s in c["per_seed"].values()]
    sens = {k: num(c["lr_sensitivity"]["mean"], 2) for k, c in cells.items()}
    best = lambda key: f"{cells[key]['best_loss']['loss']:.2f}"  # noqa: E731
    common = ("qk_norm@d64", "baseline@d64", "qk_norm@d128", "baseline@d128")
    logit = lambda v, w, lr: _stab_run(v, w, lr, 0)["activations"]["max_attn_logit"]["max"]  # noqa: E731
    spread = {k: num(c["lr_sensitivity"]["std"], 2) for k, c in cells.items()}
    act = cells["baseline@d128"]["activations_at_common_lr"]["mlp.fc2"]
    steps = [c["max_stable_lr"]["spread_sqrt2_steps"] for c in cells.values()]
    cap = next(r for r in runs if r["name"] == "qk_norm_cap-d128-lr0.128-seed0")
    at = lambda v, w, lr: [r["final_val_loss"] for r in runs if (r["variant"], r["width"], r["lr"]) == (v, w, lr)]
    others = [x for v in VARIANT_NAMES if v != "qk_proj_fc2_norm" for w in (64, 128) for x in at(v, w, 0.512)]
    method1 = [x for w in (64, 128) for x in at("qk_proj_fc2_norm", w, 0.512)]
    qkv_worse = all(
        cells[f"qkv_norm@d{w}"]["per_seed"][s]["best_loss"] > cells[f"qk_norm@d{w}"]["per_seed"][s]["best_loss"]
        for w in (64, 128)
        for s in ("0", "1")
    )
    assert qkv_worse and not any(r.get("stopped_at_step") for r in runs)  # "worse on all four"; "no run overflowed"
    return [
        f"{sum(r['skipped'] for r in runs)} of {len(runs)} runs were skipped",
        f"L0 ({_range(l0, 2)} across the cells:",
        f"training tokens ({res['divergence_loss']:.3f} nats)",
        f"would raise the values by up to {_flagged_at_l0_excess():.2f}",
        f"{_lr_mean('baseline', 64, 0.004):.2f} at lr 0.004, {_lr_mean('baseline', 64, 0.032):.2f} at 0.032, "
        f"{_lr_mean('baseline', 64, 0.0905):.2f} at 0.0905",
        f"against {_range([s['initial_loss'] for s in cells['baseline@d64']['per_seed'].values()], 2)} at "
        f"initialization and a unigram level of {res['divergence_loss']:.2f}",
        f"by one step in {sum(0.9 < x < 1.1 for x in steps)} of {len(steps)} cells, by two\nin "
        f"{['one', 'two'][sum(1.9 < x < 2.1 for x in steps) - 1]}, by four in one",
        f"({sens['baseline@d64']} → {sens['qk_norm@d64']} at d 64, {sens['baseline@d128']} → {sens['qk_norm@d128']} "
        "at d 128)",
        f"(baseline d 64: {g3(logit('baseline', 64, 0.016))} at lr 0.016, {g3(logit('baseline', 64, 0.512))} at 0.512; "
        f"d 128: {g3(logit('baseline', 128, 0.016))} and {g3(logit('baseline', 128, 0.512))})",
        f"QK-norm holds it at {_range([logit('qk_norm', w, 0.016) for w in (64, 128)], 2)} at 0.016 and "
        f"{_range([logit('qk_norm', w, 0.512) for w in (64, 128)], 0)} at 0.512",
        "({} vs {}, {} vs {})".format(*(f"{cells[k]['loss_at_common_lr']['mean']:.2f}" for k in common)),
        f"(sensitivity {sens['baseline@d64']} and {sens['baseline@d128']}",
        f"geometric mean {cells['baseline@d64']['max_stable_lr']['geomean']:.2f} and "
        f"{cells['baseline@d128']['max_stable_lr']['geomean']:.2f} at d 64 and",
        f"(± {spread['baseline@d64']} and ± {spread['baseline@d128']})",
        f"FC2 from {act['first']:.1f} to {act['last']:.0f}",
        f"hold FC2 at {cells['qk_proj_fc2_norm@d128']['activations_at_common_lr']['mlp.fc2']['last']:.0f}",
        f"raw QKV output grow to {cells['qkv_norm@d128']['activations_at_common_lr']['attn.qkv']['last']:.0f}",
        f"{sens['qk_proj_fc2_norm@d64']} at d 64, the same as QK-norm ({sens['qk_norm@d64']}), the cap "
        f"({sens['qk_norm_cap@d64']}) and\n  QKV-norm ({sens['qkv_norm@d64']})",
        f"lowest only at d 128 ({sens['qk_proj_fc2_norm@d128']})",
        f"({_range(method1, 1)} at lr 0.512 vs {_range(others, 1)})",
        f"best {best('qk_proj_fc2_norm@d64')} at d 64, {best('qk_proj_fc2_norm@d128')} at d 128 against the "
        f"baseline's {best('baseline@d64')}/{best('baseline@d128')}",
        f"QK-norm's ({sens['qkv_norm@d64']}/{sens['qkv_norm@d128']})",
        f"({best('qkv_norm@d64')} at d 64, {best('qkv_norm@d128')} at d 128 for the seed mean)",
        f"ended {cap['final_train_loss'] - res['divergence_loss']:.2f} nats above the unigram level",
        f"({best('scaled_embed@d64')} at d 64, {best('scaled_embed@d128')} at d 128 vs "
        f"{best('baseline@d64')}/{best('baseline@d128')})",
        f"sensitivity ({sens['scaled_embed@d64']}/{sens['scaled_embed@d128']})",
        f"to {_range(at('scaled_embed', 64, 0.181), 1)} at lr 0.181 (d 64) and "
        f"{_range(at('scaled_embed', 128, 0.064), 1)} at lr 0.064 (d 128)",
        f"{math.sqrt(2 / 320):.3f} at d 64 and {math.sqrt(2 / 640):.3f} at d 128",
    ]


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
        f"The loss is {_range([r['final_loss']['sgd'] - r['final_loss']['sgdc'] for r in (lin, cos)], 2)} lower with "
        "SGDC",
    ]


# ------------------------------------------------------------------------------------------------ adamc_vs_adamw

TYPE_NAMES = {"linear": "block linears", "embedding": "embedding", "output": "output head"}
MATRICES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _avw_runs(**match) -> list[dict]:
    return [r for r in load("adamc_vs_adamw")["runs"] if all(r[k] == v for k, v in match.items())]


def avw_sweep_table() -> list[str]:
    res = load("adamc_vs_adamw")
    sweep, best, none = res["sweep"], res["best"], res["no_decay"]
    rows = [f"| 0 (no decay) | 0 | {none['final_val_loss']:.4f} | {none['grad_norm_rise']:.3f} | (the same run) | |"]
    for wd in sweep["AdamW"]:
        cells = []
        for opt in ("AdamW", "AdamC"):
            point = sweep[opt][wd]
            loss = f"{point['final_val_loss']:.4f}"
            cells += [
                f"**{loss}**" if float(wd) == best[opt]["weight_decay"] else loss,
                f"{point['grad_norm_rise']:.3f}",
            ]
        rows.append(f"| {wd} | {sweep['AdamW'][wd]['lr_wd_steps']:g} | " + " | ".join(cells) + " |")
    return rows


def avw_best_table() -> list[str]:
    res = load("adamc_vs_adamw")
    rows = []
    for label, cell in (("AdamW at its best", res["best"]["AdamW"]), ("AdamC at its best", res["best"]["AdamC"]),
                        ("AdamW control (AdamC's integrated decay)", res["control"])):  # fmt: skip
        wd = cell["weight_decay"]
        decay = cell.get("integrated_decay", cell.get("control_integrated_decay"))["mean"]
        rows.append(
            f"| {label} | {wd:g} | {res['config']['lr'] * wd * res['config']['steps']:.2g} | {decay:.3f} | "
            f"{pm(cell['final_train_loss'], 3)} | {pm(cell['final_val_loss'], 3)} | {pm(cell['grad_norm_rise'], 3)} |"
        )
    return rows


def avw_mid_table() -> list[str]:
    res = load("adamc_vs_adamw")
    rows = []
    for opt in ("AdamW", "AdamC"):
        best = res["best"][opt]
        for form, label in (("adam", "Adam form (Defazio)"), ("kosson", "rotational (Kosson)")):
            types = best["steady_state_mid"][form]
            cells = " | ".join(pm(types[t], 2) for t in TYPE_NAMES)
            rows.append(f"| {opt} ({best['weight_decay']:g}, {best['lr_wd_steps']:g}) | {label} | {cells} |")
    return rows


def avw_long_table() -> list[str]:
    long = load("adamc_vs_adamw")["long"]
    rows = []
    for key, label in (("AdamW", "AdamW"), ("AdamC", "AdamC"), ("AdamW_control", "AdamW control")):
        c = long[key]
        rows.append(
            f"| {label} | {c['weight_decay']:g} | {c['lr_wd_steps']:.2g} | {c['integrated_decay']:.2f} | "
            f"{pm(c['grad_norm_mid'], 2)} | {pm(c['grad_norm_end'], 2)} | **{pm(c['grad_norm_rise'], 3)}** | "
            f"{pm(c['final_train_loss'], 3)} | {pm(c['final_val_loss'], 3)} |"
        )
    return rows


def _settled(name: str) -> dict[str, float]:
    return _avw_runs(name=name)[0]["steady_state"]["settled_per_parameter"]["kosson"]


def _span(values: list[float]) -> str:
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _geo(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def avw_forms_table() -> list[str]:
    """Per matrix: the constant-lr run (layers 0 / 1), the long AdamW and AdamC runs (range over seeds and layers),
    the sweep's lambda 3 runs (AdamW / AdamC, range over layers); then the per-type geometric means."""
    res = load("adamc_vs_adamw")
    names = res["adam_forms"]["runs"]
    groups = {
        "constant": [n for n in names if "constant" in n],
        "long AdamW": [n for n in names if n.startswith("adamw") and "long" in n],
        "long AdamC": [n for n in names if n.startswith("adamc") and "long" in n],
        "sweep": [n for n in names if n.endswith("wd3-seed0")],
    }
    rows = []
    for matrix in MATRICES:
        key = lambda layer, matrix=matrix: f"layers.{layer}.{matrix}.weight"  # noqa: E731
        const = _settled(groups["constant"][0])
        cells = [f"{const[key(0)]:.2f} / {const[key(1)]:.2f}"]
        for group in ("long AdamW", "long AdamC", "sweep"):
            cells.append(_span([_settled(n)[key(layer)] for n in groups[group] for layer in (0, 1)]))
        rows.append(f"| layers.0 / 1 {matrix} | " + " | ".join(cells) + " |")
    kinds = (
        ("block linears (geometric mean)", lambda n: any(m in n for m in MATRICES)),
        ("tok_embeddings", lambda n: n.startswith("tok_embeddings")),
        ("output head", lambda n: n.startswith("output")),
    )
    for label, pick in kinds:
        per_run = {n: _geo([v for p, v in _settled(n).items() if pick(p)]) for n in names}
        cells = [f"{per_run[groups['constant'][0]]:.2f}"]
        cells += [_span([per_run[n] for n in groups[g]]) for g in ("long AdamW", "long AdamC", "sweep")]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def _t(stat: dict, digits: int, plus: bool = True) -> str:
    """mean, 95% t-interval: ``−0.003 [−0.026, 0.020]``."""
    return f"{num(stat['mean'], digits, plus)} {interval(stat, digits)}"


def _seeds_where(delta_key: str, a: list[dict], b: list[dict], below: bool) -> int:
    pairs = {r["seed"]: r for r in b}
    return sum((r[delta_key] - pairs[r["seed"]][delta_key] < 0) == below for r in a if r["seed"] in pairs)


def avw_quotes() -> list[str]:
    res = load("adamc_vs_adamw")
    best, control, long = res["best"], res["control"], res["long"]
    at = res["adamc_minus_adamw_at_best"]
    ctrl = control["adamc_minus_control"]
    wins = lambda opt: [r for r in _avw_runs(optimizer=opt, weight_decay=best[opt]["weight_decay"], steps=1000)]
    higher = _seeds_where("grad_norm_rise", wins("AdamC"), wins("AdamW"), below=False)
    near = {opt: best[opt]["near_best_weight_decays"] for opt in ("AdamW", "AdamC")}
    forms = res["adam_forms"]["measured_over_predicted"]
    cos = [r["steady_state"]["cos_weight_grad_mid"]["linear"] for r in res["runs"]]
    settled = {
        r["name"]: r["steady_state"]["settled_steps"] for r in res["runs"] if r["name"] in res["adam_forms"]["runs"]
    }
    long_w = settled["adamw-wd0.3-seed0-long6667"]
    long_c = settled["adamc-wd0.3-seed0-long6667"]
    sweep3 = [s[0] for n, s in settled.items() if n.endswith("wd3-seed0")]
    long_w_minus, long_c_minus = long["adamc_minus_adamw"], long["adamc_minus_control"]
    return [
        f"measured afterwards from the runs' own logged λ_t: AdamC's {control['adamc_integrated_decay']:.4f}, the "
        f"control's {control['control_integrated_decay']['mean']:.4f})",
        f"AdamW every λ from {min(near['AdamW']):g} to {max(near['AdamW']):g} is within 2 standard deviations of its "
        f"best, for AdamC every λ from {min(near['AdamC']):g} to {max(near['AdamC']):g}",
        f"no decay at all is as good ({res['no_decay']['final_val_loss']:.4f})",
        f"at λ 3: {num(res['sweep']['AdamW']['3']['final_val_loss'] - res['no_decay']['final_val_loss'], 2, True)} vs "
        f"{num(res['sweep']['AdamC']['3']['final_val_loss'] - res['no_decay']['final_val_loss'], 2, True)})",
        f"AdamC − AdamW (each at its best) = **{_t(at['final_val_loss'], 3)}** in validation loss "
        f"({_t(at['final_train_loss'], 3)} train)",
        f"rise {_t(at['grad_norm_rise'], 3)}: higher on {higher} of {at['grad_norm_rise']['n']} seeds",
        f"AdamC − control (same integrated decay, different shape) = **{_t(ctrl['final_val_loss'], 3)}** validation, "
        f"{_t(ctrl['final_train_loss'], 3)} train, rise {_t(ctrl['grad_norm_rise'], 3)}",
        f"AdamC − AdamW: rise {_t(long_w_minus['grad_norm_rise'], 3)}, val {_t(long_w_minus['final_val_loss'], 3)}, "
        f"train {_t(long_w_minus['final_train_loss'], 3)}",
        f"AdamC − control (same integrated decay): rise **{_t(long_c_minus['grad_norm_rise'], 3)}**, val "
        f"{_t(long_c_minus['final_val_loss'], 3)}, train **{_t(long_c_minus['final_train_loss'], 3)}**",
        f"AdamW over {long_w[0] / long['steps']:.0%}-{long_w[1] / long['steps']:.0%} of the run and its AdamC runs "
        f"over {long_c[0] / long['steps']:.0%}-{long_c[1] / long['steps']:.0%}",
        f"from step {settled['adamw-wd1-seed0-constant2500'][0]} on",
        f"the sweep's λ 3 runs (from step {min(sweep3)}-{max(sweep3)} of 1000)",
        f"block linears {pm(forms['kosson']['linear'], 2)} of Kosson's line ({forms['adam']['linear']['mean']:.2f} of "
        f"Defazio's), embedding {pm(forms['kosson']['embedding'], 2)} ({forms['adam']['embedding']['mean']:.2f}), "
        f"output head {pm(forms['kosson']['output'], 2)} ({forms['adam']['output']['mean']:.2f})",
        f"cos(x, g) of the block\nlinears, mean over the 40-60% stretch, is between {num(min(cos), 3)} and "
        f"{num(max(cos), 3)} in every run",
        f"({long['AdamW']['grad_norm_rise']['mean']:.2f}x) and AdamC's much less "
        f"({long['AdamC']['grad_norm_rise']['mean']:.2f}x)",
        f"still rises {long['AdamW_control']['grad_norm_rise']['mean']:.2f}x",
        f"neither rises ({min(best[o]['grad_norm_rise']['mean'] for o in best):.2f}-"
        f"{max(best[o]['grad_norm_rise']['mean'] for o in best):.2f}, as without decay, "
        f"{res['no_decay']['grad_norm_rise']:.2f})",
    ]


# ------------------------------------------------------------------------------------------------ adamc_at_best

ARM_NAMES = {
    "adamw_best": "AdamW at its best λ",
    "adamc_best": "AdamC at its best λ",
    "control": "AdamW control (AdamC's integrated decay)",
    "no_decay": "no weight decay",
}


def _ci(stat: dict, digits: int, plus: bool = False) -> str:
    """mean [lo, hi] from a results file's own t-interval."""
    return f"{num(stat['mean'], digits, plus)} [{num(stat['lo'], digits)}, {num(stat['hi'], digits)}]"


def at_best_phase1_table() -> list[str]:
    res = load("adamc_at_best")
    means, best = res["phase1"]["means"], res["best"]
    rows = []
    for key in means["AdamW"]:
        cells = []
        for opt in ("AdamW", "AdamC"):
            cell = means[opt][key]
            mean = f"{cell['final_val_loss']['mean']:.4f}"
            chosen = best[opt]["weight_decay"] == cell["weight_decay"]
            seeds = " / ".join(f"{v:.4f}" for v in cell["per_seed"].values())
            cells += [f"{cell['weight_decay']:g}", f"**{mean}**" if chosen else mean, seeds]
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return rows


def at_best_arms_table() -> list[str]:
    res = load("adamc_at_best")
    rows = []
    for arm, label in ARM_NAMES.items():
        a = res["phase2"]["arms"][arm]
        rows.append(
            f"| {label} | {a['optimizer']} | {a['weight_decay']:g} | {a['lr_wd_steps']:.3g} | "
            f"{a['integrated_decay']['mean']:.3f} | {_ci(a['final_val_loss'], 4)} | {_ci(a['final_train_loss'], 4)} | "
            f"{_ci(a['grad_norm_rise'], 3)} | {a['clipped_fraction']['mean']:.3f} |"
        )
    return rows


def at_best_curve_table() -> list[str]:
    comp = load("adamc_at_best")["phase2"]["comparisons"]
    rows = []
    for w, c in zip(comp["adamc_minus_adamw"]["curve"], comp["adamc_minus_control"]["curve"], strict=True):
        rows.append(f"| {w['step']} | {_ci(w, 4, True)} | {_ci(c, 4, True)} |")
    return rows


def at_best_comparisons_table() -> list[str]:
    comp = load("adamc_at_best")["phase2"]["comparisons"]
    labels = {
        "adamc_minus_adamw": "AdamC − AdamW (each at its best)",
        "adamc_minus_control": "AdamC − control",
        "adamw_minus_no_decay": "AdamW at its best − no decay",
        "adamc_minus_no_decay": "AdamC at its best − no decay",
    }
    rows = []
    for key, label in labels.items():
        c = comp[key]
        rows.append(
            f"| {label} | {_ci(c['final_val_loss'], 4, True)} | {_ci(c['final_train_loss'], 4, True)} | "
            f"{_ci(c['grad_norm_rise'], 3, True)} | {c['fraction_below_zero']:.0%} / {c['fraction_above_zero']:.0%} |"
        )
    return rows


def at_best_layers_table() -> list[str]:
    """Per arm, mean over the held-out seeds and a type's parameters: ||x|| over the last 5%, ||g|| over the last 5%
    / over 40-60%, ||dx|| over 40-60%; every parameter's last tracked step is the run's last."""
    from megatron_adamc.core.theory import layer_type

    res = load("adamc_at_best")
    rows = []
    for arm, label in ARM_NAMES.items():
        runs = [r for r in res["phase2"]["runs"] if r["arm"] == arm]
        assert {layer["last_step"] for r in runs for layer in r["per_layer"].values()} == {res["config"]["steps"]}
        cells = []
        for kind in ("linear", "output"):
            layers = [v for r in runs for n, v in r["per_layer"].items() if layer_type(n) == kind]
            mean = lambda f, layers=layers: sum(map(f, layers)) / len(layers)  # noqa: E731
            cells += [
                f"{mean(lambda v: v['weight_norm']['end']):.2f}",
                f"{mean(lambda v: v['grad_norm']['end'] / v['grad_norm']['mid']):.3f}",
                f"{mean(lambda v: v['update_norm']['mid']):.4f}",
            ]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def at_best_quotes() -> list[str]:
    res = load("adamc_at_best")
    cfg, verdict = res["config"], res["verdict"]
    return [
        f"{cfg['num_params']:,} parameters",
        f"{cfg['tokens_per_param']:.1f} tokens per parameter",
        f"{cfg['epochs']:.2f} of one epoch",
        f"{cfg['train_tokens']:,} training tokens",
        f"{cfg['valid_tokens']:,} validation tokens",
        f"**Verdict: {verdict['outcome']}.**",
        f"below 0 at {verdict['fraction_below_zero']:.0%} of the {len(cfg['eval_steps'])} evaluations and above 0 at "
        f"{verdict['fraction_above_zero']:.0%}",
        f"the control's λ is {res['control']['weight_decay']:g}",
        f"{res['wall_time_s'] / 60:.0f} min",
        *_at_best_prose(res),
    ]


def _at_best_prose(res: dict) -> list[str]:
    """The prose figures of results_adamc_at_best.md beyond the tables."""
    means, best = res["phase1"]["means"], res["best"]
    zero = means["AdamW"]["0"]["final_val_loss"]["mean"]
    gain = {opt: zero - best[opt]["phase1_final_val_loss"]["mean"] for opt in best}
    top = max(means["AdamW"], key=float)
    hurt = {opt: means[opt][top]["final_val_loss"]["mean"] - zero for opt in means}
    comp = res["phase2"]["comparisons"]
    main, ctrl = comp["adamc_minus_adamw"], comp["adamc_minus_control"]
    curve = main["curve"]
    cross = next(i for i, p in enumerate(curve) if p["mean"] < 0)
    above = [p["step"] for p in curve if p["lo"] > 0]
    runs = res["phase2"]["runs"]
    spread = max(max(c["per_seed"].values()) - min(c["per_seed"].values()) for t in means.values() for c in t.values())
    grads = [r["grad_norm_mid"] for r in runs] + [r["grad_norm_end"] for r in runs]
    clipped = [a["clipped_fraction"]["mean"] for a in res["phase2"]["arms"].values()]
    return [
        f"by {gain['AdamW']:.3f} (AdamW) and {gain['AdamC']:.3f} (AdamC)",
        f"(at lr·λ·steps {top}: {num(hurt['AdamW'], 3, True)} vs {num(hurt['AdamC'], 3, True)} over λ 0)",
        f"(Σ_t lr_t λ_t {res['phase2']['arms']['control']['integrated_decay']['mean']:.3f}, as AdamC's)",
        f"({len(above)} evaluations between steps {min(above)} and {max(above)}: AdamC is *higher* early)",
        f"between steps {curve[cross - 1]['step']} and {curve[cross]['step']}",
        f"at the last step it is {_ci(main['final_val_loss'], 4)}",
        f"resolve a small AdamC advantage at the end: {_ci(main['final_train_loss'], 4)}",
        f"lower in validation ({_ci(ctrl['final_val_loss'], 4)};",
        f"and in train loss ({_ci(ctrl['final_train_loss'], 4)})",
        f"its gradient norm rises less ({_ci(ctrl['grad_norm_rise'], 3)})",
        f"AdamW's best − λ 0 = {_ci(comp['adamw_minus_no_decay']['final_val_loss'], 4, True)}",
        f"AdamC's best − λ 0 = {_ci(comp['adamc_minus_no_decay']['final_val_loss'], 4)}",
        f"lower than no decay ({_ci(comp['adamc_minus_no_decay']['final_train_loss'], 4)})",
        f"AdamW's is not resolvably ({_ci(comp['adamw_minus_no_decay']['final_train_loss'], 4)})",
        f"binds on {min(clipped) * 100:.1f}-{max(clipped):.1%} of steps",
        f"averages {min(grads):.2f}-{max(grads):.2f}",
        f"(two seeds, up to {spread:.3f})",
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


# ------------------------------------------------------------------------------------------------------- README


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def readme_quotes() -> list[str]:
    """The README quotes the results docs' own phrases (formatted from the same JSON), the timings of its two
    commands (timings.json) and the user-error probe's counts (user_errors_probe.json)."""
    at_best, avw, steady, adam, stability = (
        at_best_quotes(),
        avw_quotes(),
        steady_quotes(),
        adam_quotes(),
        stability_quotes(),
    )
    pick = lambda quotes, *starts: [next(q for q in quotes if q.startswith(s)) for s in starts]  # noqa: E731
    timings = load("timings")
    probe = load("user_errors_probe")["summary"]
    return [
        *pick(
            at_best,
            "**Verdict:",
            "at the last step it is",
            "below 0 at",
            "lower in validation",
            "12.1 tokens",
            "80 min",
        ),
        *pick(avw, "(1.34x)", "still rises"),
        *pick(steady, "within 0.4%"),
        *pick(adam, "at 0.93 of it", "the lr exponent is"),
        *pick(stability, "(baseline d 64:", "QK-norm holds it", "best 3.78"),
        f"**{_minutes(timings['make_train_fresh_s'])}** from nothing",
        f"~{timings['make_train_steps_per_s']} steps/s",
        f"`final train loss {timings['make_train_final_train_loss']:.4f} | validation loss "
        f"{timings['make_train_final_val_loss']:.4f}`",
        f"**{_minutes(timings['make_test_venv_s'])}** with the venv present ({timings['pytest_passed']} passed, "
        f"{timings['pytest_skipped']} skipped), **{_minutes(timings['make_test_fresh_s'])}** the first time",
        f"{timings['test_fast_passed']} tests): **{_minutes(timings['make_test_fast_s'])}**",
        f"{probe['one_line']} of {probe['cases']} bad inputs and faults",
    ]


# ------------------------------------------------------------------------------------------------ registry + test

TABLES: dict[str, list[Callable[[], list[str]]]] = {
    "results_stability.md": [stability_table],
    "results_adamc_vs_adamw.md": [avw_sweep_table, avw_best_table, avw_mid_table, avw_long_table, avw_forms_table],
    "results_steady_state.md": [steady_table],
    "results_adamc_at_best.md": [
        at_best_phase1_table,
        at_best_arms_table,
        at_best_comparisons_table,
        at_best_curve_table,
        at_best_layers_table,
    ],
}
QUOTES: dict[str, list[Callable[[], list[str]]]] = {
    "results_stability.md": [stability_quotes],
    "results_adamc_vs_adamw.md": [avw_quotes],
    "results_steady_state.md": [steady_quotes],
    "results_adamc_at_best.md": [at_best_quotes],
    "results_adam_steady_state.md": [adam_quotes],
    "tracking.md": [tracking_quotes],
    "README.md": [readme_quotes],
}


@pytest.mark.parametrize("doc", sorted(set(TABLES) | set(QUOTES)))
def test_every_quoted_number_is_its_json(doc):
    text = (REPO / doc if doc == "README.md" else DOCS / doc).read_text()
    lines = set(text.splitlines())
    flat = " ".join(text.split())  # prose is rewrapped freely: a quote may span lines
    missing = [row for make in TABLES.get(doc, []) for row in make() if row not in lines]
    missing += [quote for make in QUOTES.get(doc, []) for quote in make() if " ".join(quote.split()) not in flat]
    assert missing == [], f"{doc}: not in the text (regenerate with python {Path(__file__).name}):\n" + "\n".join(
        missing
    )


if __name__ == "__main__":
    for doc, makers in TABLES.items():
        if len(sys.argv) > 1 and doc not in sys.argv[1:]:
            continue
        print(f"## {doc}")
        for make in makers:
            print("\n".join(make()), end="\n\n")
