"""Deterministic data-parallel sampling: the whole data position is one integer, ``consumed_samples``.

Like Megatron-LM's pretraining sampler: each micro step the global batch is the next ``micro_batch * dp_size``
sample indices, and rank r takes slice r. The dataset itself is already shuffled by GPTDataset's seeded indices, so
resuming means restoring ``consumed_samples`` and nothing else; the result does not depend on when a run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def batch_indices(
    consumed_samples: int, micro_batch: int, dp_rank: int, dp_size: int, num_samples: int | None = None
) -> list[int]:
    """Indices of this rank's next micro batch; advance ``consumed_samples`` by ``micro_batch * dp_size`` after it.

    With ``num_samples`` (the dataset length) the indices wrap around, e.g. for repeated validation passes.
    """
    if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or consumed_samples < 0:
        raise ValueError(
            f"bad sampler arguments: consumed_samples={consumed_samples}, micro_batch={micro_batch}, "
            f"dp_rank={dp_rank}, dp_size={dp_size}"
        )
    start = consumed_samples + dp_rank * micro_batch
    indices = list(range(start, start + micro_batch))
    if num_samples is not None:
        indices = [i % num_samples for i in indices]
    return indices


def iter_batch_indices(
    consumed_samples: int, micro_batch: int, dp_rank: int, dp_size: int, num_samples: int | None = None
) -> Iterator[list[int]]:
    """Endless stream of this rank's micro batches starting at ``consumed_samples`` (a DataLoader batch_sampler)."""
    while True:
        yield batch_indices(consumed_samples, micro_batch, dp_rank, dp_size, num_samples)
        consumed_samples += micro_batch * dp_size


def collate(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    """Stack items into ``tokens``/``labels`` [batch, seq_len] int64 and ``loss_mask`` [batch, seq_len] float."""
    items = [dataset[i] for i in indices]
    return {key: torch.stack([item[key] for item in items]) for key in ("tokens", "labels", "loss_mask")}
