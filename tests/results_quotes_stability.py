"""docs/results_stability.md's tables and quoted figures, from docs/results/stability.json."""

from __future__ import annotations

import math

from results_format import g3, load, num, num_range, pm

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
        f"L0 ({num_range(l0, 2)} across the cells:",
        f"training tokens ({res['divergence_loss']:.3f} nats)",
        f"would raise the values by up to {_flagged_at_l0_excess():.2f}",
        f"{_lr_mean('baseline', 64, 0.004):.2f} at lr 0.004, {_lr_mean('baseline', 64, 0.032):.2f} at 0.032, "
        f"{_lr_mean('baseline', 64, 0.0905):.2f} at 0.0905",
        f"against {num_range([s['initial_loss'] for s in cells['baseline@d64']['per_seed'].values()], 2)} at "
        f"initialization and a unigram level of {res['divergence_loss']:.2f}",
        f"by one step in {sum(0.9 < x < 1.1 for x in steps)} of {len(steps)} cells, by two\nin "
        f"{['one', 'two'][sum(1.9 < x < 2.1 for x in steps) - 1]}, by four in one",
        f"({sens['baseline@d64']} → {sens['qk_norm@d64']} at d 64, {sens['baseline@d128']} → {sens['qk_norm@d128']} "
        "at d 128)",
        f"(baseline d 64: {g3(logit('baseline', 64, 0.016))} at lr 0.016, {g3(logit('baseline', 64, 0.512))} at 0.512; "
        f"d 128: {g3(logit('baseline', 128, 0.016))} and {g3(logit('baseline', 128, 0.512))})",
        f"QK-norm holds it at {num_range([logit('qk_norm', w, 0.016) for w in (64, 128)], 2)} at 0.016 and "
        f"{num_range([logit('qk_norm', w, 0.512) for w in (64, 128)], 0)} at 0.512",
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
        f"({num_range(method1, 1)} at lr 0.512 vs {num_range(others, 1)})",
        f"best {best('qk_proj_fc2_norm@d64')} at d 64, {best('qk_proj_fc2_norm@d128')} at d 128 against the "
        f"baseline's {best('baseline@d64')}/{best('baseline@d128')}",
        f"QK-norm's ({sens['qkv_norm@d64']}/{sens['qkv_norm@d128']})",
        f"({best('qkv_norm@d64')} at d 64, {best('qkv_norm@d128')} at d 128 for the seed mean)",
        f"ended {cap['final_train_loss'] - res['divergence_loss']:.2f} nats above the unigram level",
        f"({best('scaled_embed@d64')} at d 64, {best('scaled_embed@d128')} at d 128 vs "
        f"{best('baseline@d64')}/{best('baseline@d128')})",
        f"sensitivity ({sens['scaled_embed@d64']}/{sens['scaled_embed@d128']})",
        f"to {num_range(at('scaled_embed', 64, 0.181), 1)} at lr 0.181 (d 64) and "
        f"{num_range(at('scaled_embed', 128, 0.064), 1)} at lr 0.064 (d 128)",
        f"{math.sqrt(2 / 320):.3f} at d 64 and {math.sqrt(2 / 640):.3f} at d 128",
    ]
