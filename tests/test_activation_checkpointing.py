"""Activation checkpointing: training equals no checkpointing, memory per layer is what the definitions say, the
tracker counts a recomputed block once, and all of it on real DeepSpeed ZeRO 1/2/3 engines (2 gloo ranks).

Tolerance: fp32, losses and gradients within 1e-6 relative of ``none`` (on this CPU they come out bit-identical:
the recompute runs the same kernels on the same inputs). Runtime: ~5 s here, plus ~60 s for the 2-rank worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import torchrun

from megatron_adamc.errors import ConfigError
from megatron_adamc.model import (
    Llama,
    LlamaConfig,
    activation_checkpointing,
    apply_activation_checkpointing,
    measure_activation_memory,
)
from megatron_adamc.tracking import activations
from megatron_adamc.tracking.activations import ActivationStats

WORKER = Path(__file__).parent / "workers" / "activation_checkpointing_worker.py"
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64)
RTOL = 1e-6


def train(cfg: LlamaConfig, mode: str, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    """``steps`` AdamW steps on one fixed batch (so that the loss falls); the losses and the final weights."""
    model = Llama(cfg, seed=3)
    apply_activation_checkpointing(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss, _ = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_close(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("attention", ["sdpa", "capped"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_training_equals_no_checkpointing(attention: str, mode: str) -> None:
    cfg = LlamaConfig(**TINY, qk_norm=True, softmax_cap=4.0 if attention == "capped" else None)
    losses, weights = train(cfg, "none")
    got_losses, got_weights = train(cfg, mode)
    assert_close(got_losses, losses)
    assert losses[-1] < losses[0]  # it trained: the comparison is over moving weights
    for name, weight in weights.items():
        assert_close(got_weights[name], weight)


def test_mode_is_set_and_validated() -> None:
    model = Llama(LlamaConfig(**TINY), seed=0)
    assert activation_checkpointing(model) == "none"
    for mode in ("full", "selective", "none"):
        apply_activation_checkpointing(model, mode)
        assert activation_checkpointing(model) == mode
    with pytest.raises(ConfigError, match="train.activation_checkpointing='some'"):
        apply_activation_checkpointing(model, "some")
    names = [n for n, _ in model.named_parameters()]
    tokens = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens)
        apply_activation_checkpointing(model, "full")
        assert torch.equal(model(tokens), plain)  # evaluation runs the blocks plainly
    assert [n for n, _ in model.named_parameters()] == names  # nothing wrapped: the tracker's names hold


def per_layer_bytes(mode: str, B: int, T: int, **overrides) -> int:
    """Activation bytes alive after the forward, per layer: the difference between 3 and 1 layers, halved."""
    alive = []
    for n_layers in (1, 3):
        model = Llama(LlamaConfig(**{**TINY, "n_layers": n_layers, **overrides}), seed=0)
        apply_activation_checkpointing(model, mode)
        tokens = torch.randint(0, TINY["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0))
        alive.append(measure_activation_memory(model, tokens[:, :-1], tokens[:, 1:]).after_forward)
    return (alive[1] - alive[0]) // 2


@pytest.mark.parametrize("attention", ["sdpa", "capped"])
def test_memory_per_layer_matches_the_definitions(attention: str) -> None:
    """What docs/model.md (and the memory planner) say each mode keeps per layer, to the byte (fp32, 4 bytes)."""
    B, T, d, f, H, KV, hd = 2, 48, TINY["dim"], TINY["ffn_dim"], TINY["n_heads"], TINY["n_kv_heads"], 16
    overrides = {"softmax_cap": 4.0} if attention == "capped" else {}
    qkv = (H + 2 * KV) * hd
    full = 4 * B * T * d  # the block input
    # outputs of qkv, attention (SDPA: out and logsumexp; explicit: scores q k^T and probs v), proj, fc1, fc2
    attn = B * T * H * hd + (B * H * T if attention == "sdpa" else B * H * T * T)
    selective = full + 4 * (B * T * qkv + attn + B * T * d + B * T * 2 * f + B * T * d)
    none = per_layer_bytes("none", B, T, **overrides)
    assert per_layer_bytes("full", B, T, **overrides) == full
    assert per_layer_bytes("selective", B, T, **overrides) == selective
    assert selective < none, (selective, none)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_tracker_counts_a_recomputed_block_once(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks see each output once (raw sums and counts, not only the RMS, which a double count keeps), and the
    max logit is the forward's; without the backward check the recompute would count outputs again."""

    def tracked(checkpointing: str) -> tuple[torch.Tensor, torch.Tensor]:
        model = Llama(LlamaConfig(**TINY), seed=3)
        apply_activation_checkpointing(model, checkpointing)
        stats = ActivationStats(model, torch.device("cpu"), low_precision=False, amax_history=4)
        tokens = torch.randint(0, TINY["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
        stats.arm()
        loss, _ = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        stats.disarm()
        stats.remove()
        return stats.sums(), stats.maxima.clone()

    sums, maxima = tracked("none")
    got_sums, got_maxima = tracked(mode)
    assert torch.equal(got_sums[:, activations.COUNT], sums[:, activations.COUNT])
    assert_close(got_sums, sums)
    assert_close(got_maxima, maxima)
    assert torch.isfinite(maxima[-TINY["n_layers"] :]).all()  # the max logit of each layer (then FP8 amax: off)
    monkeypatch.setattr(activations, "in_backward", lambda: False)
    doubled, _ = tracked(mode)
    # layers.{i}.attn.qkv counted twice; the recompute stops early, before the last fc2, whose output nothing needs
    assert torch.equal(doubled[0::4, activations.COUNT], 2 * sums[0::4, activations.COUNT])


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ac") / "results.pt"
    torchrun(WORKER, [str(out)], timeout=600)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_equal_no_checkpointing(zero_results: dict, stage: int) -> None:
    """Real DeepSpeed engines on 2 gloo ranks: ZeRO-3 gathers parameters in forward hooks, which the recompute runs
    again; losses, gathered gradients and the tracker's metrics and raw sums all equal ``none``."""
    attentions = ["sdpa", "capped"] if stage == 3 else ["sdpa"]
    for attention in attentions:
        base = zero_results[f"zero{stage}/{attention}/none"]
        for mode in ("full", "selective"):
            got = zero_results[f"zero{stage}/{attention}/{mode}"]
            assert_close(got["losses"], base["losses"])
            for name, grad in base["grads"].items():
                assert_close(got["grads"][name], grad)
            for step, metrics in base["metrics"].items():
                assert len(metrics) == 2 * 4 + 2  # act_rms of 4 linears and a max logit, per layer
                assert got["metrics"][step].keys() == metrics.keys()
                assert_close(list(got["metrics"][step].values()), list(metrics.values()))
                assert_close(got["activation_sums"][step], base["activation_sums"][step])
