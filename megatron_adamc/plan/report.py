"""A plan as people read it (a table) and as programs read it (one JSON object with stable keys)."""

from __future__ import annotations

from typing import Any

from megatron_adamc.plan.planner import CUDA_CONTEXT_GIB, FRAGMENTATION, GiB, Plan, suggest_fix

SCHEMA = 1


def _gib(value: float, digits: int = 3) -> float:
    return round(value / GiB, digits)


def plan_json(plan: Plan, config_path: str) -> dict[str, Any]:
    """``megatron-adamc plan --json``: the keys are documented in docs/plan.md and only ever added to."""
    shape, hw, facts, terms = plan.shape, plan.hardware, plan.facts, plan.per_gpu_bytes
    advice, fixed = (None, None) if plan.fits else suggest_fix(plan)
    return {
        "schema": SCHEMA,
        "config": config_path,
        "fits": plan.fits,
        "params": facts.params,
        "per_gpu_gb": {name: _gib(value) for name, value in terms.items()},
        "per_gpu_bytes": {name: int(value) for name, value in terms.items()},
        "buffers_gb": {name: _gib(value) for name, value in plan.buffer_parts.items()},
        "activations_gb": {
            "kept": _gib(plan.activations.kept),
            "recompute": _gib(plan.activations.recompute),
            "per_layer_kept": _gib(plan.activations.per_layer_kept, 5),
            "head_kept": _gib(plan.activations.head_kept),
        },
        "gpu_memory_gb": hw.gpu_memory_gib,
        "largest_term": plan.largest_term,
        "advice": advice,
        "advice_total_gb": None if fixed is None else _gib(fixed.per_gpu_bytes["total"]),
        "model": {
            "preset": shape.preset,
            "vocab_size": shape.model.vocab_size,
            "vocab_source": plan.vocab_source,
            "n_layers": shape.model.n_layers,
            "dim": shape.model.dim,
            "largest_layer_params": facts.largest_layer,
        },
        "hardware": {
            "nodes": hw.nodes,
            "gpus_per_node": hw.gpus_per_node,
            "world_size": hw.world_size,
            "peak_tflops": hw.peak_tflops,
            "mfu": hw.mfu,
        },
        "deepspeed": {
            "file": shape.deepspeed_path,
            "zero_stage": shape.zero.stage,
            "precision": shape.zero.precision,
            "offload_optimizer": shape.zero.offload_optimizer,
            "offload_param": shape.zero.offload_param,
            "reduce_bucket_size": shape.zero.reduce_bucket_size,
            "overlap_comm": shape.zero.overlap_comm,
        },
        "activation_checkpointing": shape.checkpointing,
        "micro_batch_size": shape.micro_batch_size,
        "grad_accum": shape.grad_accum,
        "seq_len": shape.seq_len,
        "global_batch": plan.global_batch,
        "tokens_per_step": plan.tokens_per_step,
        "flops_per_token": facts.flops_per_token,
        "steps": shape.steps,
        "tokens_total": shape.steps * plan.tokens_per_step,
        "time_to_train_s": round(plan.seconds_to_train, 1),
        "time_to_train_days": round(plan.seconds_to_train / 86400, 3),
        "assumptions": {"cuda_context_gb": CUDA_CONTEXT_GIB, "fragmentation": FRAGMENTATION},
    }


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} seconds"
    if seconds < 3600:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_plan(plan: Plan, config_path: str) -> str:
    """The human-readable table of ``megatron-adamc plan``."""
    shape, hw, facts = plan.shape, plan.hardware, plan.facts
    terms, buffers, act = plan.per_gpu_bytes, plan.buffer_parts, plan.activations
    w, n = shape.zero.weight_bytes, hw.world_size
    notes = {
        "params": f"{shape.zero.describe()}, {_plural(n, 'GPU')}",
        "grads": f"{w}-byte gradients" + (f", grad_accum {shape.grad_accum}" if shape.zero.stage == 1 else ""),
        "optimizer": "fp32 master, fp32 gradient, Adam m and v"
        + (" (on the CPU)" if shape.zero.offload_optimizer else (f" / {n}" if shape.zero.stage else "")),
        "activations": f"{shape.checkpointing} checkpointing: kept {act.kept / GiB:.2f}"
        + (f" + one block recomputed {act.recompute / GiB:.2f}" if act.recompute else ""),
        "buffers": f"buckets {buffers['deepspeed_buckets'] / GiB:.2f}, logits {buffers['logits_temporaries'] / GiB:.2f}"
        f", fragmentation {buffers['fragmentation'] / GiB:.2f}, CUDA context {buffers['cuda_context'] / GiB:.2f}",
    }
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines = [
        f"plan: {config_path} on {_plural(hw.nodes, 'node')} x {_plural(hw.gpus_per_node, 'GPU')} of "
        f"{hw.gpu_memory_gib:g} GiB",
        f"model: {shape.preset}, {_count(facts.params)} parameters (largest layer {_count(facts.largest_layer)}), "
        f"vocab {shape.model.vocab_size} from {plan.vocab_source}",
        f"batch: micro {shape.micro_batch_size} x accum {shape.grad_accum} x {_plural(n, 'GPU')} = {plan.global_batch} "
        f"sequences of {shape.seq_len} = {plan.tokens_per_step:,} tokens per step",
        "",
        "| per GPU | GiB | |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {terms[name] / GiB:.2f} | {notes[name]} |" for name in notes]
    lines.append(f"| **total** | **{terms['total'] / GiB:.2f}** | of {hw.gpu_memory_gib:g}: {verdict} |")
    lines += [
        "",
        f"FLOPs per token {facts.flops_per_token:.3g} (6 x matmul params + 12 x layers x dim x seq_len); "
        f"{shape.steps:,} steps = {_count(shape.steps * plan.tokens_per_step)} tokens",
        f"time to train: {_duration(plan.seconds_to_train)} at MFU {hw.mfu:g} of {hw.peak_tflops:g} TFLOP/s "
        f"per GPU on {_plural(n, 'GPU')}",
    ]
    return "\n".join(lines)


def not_fit_line(plan: Plan) -> str:
    """The one line that says why it does not fit and what fixes it."""
    terms = plan.per_gpu_bytes
    largest = plan.largest_term
    advice, fixed = suggest_fix(plan)
    after = f" -> {fixed.per_gpu_bytes['total'] / GiB:.1f} GiB" if fixed is not None else ""
    return (
        f"does not fit: {terms['total'] / GiB:.1f} GiB per GPU > {plan.hardware.gpu_memory_gib:g} GiB; "
        f"largest term {largest} {terms[largest] / GiB:.1f} GiB; fix: {advice}{after}"
    )
