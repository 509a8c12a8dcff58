"""The steady-state experiment reproduces ||g||/||x|| = sqrt(2 lambda / gamma) and the SGD-vs-SGDC gradient-norm rise.

Shortened run: lambda*gamma = 0.01 (equilibrium ~50 steps), 800 constant steps measured over the last 400. Telescoping
||x'||^2 = (1 - lambda gamma)^2 ||x||^2 + gamma^2 ||g||^2 over the window leaves only the drift of ||x||^2 between its
ends divided by 2 lambda gamma * 400 = 8, i.e. well under 1% for the observed fluctuations, so the issue's +-5% target
is a tolerance with margin, not a loose one.
"""

from __future__ import annotations

import json

import pytest

import megatron_adamc.cli as cli

SHORT = ["lr=0.1", "weight_decay=0.1", "steps_constant=800", "steps_decay=800"]


@pytest.fixture(autouse=True)
def only_experiment_cli(monkeypatch):
    """Test this sub-command alone, whatever state the other sub-command modules are in."""
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["experiment"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("steady")
    argv = ["experiment", "steady-state", "--output-dir", str(out)] + [a for kv in SHORT for a in ("--set", kv)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "SUBCOMMANDS", ["experiment"])
        assert cli.main(argv) == 0
    assert (out / "steady_state.png").stat().st_size > 10_000
    return json.loads((out / "results.json").read_text())


def test_constant_stretch_matches_theory(results):
    ratios = results["measured_over_predicted"]
    assert len(ratios) == results["config"]["depth"]
    for layer, value in ratios.items():
        assert value == pytest.approx(1.0, abs=0.05), layer
    assert results["max_abs_cos_x_g"] < 1e-3  # the theory's <x, g> = 0 holds for these layers


def test_sgdc_holds_the_ratio_through_the_decay(results):
    for layer, value in results["sgdc_decay_measured_over_predicted"].items():
        assert value == pytest.approx(1.0, abs=0.05), layer


def test_sgd_grad_norm_rises_markedly_more_than_sgdc(results):
    """The norm recurrence (constant ||g|| ||x||) predicts a ~1.44x rise for SGD and none for SGDC on this schedule.

    The 10% tolerance covers the drift of ||g|| ||x|| itself as the loss falls during the decay, which the
    recurrence ignores (a few % here, visible as SGDC's small rise).
    """
    rise, predicted = results["grad_norm_rise"], results["grad_norm_rise_predicted"]
    assert predicted["sgd"] > 1.3 and predicted["sgdc"] == pytest.approx(1.0, abs=0.01)
    for name in ("sgd", "sgdc"):
        assert rise[name]["all_normalized"] == pytest.approx(predicted[name], rel=0.10), name
    assert results["sgd_rise_over_sgdc_rise"] > 1.25
    for layer in results["measured_over_predicted"]:
        assert rise["sgd"][layer] > rise["sgdc"][layer] * 1.15, layer


def test_config_records_lambda_gamma_steps(results):
    cfg = results["config"]
    assert cfg["lambda_gamma_steps"] == pytest.approx(cfg["lr"] * cfg["weight_decay"] * 1600)


def test_unknown_experiment_lists_known_names(tmp_path, capsys):
    assert cli.main(["experiment", "nope", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "steady-state" in err


@pytest.mark.parametrize("bad", ["nokey=1", "steps_constant=-5", "lr"])
def test_bad_set_is_one_line_exit_2(tmp_path, capsys, bad):
    assert cli.main(["experiment", "steady-state", "--output-dir", str(tmp_path), "--set", bad]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# adam-steady-state, shortened: two beta1, two lrs 4x apart, settled after sum lr*lambda = 0.5, measured over 0.5.
ADAM = ["vocab_size=512", "max_bytes=400000", "data_cache_dir=/tmp/megatron-adamc-test-corpus", "seq_len=32"]
ADAM += ["micro_batch_size=4", "workers=2", "beta1s=[0,0.9]", "lrs=[0.02,0.005]", "warmup_steps=2"]
ADAM += ["settled_decay=0.5", "measured_decay=0.5", "tracking_interval=5", "mlp_lrs=[0.02,0.005]"]
ADAM += ["mlp_weight_decay=1", "mlp_seeds=[0]"]


@pytest.fixture(scope="module")
def adam(tmp_path_factory):
    from conftest import SMALL_CORPUS_DIR

    out = tmp_path_factory.mktemp("adam_steady")
    sets = [s.replace("/tmp/megatron-adamc-test-corpus", str(SMALL_CORPUS_DIR)) for s in ADAM]
    argv = ["experiment", "adam-steady-state", "--output-dir", str(out)] + [a for kv in sets for a in ("--set", kv)]
    assert cli.main(argv) == 0
    assert (out / "adam_steady_state.png").stat().st_size > 10_000
    return out, json.loads((out / "results.json").read_text())


def test_adam_constant_is_the_settled_mean_of_the_tracked_ratios(adam):
    """C per run and layer type is recomputed from metrics.jsonl: the rows after sum lr*lambda >= 0.5, each
    parameter's geometric mean of measured / sqrt(2 lambda / lr), then the type's geometric mean."""
    import math

    from megatron_adamc.core.theory import layer_type

    out, res = adam
    run = next(r for r in res["runs"] if r["name"] == "beta1_0.9-lr0.005-seed0")
    rows = [json.loads(line) for line in (out / "runs" / run["name"] / "metrics.jsonl").read_text().splitlines()]
    total, logs = 0.0, {}
    for row in rows:
        total += row.get("lr", 0.0) * 2.0
        if total >= 0.5:
            for key, value in row.items():
                if key.startswith("normalized_update_ratio/") and layer_type(key.split("/", 1)[1]) == "linear":
                    name = key.split("/", 1)[1]
                    logs.setdefault(name, []).append(math.log(value / row[f"predicted_adam_ratio/{name}"]))
    per_param = [sum(v) / len(v) for v in logs.values()]
    assert run["constant"]["linear"]["mean"] == pytest.approx(math.exp(sum(per_param) / len(per_param)), rel=1e-9)
    cell = res["constants"]["llama"]["linear"]["0.9"]
    assert cell["per_lr"]["0.005"] == pytest.approx(run["constant"]["linear"]["mean"])
    assert cell["measured"] == pytest.approx(math.sqrt(cell["per_lr"]["0.005"] * cell["per_lr"]["0.02"]))
    ratio = {lr: next(r for r in res["runs"] if r["name"] == f"beta1_0.9-lr{lr}-seed0")["normalized_ratio"] for lr in
             ("0.02", "0.005")}  # fmt: skip
    exponent = math.log(ratio["0.02"]["linear"]["mean"] / ratio["0.005"]["linear"]["mean"]) / math.log(4)
    assert res["exponents"]["llama"]["linear"]["0.9"] == pytest.approx(exponent)


def test_the_normalized_mlp_sits_on_kossons_constant(adam):
    """Exactly scale-invariant layers: within 25% of sqrt((1 - beta1)/(1 + beta1)) at beta1 0 and 0.9 (4.4x apart),
    so at 0.9 four times under Defazio's 1; the lr exponent near -1/2."""
    _, res = adam
    cells = res["constants"]["mlp"]["normalized"]
    for beta1, cell in cells.items():
        assert 0.75 < cell["measured"] / cell["kosson"] < 1.25, beta1
    assert cells["0.9"]["measured"] < 0.3 and not cells["0.9"]["fits_defazio"]
    for value in res["exponents"]["mlp"]["normalized"].values():
        assert -0.65 < value < -0.35


def test_adam_steady_state_refuses_lrs_closer_than_4x(tmp_path, capsys):
    argv = ["experiment", "adam-steady-state", "--output-dir", str(tmp_path), "--set", "lrs=[0.01,0.004]"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4x apart" in err
