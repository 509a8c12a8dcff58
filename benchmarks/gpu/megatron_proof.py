"""The proof on the FP32 main params: Megatron's real optimizer step (DistributedOptimizer, bf16, one GPU) against a
reference AdamW step whose decay is set by hand (docs/megatron.md, "Proof on a GPU"; run by ``gpu/megatron.py``).

megatron-core's GPTModel (TE layers when Transformer Engine is installed, else the local ones) under its DDP with the
distributed optimizer and bf16; the groups from ``get_megatron_optimizer`` with megatron-core's standard overrides
(plus ``--adamc-exclude output_layer`` in one phase). Torch step hooks on the inner optimizer (TE/apex FusedAdam or
torch AdamW) copy, for the step under test, each FP32 main shard, its gradient (reduced, unscaled and clipped: what
the kernel reads) and its Adam moments before the step, and the shard and moments after it. The reference is
``torch.optim.AdamW`` on copies of those, with the moments and step count loaded and ``weight_decay`` set by hand from
the closed-form cosine schedule: lambda * lr_t / lr_max for corrected groups, lambda for excluded ones. Three phases:
AdamC; AdamC with the output layer excluded; the stock scheduler (``--no-adamc``), which must miss the AdamC reference
and match the plain one. Then the per-layer tracker's cost on the same step. Pure helpers are checked on the CPU
(tests/test_megatron_gpu_proof.py); the rest needs CUDA (megatron-core's DDP and distributed optimizer allocate there).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

# A large lambda and a step late in the cosine (lr_t / lr_max = 0.29): the two decay rules then move the weights
# apart by ~1e-4 of their size in one step, 100x the tolerance, so the comparison can tell them apart.
LR, MIN_LR, WD, CLIP = 1e-3, 1e-4, 0.5, 1.0
BETAS, EPS = (0.9, 0.95), 1e-8
GBS, WARMUP, DECAY = 8, 2, 12  # global batch (samples per scheduler step), warmup and decay in iterations
PROOF_STEP = 10  # the inner optimizer's 10th step, taken at the lr the scheduler set after iteration 9
RTOL = 1e-6
MISS = 10 * RTOL  # the other rule must be at least this far off
EXCLUDED = ("output_layer",)


def schedule_lr(iteration: int) -> float:
    """Megatron's cosine with linear warmup from 0 (init_lr 0), at scheduler step ``iteration * GBS``."""
    if iteration <= WARMUP:
        return LR * iteration / WARMUP
    if iteration > DECAY:
        return MIN_LR
    ratio = (iteration - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (LR - MIN_LR)


def hand_decay(name: str, iteration: int, adamc: bool, exclude: tuple[str, ...]) -> float:
    """The decay the step at ``iteration`` must have used, from the schedule alone (not from the groups)."""
    if not adamc or any(part in name.split(".") for part in exclude):
        return WD
    return WD * schedule_lr(iteration) / LR


def reference_step(before: dict[str, Any], lr: float, weight_decay: float, step: int) -> dict[str, Any]:
    """torch AdamW, fp32, one step from the captured state (``step`` counts this step); returns param and moments."""
    import torch

    param = before["param"].detach().clone().float().requires_grad_(True)
    param.grad = before["grad"].detach().clone().float()
    optimizer = torch.optim.AdamW([param], lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, foreach=False)
    optimizer.state[param] = {
        "step": torch.tensor(float(step - 1)),
        "exp_avg": before["exp_avg"].detach().clone().float(),
        "exp_avg_sq": before["exp_avg_sq"].detach().clone().float(),
    }
    optimizer.step()
    state = optimizer.state[param]
    return {"param": param.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}


def rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (0 for two zero tensors)."""
    scale = float(b.abs().max())
    return float((a.float() - b.float()).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def compare(captured: list[dict], iteration: int, adamc: bool, exclude: tuple[str, ...], step: int) -> dict[str, Any]:
    """Every captured shard against the hand-decayed reference; the worst relative errors and the decays used."""
    worst = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    decays: dict[str, float] = {}
    group_decay_error = 0.0
    for shard in captured:
        decay = hand_decay(shard["name"], iteration, adamc, exclude) if shard["wd_mult"] else 0.0
        decays[shard["name"]] = decay
        group_decay_error = max(group_decay_error, abs(shard["group_weight_decay"] - decay) / WD)
        ref = reference_step(shard["before"], schedule_lr(iteration), decay, step)
        for key in worst:
            worst[key] = max(worst[key], rel_diff(shard["after"][key], ref[key]))
    excluded = sorted({n for n, d in decays.items() if d == WD and adamc})  # kept lambda under AdamC
    return {"max_rel_error": worst, "group_decay_error": group_decay_error, "plain_decay_params": excluded}


# ---------------------------------------------------------------------------------------------------- GPU only


def _model(te: bool):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8, num_query_groups=2,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, bf16=True,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
    )  # fmt: skip
    spec = get_gpt_layer_with_transformer_engine_spec() if te else get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=4096, max_sequence_length=256,
        position_embedding_type="rope", share_embeddings_and_output_weights=False,
    ).cuda()  # fmt: skip
    model = Float16Module(config, model)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    return DistributedDataParallel(config=config, ddp_config=ddp, module=model), config


def _optimizer(model: Any, adamc: bool, exclude: tuple[str, ...]):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_adamc.megatron.groups import exclusion_overrides
    from megatron_adamc.megatron.scheduler import AdamCParamScheduler

    config = OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=MIN_LR, weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_eps=EPS, clip_grad=CLIP, bf16=True, use_distributed_optimizer=True,
    )  # fmt: skip
    overrides = {**get_standard_config_overrides(config), **exclusion_overrides(list(exclude))[0]}
    optimizer = get_megatron_optimizer(config, [model], config_overrides=overrides)
    cls = AdamCParamScheduler if adamc else OptimizerParamScheduler
    scheduler = cls(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=WARMUP * GBS, lr_decay_steps=DECAY * GBS,
        lr_decay_style="cosine", start_wd=WD, end_wd=WD, wd_incr_steps=DECAY * GBS, wd_incr_style="constant",
    )  # fmt: skip
    return optimizer, scheduler


def _distributed(optimizer: Any) -> Any:
    """The DistributedOptimizer inside (get_megatron_optimizer may return a ChainedOptimizer of one)."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    assert len(subs) == 1 and hasattr(subs[0], "shard_fp32_from_float16_groups"), type(subs[0]).__name__
    return subs[0]


def _train_step(model: Any, optimizer: Any, generator: Any) -> tuple[bool, float]:
    import torch

    tokens = torch.randint(0, 4096, (GBS, 257), device="cuda", generator=generator)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    position_ids = torch.arange(256, device="cuda").expand(GBS, -1)
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    model.finish_grad_sync()
    success, grad_norm, _ = optimizer.step()
    return bool(success), float(grad_norm)


def phase(model: Any, adamc: bool, exclude: tuple[str, ...]) -> dict[str, Any]:
    """PROOF_STEP iterations from the same weights; the last one captured and compared with the reference."""
    import torch

    from megatron_adamc.tracking.megatron_layout import global_names

    optimizer, scheduler = _optimizer(model, adamc, exclude)
    dist_opt = _distributed(optimizer)
    names = global_names([model])
    main_to_name = {}
    for models, mains in zip(dist_opt.model_float16_groups, dist_opt.shard_fp32_from_float16_groups, strict=True):
        for param, main in zip(models, mains, strict=True):
            main_to_name[id(main)] = names[id(param)]
    captured: list[dict] = []
    armed = {"on": False}

    def pre(inner: Any, args: Any, kwargs: Any) -> None:
        if not armed["on"]:
            return
        for group in inner.param_groups:
            for main in group["params"]:
                if main.grad is None or id(main) not in main_to_name:
                    continue
                state = inner.state.get(main, {})
                captured.append(
                    {
                        "name": main_to_name[id(main)],
                        "main": main,
                        "group_weight_decay": float(group["weight_decay"]),
                        "wd_mult": float(group.get("wd_mult", 1.0)),
                        "before": {
                            "param": main.detach().clone(),
                            "grad": main.grad.detach().clone(),
                            "exp_avg": state.get("exp_avg", torch.zeros_like(main)).detach().clone(),
                            "exp_avg_sq": state.get("exp_avg_sq", torch.zeros_like(main)).detach().clone(),
                        },
                    }
                )

    def post(inner: Any, args: Any, kwargs: Any) -> None:
        if not armed["on"]:
            return
        for shard in captured:
            state = inner.state[shard["main"]]
            shard["after"] = {"param": shard["main"].detach().clone(), "exp_avg": state["exp_avg"].clone(),
                              "exp_avg_sq": state["exp_avg_sq"].clone()}  # fmt: skip

    handles = [dist_opt.optimizer.register_step_pre_hook(pre), dist_opt.optimizer.register_step_post_hook(post)]
    generator = torch.Generator(device="cuda").manual_seed(7)
    for iteration in range(1, PROOF_STEP + 1):
        armed["on"] = iteration == PROOF_STEP
        success, grad_norm = _train_step(model, optimizer, generator)
        scheduler.step(GBS)
    for handle in handles:
        handle.remove()
    torch.cuda.synchronize()
    # The step at iteration i ran with the lr the scheduler set at the end of iteration i-1.
    result = compare(captured, PROOF_STEP - 1, adamc, exclude, PROOF_STEP)
    result.update(shards=len(captured), grad_norm=grad_norm, step_ok=success, inner=type(dist_opt.optimizer).__name__)
    # The same capture against the other rule (plain for AdamC, AdamC for plain, the output corrected too for the
    # exclusion): the comparison can fail.
    other_adamc, other_exclude = (True, ()) if exclude or not adamc else (False, ())
    other = compare(captured, PROOF_STEP - 1, other_adamc, other_exclude, PROOF_STEP)
    result["other_rule_max_rel_error"] = other["max_rel_error"]["param"]
    return result


def tracking_cost(model: Any, steps: int) -> dict[str, Any]:
    """Step time (forward, backward, optimizer step) with the tracker armed every step, every 10, and idle."""
    import torch

    from megatron_adamc.tracking.megatron_tracker import MegatronTracker

    optimizer, scheduler = _optimizer(model, True, EXCLUDED)
    tracker = MegatronTracker(optimizer, [model], interval=1, clip=CLIP, writer_rank=False)
    generator = torch.Generator(device="cuda").manual_seed(11)
    times: dict[str, list[float]] = {"off": [], "every step": []}
    for index in range(2 * steps + 4):
        mode = "every step" if index % 2 else "off"
        torch.cuda.synchronize()
        start = time.perf_counter()
        if mode == "every step":
            tracker.begin_step(1)
        _, grad_norm = _train_step(model, optimizer, generator)
        if mode == "every step":
            tracker.end_step(1, grad_norm)
        torch.cuda.synchronize()
        if index >= 4:  # warm-up: allocator, kernels
            times[mode].append(time.perf_counter() - start)
        scheduler.step(GBS)
    tracker.close()
    off, on = statistics.median(times["off"]), statistics.median(times["every step"])
    return {
        "step_ms_off": off * 1e3,
        "step_ms_every_step": on * 1e3,
        "overhead_every_step": on / off - 1.0,
        "overhead_every_10_steps": (on / off - 1.0) / 10,
        "steps_each": steps,
    }


def run_proof(budget_s: float) -> dict[str, Any]:
    """All phases in this process (one GPU, a one-rank NCCL group); returns the record."""
    import importlib.util
    import os

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    start = time.time()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel()
    te = importlib.util.find_spec("transformer_engine") is not None
    record: dict[str, Any] = {"transformer_engine": te, "phases": {}}
    phases = (("adamc", True, ()), ("adamc_exclude_output", True, EXCLUDED), ("no_adamc", False, ()))
    for name, adamc, exclude in phases:
        model, _ = _model(te)  # the same seeds: the same starting weights and batches every phase
        record["phases"][name] = phase(model, adamc, exclude)
        del model
        torch.cuda.empty_cache()
    if time.time() - start < budget_s * 0.6:
        model, _ = _model(te)
        record["tracking"] = tracking_cost(model, steps=15)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    record["seconds"] = time.time() - start
    return record


def checks(record: dict[str, Any]) -> dict[str, bool]:
    phases = record.get("phases", {})
    out = {}
    for name in ("adamc", "adamc_exclude_output", "no_adamc"):
        p = phases.get(name, {})
        errors = p.get("max_rel_error", {})
        out[f"{name}: FP32 main params and Adam moments = hand-decayed AdamW (1e-6)"] = (
            bool(errors) and max(errors.values()) <= RTOL
        )
        out[f"{name}: groups held the hand-set decay"] = p.get("group_decay_error", 1.0) <= 1e-12
        out[f"{name}: the other decay rule misses (>1e-5)"] = p.get("other_rule_max_rel_error", 0.0) > MISS
    excluded = phases.get("adamc_exclude_output", {}).get("plain_decay_params", [])
    out["--adamc-exclude output_layer: only output_layer.weight kept the plain decay"] = excluded == [
        "output_layer.weight"
    ]
    return out
