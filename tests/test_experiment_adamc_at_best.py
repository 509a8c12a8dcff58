"""``adamc-at-best`` end to end through the CLI, drastically shortened (40 steps, lambda 0 and one grid value, one
phase-1 seed, two held-out seeds), with phase 1's choice forced onto the decayed value so that every phase-2 arm is
its own run; its decision rule and intervals on synthetic numbers; and the seed-independent validation windows.

Checked is what could silently be wrong: the curves, clipped shares and per-layer norms in results.json are the
metrics' own values through the last step, the control's lambda matches AdamC's integrated decay, the paired
intervals use Student's t, the rule's 80% threshold and its fall-backs, and that the whole-split validation windows
do not depend on the seed.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import SMALL_CORPUS_DIR

import megatron_adamc.cli as cli
from megatron_adamc.experiments import adamc_at_best
from megatron_adamc.experiments._paired import t_interval

SETS = ["vocab_size=512", "max_bytes=400000", f"data_cache_dir={SMALL_CORPUS_DIR}", "seq_len=32", "micro_batch_size=4"]
SETS += ["workers=2", "steps=40", "warmup_steps=2", "lr=0.01", "lr_wd_steps=[0,4]", "phase1_seeds=[0]"]
SETS += ["phase2_seeds=[1,2]", "eval_points=4", "tracking_interval=8", "train_curve_points=8"]


def experiment(out, sets: list[str]) -> int:
    argv = ["experiment", "adamc-at-best", "--output-dir", str(out)] + [a for kv in sets for a in ("--set", kv)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "SUBCOMMANDS", ["experiment"])
        return cli.main(argv)


def metrics(out, name: str) -> list[dict]:
    lines = (out / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "step" in row and "event" not in row]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("at_best")
    choose = adamc_at_best.choose_best

    def decayed(cfg, runs):  # phase 1 as it is, then both optimizers at the decayed grid value
        chosen = choose(cfg, runs)
        for best in chosen["best"].values():
            best.update(weight_decay=adamc_at_best.weight_decay(cfg, 4.0), lr_wd_steps=4.0)
        return chosen

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adamc_at_best, "choose_best", decayed)
        assert experiment(out, SETS) == 0
    return out, json.loads((out / "results.json").read_text())


def test_schema_runs_and_arms(results):
    out, res = results
    assert (out / "adamc_at_best.png").stat().st_size > 10_000
    cfg = res["config"]
    assert cfg["steps"] == 40 and cfg["lambdas"] == [0.0, 10.0] and cfg["epochs"] < 1
    assert cfg["tokens_per_param"] == pytest.approx(40 * 128 / cfg["num_params"])
    assert sorted(r["name"] for r in res["phase1"]["runs"]) == ["adamc-wd10-seed0", "adamw-wd10-seed0", "wd0-seed0"]
    assert {opt: b["weight_decay"] for opt, b in res["best"].items()} == {"AdamW": 10.0, "AdamC": 10.0}
    runs = res["phase2"]["runs"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted((a, s) for a in adamc_at_best.ARMS for s in (1, 2))
    assert len({r["name"] for r in runs}) == 8  # every arm its own runs
    for r in runs:
        assert {"optimizer", "weight_decay", "seed", "arm", "curve"} <= set(r)
        assert [p["step"] for p in r["curve"]] == [10, 20, 30, 40]
    verdict = res["verdict"]
    assert {"claim", "statistic", "interval", "rule", "outcome"} <= set(verdict)
    main = res["phase2"]["comparisons"]["adamc_minus_adamw"]
    assert verdict["outcome"] == adamc_at_best.decide(main, "AdamC", "AdamW")


def test_curves_clipping_and_layers_are_the_metrics_own(results):
    out, res = results
    for r in res["phase1"]["runs"] + res["phase2"]["runs"]:
        records = metrics(out, r["name"])
        assert [p["val_loss"] for p in r["curve"]] == [x["val_loss"] for x in records if "val_loss" in x]
        grads = [x["grad_norm"] for x in records]
        assert len(grads) == 40 and r["clipped_fraction"] == sum(g > 1.0 for g in grads) / 40
        first = [x["loss"] for x in records if x["step"] <= 5]
        assert r["train_curve"][0] == {"step": 5, "loss": pytest.approx(sum(first) / len(first))}
        assert r["tracked_last_step"] == 40
        assert r["per_layer"] and all(layer["last_step"] == 40 for layer in r["per_layer"].values())
        last = next(x for x in reversed(records) if "tracking/weight_norm" in x)
        for name, layer in r["per_layer"].items():
            assert layer["weight_norm"]["last"] == last[f"weight_norm/{name}"]


def test_control_matches_adamcs_integrated_decay(results):
    _, res = results
    arms = res["phase2"]["arms"]
    assert arms["control"]["weight_decay"] == res["control"]["weight_decay"] < arms["adamc_best"]["weight_decay"]
    decay = arms["adamc_best"]["integrated_decay"]["mean"]
    assert arms["control"]["integrated_decay"]["mean"] == pytest.approx(decay, rel=1e-3)


def test_paired_intervals_are_student_t(results):
    _, res = results
    runs = {(r["arm"], r["seed"]): r for r in res["phase2"]["runs"]}
    point = res["phase2"]["comparisons"]["adamc_minus_control"]["curve"][2]
    diffs = [runs["adamc_best", s]["curve"][2]["val_loss"] - runs["control", s]["curve"][2]["val_loss"] for s in (1, 2)]
    mean, sd = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / math.sqrt(2)
    assert point["mean"] == pytest.approx(mean) and point["hi"] - mean == pytest.approx(12.706 * sd / math.sqrt(2))
    three = t_interval([1.0, 2.0, 3.0])
    assert (three["mean"], three["std"], three["hi"]) == (2.0, 1.0, pytest.approx(2 + 4.303 / math.sqrt(3)))


def _diff(signs: list[int], final: int = 0, same: bool = False) -> dict:
    """A comparison whose per-evaluation intervals lie below (-1) / above (+1) / around (0) zero."""
    n = len(signs)
    bounds = {-1: (-2.0, -1.0), 1: (1.0, 2.0), 0: (-1.0, 1.0)}
    lo, hi = bounds[final]
    return {
        "fraction_below_zero": signs.count(-1) / n,
        "fraction_above_zero": signs.count(1) / n,
        "final_val_loss": {"lo": lo, "hi": hi},
        "same_runs": same,
    }


@pytest.mark.parametrize(
    ("signs", "final", "same", "outcome"),
    [
        ([-1] * 8 + [0] * 2, -1, False, "AdamC lower throughout training"),  # 80%: enough
        ([-1] * 7 + [0] * 3, -1, False, "AdamC lower at the end only, not throughout training"),
        ([1] * 9 + [0], 1, False, "AdamW lower throughout training"),
        ([0] * 6 + [1] * 4, 1, False, "AdamW lower at the end only, not throughout training"),
        ([-1] * 5 + [0] * 5, 0, False, "no difference resolvable (the final interval holds 0)"),
        ([0] * 10, 0, True, "weight decay does not help at this scale: both arms are the runs without weight decay"),
    ],
)
def test_the_rule(signs, final, same, outcome):
    assert adamc_at_best.decide(_diff(signs, final, same), "AdamC", "AdamW") == outcome


def test_whole_split_validation_windows_do_not_depend_on_the_seed():
    from megatron_adamc.data import build_gpt_datasets, prepare_default_data
    from megatron_adamc.train.evaluator import split_windows

    paths = prepare_default_data(str(SMALL_CORPUS_DIR), 512, 400_000, progress=False)
    windows = []
    for seed in (0, 7):
        _, valid = build_gpt_datasets(paths.train_prefix, paths.valid_prefix, 32, seed, 8, 8, paths.tokenizer_model)
        windows.append(split_windows(valid))
        assert valid[0]["tokens"].tolist() != windows[-1][0, :-1].tolist() or seed == 0  # the seed's own sample
    assert windows[0].shape == windows[1].shape and bool((windows[0] == windows[1]).all())
    tokens = sum(len(valid.dataset.get(int(d))) for d in valid.indices)
    assert windows[0].shape == ((tokens - 1) // 32, 33)
    assert bool((windows[0][1:, 0] == windows[0][:-1, -1]).all())  # consecutive windows share one token


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["lr_wd_steps=[1,2]"], "lr_wd_steps"),
        (["phase1_seeds=[0,1]", "phase2_seeds=[1,2]"], "phase2_seeds"),
        (["steps=100", "eval_points=30"], "eval_points"),
        (SETS[:5] + ["steps=100800"], "data would repeat"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, sets, message):
    assert experiment(tmp_path, sets) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
