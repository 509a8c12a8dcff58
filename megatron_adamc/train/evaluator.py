"""Validation loss: when to evaluate (``eval.interval`` and the last step) and the pass itself."""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_adamc.data.sampler import batch_indices, collate
from megatron_adamc.train.distributed import DistEnv, all_mean


class Evaluator:
    def __init__(self, config: Any, micro_batch_size: int, dataset: Any, env: DistEnv) -> None:
        self.config = config  # the eval section
        self.micro_batch_size = micro_batch_size
        self.dataset = dataset
        self.env = env

    def should_evaluate(self, step: int, last_step: bool) -> bool:
        return last_step or step % self.config.interval == 0

    @torch.no_grad()
    def evaluate(self, engine: Any) -> float:
        """Mean cross-entropy over ``eval.batches`` micro batches per rank (the same batches at every evaluation)."""
        if self.dataset is None:
            return math.nan
        env, mb = self.env, self.micro_batch_size
        engine.eval()
        losses = []
        for i in range(self.config.batches):
            indices = batch_indices(i * mb * env.world_size, mb, env.rank, env.world_size, len(self.dataset))
            batch = collate(self.dataset, indices)
            _, parts = engine.module.loss(engine(batch["tokens"].to(env.device)), batch["labels"].to(env.device))
            losses.append(float(parts["ce"]))
        engine.train()
        return all_mean([sum(losses) / len(losses)], env)[0]
