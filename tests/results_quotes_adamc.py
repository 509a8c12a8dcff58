"""docs/results_adamc_vs_adamw.md and docs/results_adamc_at_best.md: their tables and quoted figures, from their
results JSON."""

from __future__ import annotations

import math

from results_format import interval, load, num, pm

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
