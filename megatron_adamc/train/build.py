"""The public build API: data, model and DeepSpeed engine of a run, each from its config sections.

The trainer composes these; a benchmark or a notebook can call them to get the same pieces the trainer trains
(``benchmarks/train_throughput.py`` does), without reaching into the trainer's internals.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_adamc.config.model_shape import model_config
from megatron_adamc.config.train import TrainConfig
from megatron_adamc.train.distributed import DistEnv


@dataclass
class RunData:
    tokenizer: Any
    train: Any
    valid: Any


def build_data(config: TrainConfig, env: DistEnv, num_train: int, num_valid: int) -> RunData:
    """Tokenizer and megatron-core datasets (the default corpus is prepared first, once, on rank 0's cache)."""
    from megatron_adamc.data import Tokenizer, build_gpt_datasets, prepare_default_data

    data = config.data
    if data.default_corpus:
        prepared = prepare_default_data(
            os.path.expanduser(data.cache_dir), data.vocab_size, data.max_bytes, progress=env.is_main
        )
        train, valid, tokenizer_path, split = (
            prepared.train_prefix,
            prepared.valid_prefix,
            prepared.tokenizer_model,
            None,
        )
    else:
        from megatron_adamc.data.validate import resolve_split

        train, valid, tokenizer_path = data.train, data.valid, os.path.expanduser(data.tokenizer)
        split = resolve_split(valid, data.split)  # the same default preflight checked
    tokenizer = Tokenizer(tokenizer_path, field="data.tokenizer")
    train_ds, valid_ds = build_gpt_datasets(
        train, valid, config.train.seq_len, config.seed, num_train, num_valid, tokenizer,
        cache_dir=data.index_cache_dir, split=split,
    )  # fmt: skip
    return RunData(tokenizer, train_ds, valid_ds)


def build_model(config: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """The Llama of the run, initialised from ``config.seed`` (the same weights on every rank)."""
    from megatron_adamc.model import Llama

    return Llama(model_config(config, vocab_size), seed=config.seed)


def parallelize(config: TrainConfig, model: torch.nn.Module) -> None:
    """Activation checkpointing, then compile (torchtitan's order), in place: names and state dict unchanged, so
    checkpoints and ``checkpoint.init_from`` weights are the same with or without them."""
    from megatron_adamc.model import apply_activation_checkpointing, compile_blocks

    apply_activation_checkpointing(model, config.train.activation_checkpointing)
    if config.train.compile:
        compile_blocks(model)


def build_engine(config: TrainConfig, model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` with AdamC registered and the usual decay / no-decay groups. No lr scheduler:
    the trainer writes each step's lr itself (``schedule.LRSchedule``)."""
    import megatron_adamc.deepspeed as mad
    from megatron_adamc.train.guard import zero0_overflow_guard

    groups = mad.decay_param_groups(
        model, exclude_embeddings=config.optimizer.exclude_embeddings_from_decay,
        adamc_exclude=config.optimizer.adamc_exclude,
    )  # fmt: skip
    engine, *_ = mad.initialize(model=model, model_parameters=groups, config=ds_config)
    if not engine.zero_optimization() and not engine.bfloat16_enabled() and not engine.fp16_enabled():
        zero0_overflow_guard(engine.optimizer)
    return engine


def master_tensors(engine: Any) -> list[torch.Tensor]:
    """This rank's FP32 master weights and Adam moments (each tensor once)."""
    from megatron_adamc.deepspeed.internals import base_optimizer, master_partitions

    optimizer = base_optimizer(engine)
    tensors = [p for group in optimizer.param_groups for p in group["params"]] + master_partitions(engine)
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    unique = {id(t): t for t in tensors if t.numel()}
    return list(unique.values())


def optimizer_state_is_finite(engine: Any) -> bool:
    """No NaN/inf in this rank's master weights and Adam moments (one fused max-abs pass: a save-time check; the
    max, unlike a sum of squares, cannot overflow on large finite values)."""
    tensors = master_tensors(engine)
    if not tensors:
        return True
    norms = torch._foreach_norm([t.detach() for t in tensors], ord=math.inf)
    return bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())
