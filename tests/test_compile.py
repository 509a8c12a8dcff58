"""torch.compile of the blocks on a real (one-rank) DeepSpeed ZeRO-2 engine with the norm tracker on: the same
training as eager, with activation checkpointing inside the compiled blocks, and tracked steps that run eagerly.

Tolerance: losses within 1e-5 relative of eager over 4 steps, tracked metrics within 1e-5 relative (inductor fuses
the norms, RoPE and SwiGLU into fewer kernels, so fp32 sums may round differently; measured here: identical
losses, gradients within 6e-8). The speed-up is measured on a GPU (benchmarks), not asserted.
Runtime: one inductor compile (30-110 s on the 2 shared cores, gcc) plus two Dynamo-only compiles (``aot_eager``).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import megatron_adamc.deepspeed as mad
from megatron_adamc.errors import ConfigError
from megatron_adamc.model import Llama, LlamaConfig, apply_activation_checkpointing, check_compile, compile_blocks
from megatron_adamc.tracking import Tracker, TrackingConfig

CFG = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, vocab_size=61, max_seq_len=16)
STEPS, RTOL = 4, 1e-5


def train(mode: str, backend: str | None) -> tuple[list[float], dict[int, dict[str, float]]]:
    """4 steps of ZeRO-2 with the tracker armed on steps 0 and 2; the losses and the tracked activation metrics."""
    model = Llama(CFG, seed=3)
    apply_activation_checkpointing(model, mode)
    if backend is not None:
        compile_blocks(model, backend=backend)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamC", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "zero_optimization": {"stage": 2},
    }
    engine, *_ = mad.initialize(model=model, model_parameters=mad.decay_param_groups(model), config=config)
    tracker = Tracker(engine, TrackingConfig(enabled=True, interval=2, max_logit_sequences=0))
    tokens = torch.randint(0, CFG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    losses, tracked = [], {}
    for step in range(STEPS):
        tracker.begin_step(step)
        loss, _ = engine.module.loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        metrics = tracker.end_step(step, loss=losses[-1], grad_norm=engine.get_global_grad_norm())
        if step % 2 == 0:
            tracked[step] = {k: v for k, v in metrics.items() if k.startswith(("act_rms/", "max_attn_logit/"))}
    tracker.close()
    return losses, tracked


@pytest.mark.parametrize(
    ("mode", "backend"),
    [("selective", "inductor"), ("none", "aot_eager"), ("full", "aot_eager")],
)
def test_compiled_training_equals_eager(single_rank_dist, mode: str, backend: str) -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    eager_losses, eager_tracked = train(mode, None)
    counters.clear()
    torch._dynamo.reset()
    losses, tracked = train(mode, backend)
    # It compiled: one graph, which both blocks share and the eager tracked steps did not invalidate; no break.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=RTOL, atol=0.0)
    assert losses[-1] < losses[0]
    for step, metrics in eager_tracked.items():
        assert len(metrics) == 2 * 4 + 2 and tracked[step].keys() == metrics.keys()
        got, want = torch.tensor(list(tracked[step].values())), torch.tensor(list(metrics.values()))
        torch.testing.assert_close(got, want, rtol=RTOL, atol=0.0)


def test_compile_refused_under_zero3() -> None:
    check_compile(1)
    check_compile(2)
    with pytest.raises(ConfigError, match=r"train.compile=true does not work with ZeRO stage 3 \(train.deepspeed\)"):
        check_compile(3)


def test_checkpointing_goes_before_compile() -> None:
    model = Llama(CFG, seed=0)
    compile_blocks(model)
    with pytest.raises(RuntimeError, match="checkpoint first, then compile"):
        apply_activation_checkpointing(model, "full")
