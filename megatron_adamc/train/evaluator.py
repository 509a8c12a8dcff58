"""Validation loss (``eval.*``): when to evaluate (every ``eval.interval`` steps and at the last) and the pass.

By default a pass is ``eval.batches`` micro batches of the validation dataset, which megatron-core samples with the
run's seed. ``eval.full_split`` evaluates every token of the split instead, in windows cut from its documents in
file order: the same set for every seed, so runs that differ only in their seed are compared on the same data.
"""

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
        self._windows: torch.Tensor | None = None

    def end_step(self, step: int, last: bool, record: dict[str, Any]) -> None:
        if due(step, self.config.interval, last):
            record[VAL_LOSS] = self.evaluate()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over ``eval.batches`` micro batches per rank (the same batches at every evaluation)."""
        if self.dataset is None:
            return math.nan
        if self.config.full_split:
            return self._evaluate_full_split()
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

    @torch.no_grad()
    def _evaluate_full_split(self) -> float:
        """Token-weighted mean cross-entropy over every window of the split, the windows dealt out over the ranks."""
        if self._windows is None:
            self._windows = split_windows(self.dataset)
        env, mb, engine = self.env, self.micro_batch_size, self.engine
        mine = self._windows[env.rank :: env.world_size]
        engine.eval()
        total = 0.0
        for start in range(0, len(mine), mb):
            batch = mine[start : start + mb].to(env.device)
            _, parts = engine.module.loss(engine(batch[:, :-1]), batch[:, 1:])
            total += float(parts["ce"]) * len(batch)  # windows of equal length: a batch's mean weighs its rows
        engine.train()
        summed, count = all_mean([total, float(len(mine))], env)
        return summed / count


def split_windows(dataset: Any) -> torch.Tensor:
    """Every token of a megatron-core GPT dataset's split (each part of a blend), documents in file order, cut into
    windows of ``sequence_length + 1`` tokens that overlap by one, as the dataset's own samples do; the tail shorter
    than a window is left out. Independent of the dataset's seed and sample count."""
    import numpy as np

    parts = getattr(dataset, "datasets", None) or [dataset]
    length = parts[0].config.sequence_length
    tokens = np.concatenate([part.dataset.get(int(doc)) for part in parts for doc in np.sort(part.indices)]).astype(
        np.int64
    )
    count = (len(tokens) - 1) // length
    if count < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than one window of {length + 1}")
    starts = np.arange(count)[:, None] * length + np.arange(length + 1)[None, :]
    return torch.from_numpy(tokens[starts])
