"""Validation loss (``eval.*``): when to evaluate (every ``eval.interval`` steps and at the last) and the pass."""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_adamc.data.sampler import batch_indices, collate
from megatron_adamc.metrics_file import VAL_LOSS
from megatron_adamc.train.component import Component, due
from megatron_adamc.train.distributed import DistEnv, all_mean


class Evaluator(Component):
    def __init__(self, config: Any, micro_batch_size: int, dataset: Any, env: DistEnv, engine: Any) -> None:
        self.config = config  # the eval section
        self.micro_batch_size = micro_batch_size
        self.dataset = dataset
        self.env = env
        self.engine = engine

    def end_step(self, step: int, last: bool, record: dict[str, Any]) -> None:
        if due(step, self.config.interval, last):
            record[VAL_LOSS] = self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over ``eval.batches`` micro batches per rank (the same batches at every evaluation)."""
        if self.dataset is None:
            return math.nan
        env, mb, engine = self.env, self.micro_batch_size, self.engine
        engine.eval()
        losses = []
        for i in range(self.config.batches):
            indices = batch_indices(i * mb * env.world_size, mb, env.rank, env.world_size, len(self.dataset))
            batch = collate(self.dataset, indices)
            _, parts = engine.module.loss(engine(batch["tokens"].to(env.device)), batch["labels"].to(env.device))
            losses.append(float(parts["ce"]))
        engine.train()
        return all_mean([sum(losses) / len(losses)], env)[0]
