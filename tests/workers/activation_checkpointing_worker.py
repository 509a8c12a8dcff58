"""Runs under torchrun (2 gloo ranks): a small Llama on real DeepSpeed engines, ZeRO 1/2/3 x activation
checkpointing none/full/selective, with the real norm tracker on.

One launch loops over every case (DeepSpeed's start-up is paid once). Rank 0 writes, per case, the losses of every
step, the gathered gradients of the last step, the tracked metrics and the tracker's raw activation sums (sums of
squares and element counts: a recompute that ran the hooks twice would double the counts but not the RMS).
"""

from __future__ import annotations

import logging
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

import megatron_adamc.deepspeed as mad
from megatron_adamc.model import Llama, LlamaConfig, apply_activation_checkpointing
from megatron_adamc.tracking import Tracker, TrackingConfig

STEPS, MICRO_BATCH, SEQ = 4, 2, 12
# Odd sizes: ZeRO cuts parameters between the ranks unevenly. qk_norm adds small norm parameters inside attention.
SDPA = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, vocab_size=53, max_seq_len=16, qk_norm=True)
CAPPED = SDPA.model_copy(update={"softmax_cap": 5.0})  # the explicit attention path; a cap the logits reach
CASES = [(stage, "sdpa", mode) for stage in (1, 2, 3) for mode in ("none", "full", "selective")]
CASES += [(3, "capped", mode) for mode in ("none", "full", "selective")]


def ds_config(stage: int) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # every parameter partitioned, gathered by the hooks
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamC", "params": {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
        "zero_optimization": zero,
    }


def run(stage: int, attention: str, mode: str) -> dict:
    model = Llama(SDPA if attention == "sdpa" else CAPPED, seed=7)
    apply_activation_checkpointing(model, mode)
    engine, *_ = mad.initialize(model=model, model_parameters=mad.decay_param_groups(model), config=ds_config(stage))
    tracker = Tracker(engine, TrackingConfig(enabled=True, interval=2, max_logit_sequences=0))
    gen = torch.Generator().manual_seed(100 + torch.distributed.get_rank())
    record: dict = {"losses": [], "metrics": {}, "activation_sums": {}}
    for step in range(STEPS):
        tokens = torch.randint(0, SDPA.vocab_size, (MICRO_BATCH, SEQ + 1), generator=gen)
        tracker.begin_step(step)
        loss, _ = engine.module.loss(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        if step == STEPS - 1:
            record["grads"] = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()
        record["losses"].append(float(loss.detach()))
        metrics = tracker.end_step(step, loss=record["losses"][-1], grad_norm=engine.get_global_grad_norm())
        if step % 2 == 0:
            record["metrics"][step] = {k: v for k, v in metrics.items() if k.startswith(("act_rms/", "max_attn"))}
            record["activation_sums"][step] = tracker.activations.sums().clone()
    tracker.close()
    return record


def main() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo")
    mad.register()
    results = {f"zero{stage}/{attention}/{mode}": run(stage, attention, mode) for stage, attention, mode in CASES}
    if torch.distributed.get_rank() == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.destroy_process_group()  # a live gloo group can abort the exit (torch 2.13: ~1 in 7 ranks)


if __name__ == "__main__":
    main()
