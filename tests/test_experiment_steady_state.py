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
