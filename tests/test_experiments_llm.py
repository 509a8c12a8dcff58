"""The LLM experiments end to end through the CLI, drastically shortened: a few steps, one seed, two lrs, two variants.

What is checked is what could silently be wrong: the rise in results.json is recomputed from metrics.jsonl, the
AdamW and AdamC runs differ only in the optimizer type, a deliberately huge lr is flagged as diverged, and bad
input is one line with exit code 2.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import SMALL_CORPUS_DIR

import megatron_adamc.cli as cli
from megatron_adamc.experiments import adamc_vs_adamw, stability

DATA = ["vocab_size=512", "max_bytes=400000", f"data_cache_dir={SMALL_CORPUS_DIR}", "seq_len=32", "micro_batch_size=4"]
AVW = DATA + ["steps=40", "warmup_steps=2", "seeds=1", "sweep_weight_decays=[]", "tracking_interval=4"]
AVW += ["eval_points=2", "eval_batches=2", "weight_decay=2.0", "lr=0.01"]
STAB = DATA + ["steps=60", "warmup_steps=2", "variants=[baseline,qk_norm]", "lrs=[0.01,30.0]", "common_lr=0.01"]
STAB += ["tracking_interval=4"]


def experiment(name: str, out, sets: list[str]) -> dict:
    argv = ["experiment", name, "--output-dir", str(out)] + [a for kv in sets for a in ("--set", kv)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "SUBCOMMANDS", ["experiment"])
        assert cli.main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def avw(tmp_path_factory):
    out = tmp_path_factory.mktemp("avw")
    return out, experiment("adamc-vs-adamw", out, AVW)


@pytest.fixture(scope="module")
def stab(tmp_path_factory):
    out = tmp_path_factory.mktemp("stab")
    return out, experiment("stability", out, STAB)


def test_adamc_vs_adamw_rise_matches_metrics(avw):
    out, results = avw
    assert (out / "adamc_vs_adamw.png").stat().st_size > 10_000
    assert {r["optimizer"] for r in results["runs"]} == {"AdamW", "AdamC"}
    for r in results["runs"]:
        records = [json.loads(line) for line in (out / "runs" / r["name"] / "metrics.jsonl").read_text().splitlines()]
        mid = [x["grad_norm"] for x in records if 16 < x["step"] <= 24]  # 40-60% of 40 steps
        end = [x["grad_norm"] for x in records if x["step"] > 38]  # last 5%
        assert r["grad_norm_rise"] == pytest.approx((sum(end) / len(end)) / (sum(mid) / len(mid)), rel=1e-9)
        assert r["lr_wd_steps"] == pytest.approx(0.01 * 2.0 * 40)
        assert math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < math.log(512)
        assert r["per_layer_grad_norm_rise"], "per-layer norms were tracked"
    entry = results["summary"]["wd=2"]
    assert entry["lr_wd_steps"] == pytest.approx(0.8)
    assert entry["AdamW"]["grad_norm_rise"]["n"] == 1 and entry["AdamC"]["grad_norm_rise"]["std"] == 0.0


def test_adamc_vs_adamw_runs_differ_only_in_the_optimizer(avw):
    out, results = avw
    sets = {
        r["optimizer"]: json.loads((out / "runs" / r["name"] / "overrides.json").read_text()) for r in results["runs"]
    }
    diff = set(sets["AdamW"]) ^ set(sets["AdamC"])
    assert diff == {"optimizer.type=AdamW", "optimizer.type=AdamC"}
    adamc = [json.loads(x) for x in (out / "runs" / "adamc-wd2-seed0" / "metrics.jsonl").read_text().splitlines()]
    adamw = [json.loads(x) for x in (out / "runs" / "adamw-wd2-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert adamw[-5]["weight_decay"] == pytest.approx(2.0)  # AdamW: constant lambda
    assert adamc[-5]["weight_decay"] < 0.1  # AdamC: lambda * lr_t / lr_max, near 0 at the end of the cosine


def test_stability_flags_the_huge_lr(stab):
    out, results = stab
    assert (out / "stability.png").stat().st_size > 10_000
    runs = {r["name"]: r for r in results["runs"]}
    assert set(runs) == {"baseline-lr0.01", "baseline-lr30", "qk_norm-lr0.01", "qk_norm-lr30"}
    for variant in ("baseline", "qk_norm"):
        assert not runs[f"{variant}-lr0.01"]["diverged"], runs[f"{variant}-lr0.01"]["reason"]
        assert runs[f"{variant}-lr30"]["diverged"]
        assert results["max_stable_lr"][variant] == 0.01
        assert results["first_diverged_lr"][variant] == 30.0
        assert results["loss_at_common_lr"][variant] == runs[f"{variant}-lr0.01"]["final_val_loss"]
        growth = runs[f"{variant}-lr0.01"]["activations"]
        assert set(growth) >= {"attn.qkv", "attn.proj", "mlp.fc2"}
        assert growth["mlp.fc2"]["growth"] == pytest.approx(growth["mlp.fc2"]["last"] / growth["mlp.fc2"]["first"])
        assert results["lr_sensitivity"][variant] > 0.1  # the diverged lr counts at the initial loss
    assert results["lr_ratio_over_qk_norm"] == {}  # neither capping nor QKV-norm was run
    assert 0 < results["divergence_loss"] < math.log(512)  # the unigram entropy is below the uniform one


def test_divergence_rule_on_synthetic_records():
    cfg = stability.Config(steps=10, warmup_steps=1, lrs=[0.1], common_lr=0.1)
    good = [{"step": s, "loss": 6.0 - 0.3 * s} for s in range(1, 11)]
    assert not stability.summarize_run(cfg, good, "baseline", 0.1, threshold=5.0)["diverged"]
    nan = good[:5] + [{"step": s, "loss": float("nan")} for s in range(6, 11)]
    assert "non-finite" in stability.summarize_run(cfg, nan, "baseline", 0.1, threshold=5.0)["reason"]
    flat = [{"step": s, "loss": 5.5} for s in range(1, 11)]
    assert "unigram" in stability.summarize_run(cfg, flat, "baseline", 0.1, threshold=5.0)["reason"]


@pytest.mark.parametrize(
    ("name", "sets", "message"),
    [
        ("adamc-vs-adamw", ["steps=100", "warmup_steps=50"], "warmup_steps=50"),
        ("stability", ["lrs=[0.01]", "common_lr=0.02"], "common_lr"),
        ("stability", ["variants=[nope]"], "variants"),
        ("adamc-vs-adamw", ["model=huge"], "model"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, name, sets, message):
    argv = ["experiment", name, "--output-dir", str(tmp_path)] + [a for kv in sets for a in ("--set", kv)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "SUBCOMMANDS", ["experiment"])
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_plans_are_what_the_docs_say():
    cfg = adamc_vs_adamw.Config()
    assert len(adamc_vs_adamw.plan(cfg)) == 2 * cfg.seeds + 2 * cfg.sweep_seeds * len(cfg.sweep_weight_decays)
    assert cfg.lr * cfg.weight_decay * cfg.steps == pytest.approx(6.0)
    assert set(stability.Config().variants) == set(stability.VARIANTS)
