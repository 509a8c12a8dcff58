"""The pure pieces of the tracker: norm maths, the FP8 simulation, the spike alarm, config and sinks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from megatron_adamc.core import fp8, theory
from megatron_adamc.core.norms import cosine, layer_of, log_change, unclip_factor, zscore
from megatron_adamc.metrics_file import MetricsFile
from megatron_adamc.tracking import TrackingConfig, tensorboard_tag, write_tensorboard
from megatron_adamc.tracking.spike import SpikeAlarm

pytestmark = pytest.mark.unit  # make test-fast


def test_unclip_factor_inverts_deepspeed_clipping() -> None:
    g = torch.randn(1000)
    total, clip = g.norm().item(), 0.1
    clipped = g * (clip / (total + 1e-6))  # what clip_grad_norm_ / unscale_and_clip_grads leave
    assert clipped.norm().item() * unclip_factor(total, clip) == pytest.approx(total, rel=1e-6)
    assert unclip_factor(0.05, clip) == 1.0 and unclip_factor(total, 0.0) == 1.0 and unclip_factor(None, clip) == 1.0


def test_cosine_and_zero_vectors() -> None:
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    expected = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert cosine(a.dot(b).item(), a.dot(a).item(), b.dot(b).item()) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(cosine(0.0, 0.0, 1.0))


def test_zscore_window() -> None:
    history = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert zscore(4.5, history) == pytest.approx(0.0)
    assert zscore(4.5 + 2 * math.sqrt(5.25), history) == pytest.approx(2.0)
    assert zscore(1.0, history[:3]) is None
    assert zscore(2.0, [1.0] * 10) == math.inf and zscore(1.0, [1.0] * 10) == 0.0
    assert zscore(math.nan, history) == math.inf


def test_layer_of_and_tensorboard_tags() -> None:
    assert layer_of("layers.12.mlp.fc2.weight") == "layers.12"
    assert layer_of("layers.3") == "layers.3"
    assert layer_of("tok_embeddings.weight") == "tok_embeddings"
    assert tensorboard_tag("grad_norm/layers.3.attn.qkv.weight") == "layers.3/grad_norm/attn.qkv.weight"
    assert tensorboard_tag("fp8/grad/overflow_frac/layers.0.mlp.fc1.weight") == (
        "layers.0/fp8/grad/overflow_frac/mlp.fc1.weight"
    )
    assert tensorboard_tag("max_attn_logit/layers.1") == "layers.1/max_attn_logit"
    assert tensorboard_tag("fp8/weight/overflow_frac") == "fp8/weight/overflow_frac"
    assert tensorboard_tag("loss") == "loss"


def test_fp8_sums_count_overflow_underflow_and_error() -> None:
    fmax = fp8.FORMATS["e4m3"][1]
    x = torch.tensor([0.0, 1.0, -2.0, 1000.0, -1000.0, 1e-9, 3.0])
    sums = fp8.fp8_sums(x, scale=1.0, fmt="e4m3").tolist()
    assert sums[fp8.OVERFLOW] == 2  # |x| > 448
    assert sums[fp8.UNDERFLOW] == 1  # 1e-9 rounds to 0; the exact zero is not counted
    assert sums[fp8.NONZERO] == 6 and sums[fp8.COUNT] == 7
    # The saturated values carry all of the error here (1, 2, 3 are exact in E4M3).
    assert sums[fp8.ERROR_SQ] == pytest.approx(2 * (1000.0 - fmax) ** 2 + 1e-18, rel=1e-6)
    stats = fp8.summarize(sums)
    assert stats["overflow_frac"] == pytest.approx(2 / 7) and stats["underflow_frac"] == pytest.approx(1 / 6)


def test_fp8_e5m2_has_range_e4m3_lacks() -> None:
    x = torch.full((4,), 1000.0)
    assert fp8.fp8_sums(x, 1.0, "e5m2")[fp8.OVERFLOW] == 0
    assert fp8.fp8_sums(x, 1.0, "e4m3")[fp8.OVERFLOW] == 4


def test_delayed_scaling_uses_history() -> None:
    history = fp8.AmaxHistory("e4m3", length=3)
    assert not history.ready and history.scale() == 1.0
    for amax in (1.0, 4.0, 2.0, 0.5):
        history.push(amax)
    assert list(history.values) == [4.0, 2.0, 0.5]
    assert history.scale() == pytest.approx(fp8.FORMATS["e4m3"][1] / 4.0)
    # A tensor that jumped to 8x the history's amax overflows at the stale scale.
    x = torch.linspace(-32.0, 32.0, 101)
    assert fp8.fp8_sums(x, history.scale(), "e4m3")[fp8.OVERFLOW] > 0
    with pytest.raises(ValueError, match="unknown fp8 format"):
        fp8.AmaxHistory("e3m4", 4)


def test_spike_alarm_flags_and_keeps_spike_out_of_window() -> None:
    alarm = SpikeAlarm(window=20, threshold=5.0, top_k=2)
    for step in range(12):
        metrics, spikes = alarm.observe(step, {"loss": 3.0 + 0.01 * (step % 3), "grad_norm": None})
        assert not spikes
    metrics, spikes = alarm.observe(12, {"loss": 10.0})
    assert spikes and spikes[0]["kind"] == "loss" and metrics["spike/loss_z"] > 5
    assert 10.0 not in alarm.history["loss"]
    alarm.remember({"grad_norm/a": 1.0, "grad_norm/b": 1.0, "grad_norm/c": 1.0})
    moved = alarm.moved_layers({"grad_norm/a": 1.1, "grad_norm/b": 0.25, "grad_norm/c": 3.0})
    assert [m["metric"] for m in moved] == ["grad_norm/b", "grad_norm/c"]  # x1/4 moved more than x3
    assert log_change(0.25, 1.0) == pytest.approx(math.log(4))


def test_config_forbids_unknown_keys() -> None:
    config = TrackingConfig(enabled=True, interval=5)
    assert config.fp8_amax_history == 16 and config.activations
    with pytest.raises(ValidationError):
        TrackingConfig(intervall=5)
    with pytest.raises(ValidationError):
        TrackingConfig(interval=0)


def test_sinks_jsonl_and_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    path = tmp_path / "metrics.jsonl"
    MetricsFile(path).append({"step": 1, "a": math.nan, "b": math.inf, "c": 2.5})
    assert json.loads(path.read_text()) == {"step": 1, "a": None, "b": "inf", "c": 2.5}
    writer = SummaryWriter(str(tmp_path / "tb"))
    write_tensorboard(writer, {"grad_norm/layers.0.mlp.fc1.weight": 0.5, "loss": 2.0, "bad": math.nan}, step=3)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"layers.0/grad_norm/mlp.fc1.weight", "loss"}
    assert events.Scalars("layers.0/grad_norm/mlp.fc1.weight")[0].value == 0.5


# ---------------------------------------------------------------- theory: the predictions, by hand and by simulation
def test_prediction_forms_by_hand() -> None:
    # sqrt(2 * 0.1 / 1e-3) = sqrt(200); AdamC at half the peak lr: lambda_t = 0.05, sqrt(2 * 0.05 / 5e-4) = sqrt(200).
    assert theory.sgd_grad_weight_ratio(0.1, 1e-3) == pytest.approx(14.142135623730951)
    assert theory.sgd_grad_weight_ratio(0.1, 5e-4, lr_max=1e-3) == pytest.approx(14.142135623730951)
    assert theory.sgd_grad_weight_ratio(0.1, 5e-4) == pytest.approx(20.0)  # plain decay: sqrt(2 * 0.1 / 5e-4)
    assert theory.adam_normalized_update_ratio(0.1, 5e-4) == pytest.approx(20.0)
    assert theory.momentum_factor(0.9) == pytest.approx(4.358898943540674)  # sqrt(19)
    assert theory.momentum_factor(0.0) == 1.0
    assert theory.kosson_normalized_update_ratio(0.1, 1e-3, 0.9) == pytest.approx(3.244428422615251)  # sqrt(200/19)
    # Kosson's angular update per step is the same prediction times the lr.
    assert theory.adam_update_weight_ratio(0.1, 1e-3, 0.9) == pytest.approx(3.244428422615251e-3)
    with pytest.raises(ValueError, match="beta1"):
        theory.momentum_factor(1.0)


def test_integrated_decay_and_the_matched_adamw_lambda() -> None:
    lrs = [1.0, 2.0, 3.0]
    assert theory.integrated_decay(lrs, 0.5) == pytest.approx(3.0)  # 0.5 * (1 + 2 + 3)
    assert theory.integrated_decay(lrs, 0.5, lr_max=3.0) == pytest.approx(0.5 * 14 / 3)  # 0.5 * (1 + 4 + 9) / 3
    assert theory.matched_adamw_decay(lrs, 0.5, lr_max=3.0) == pytest.approx(0.5 * 14 / 3 / 6)
    # A cosine to zero: AdamC's integrated decay is 3/4 of AdamW's at the same lambda, (3/8) / (1/2).
    cosine = [0.5 * (1 + math.cos(math.pi * t / 10000)) for t in range(10000)]
    assert theory.matched_adamw_decay(cosine, 1.0, lr_max=1.0) == pytest.approx(0.75, abs=1e-3)


def test_layer_types() -> None:
    assert theory.layer_type("layers.3.attn.qkv.weight") == "linear"
    assert theory.layer_type("layers.0.mlp.fc2.weight") == "linear"
    assert theory.layer_type("tok_embeddings.weight") == "embedding"
    assert theory.layer_type("output.weight") == "output"
    assert theory.layer_type("layers.1.attn_norm.weight") == "norm"
    assert theory.layer_type("layers.1.attn.q_norm.weight") == "norm"
    assert theory.layer_type("norm.weight") == "norm"


def _normalized_update_at_equilibrium(beta1: float, orthogonal_update: bool) -> float:
    """x <- (1 - lr lam) x - lr m, m the momentum of fresh unit-RMS directions orthogonal to x (gradient noise);
    optionally m itself projected orthogonal to x. Mean ||dx|| / (lr ||x||) over the second half of the run."""
    gen = torch.Generator().manual_seed(0)
    lr, lam, d, steps = 0.02, 0.5, 1000, 2000  # lr * lam * steps = 20: settled by the second half
    x, m, values = torch.randn(d, generator=gen, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), []
    for t in range(steps):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        g -= (g @ x) / (x @ x) * x
        m = beta1 * m + (1 - beta1) * g * math.sqrt(d) / g.norm()
        u = m - (m @ x) / (x @ x) * x if orthogonal_update else m
        new = (1 - lr * lam) * x - lr * u
        if t >= steps // 2:
            values.append(((new - x).norm() / (lr * x.norm())).item())
        x = new
    return sum(values) / len(values) / theory.adam_normalized_update_ratio(lam, lr)


def test_each_adam_form_holds_in_its_own_regime() -> None:
    """Measured over Defazio's Adam form at equilibrium: exactly 1 when the update is orthogonal to x (decay term
    included: the lambda^2 terms cancel); 1/sqrt((1+b1)/(1-b1)) (Kosson) when momentum averages uncorrelated gradient
    noise, so that the update leans on past directions that already moved x."""
    assert _normalized_update_at_equilibrium(0.9, orthogonal_update=True) == pytest.approx(1.0, rel=1e-3)
    kosson = 1 / theory.momentum_factor(0.9)
    assert _normalized_update_at_equilibrium(0.9, orthogonal_update=False) == pytest.approx(kosson, rel=0.02)
    assert _normalized_update_at_equilibrium(0.0, orthogonal_update=False) == pytest.approx(1.0, rel=1e-3)


def test_hooks_exist_only_between_arm_and_disarm() -> None:
    """An untracked step runs the model and the optimizer as if no tracker existed: no hook of the tracker is
    registered then; a tracked step has them all and sums what they see."""
    from megatron_adamc.model import LlamaConfig
    from megatron_adamc.model.llama import Llama
    from megatron_adamc.tracking.activations import ActivationStats
    from megatron_adamc.tracking.layout import FlatLayout, Layout
    from megatron_adamc.tracking.master import U2, W2, MasterStats

    cfg = LlamaConfig.from_preset("tiny")
    model = Llama(cfg, seed=0)
    flat = torch.nn.Parameter(torch.randn(10))
    optimizer = torch.optim.AdamW([flat], lr=1e-3)
    layout = Layout(["w"], {id(flat): FlatLayout(flat, [0], [0], [10])}, True, "stage0", [0])
    master = MasterStats(layout, [optimizer], lambda: None, 0.0, torch.device("cpu"))
    acts = ActivationStats(model, torch.device("cpu"), low_precision=False, amax_history=4)

    def hooks() -> tuple[int, int]:
        forward = sum(len(module._forward_hooks) for module in model.modules())
        return forward, len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)

    def step() -> None:
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (1, 9)))
        flat.grad = torch.randn(10)
        optimizer.step()

    assert hooks() == (0, 0)
    master.arm()
    acts.arm()
    assert hooks() == (5 * cfg.n_layers, 2)  # qkv, proj, fc1, fc2 and the attention of each layer; pre and post
    step()
    master.disarm()
    acts.disarm()
    assert hooks() == (0, 0)
    sums, act_sums = master.sums.clone(), acts.sums()
    assert sums[0, W2] > 0 and sums[0, U2] > 0 and bool((act_sums[:, 0] > 0).all())
    step()  # untracked: nothing is summed
    assert torch.equal(master.sums, sums) and torch.equal(acts.sums(), act_sums)
