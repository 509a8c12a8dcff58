"""Training data through megatron-core's own GPTDataset and BlendedMegatronDatasetBuilder.

Using megatron-core's classes (rather than a look-alike) means the same prefixes, blends and seeds give the same
samples as Megatron-LM. The builder builds its index caches on rank 0 first and the other ranks load them after a
barrier; with no process group it would crash on blends (``BlendedDataset`` calls ``get_rank()`` unconditionally),
so in a single process a private 1-rank gloo group is opened for the build and closed again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

from megatron_adamc.data.blend import Blend, parse_blend
from megatron_adamc.data.megatron_import import quiet_megatron_import
from megatron_adamc.data.provenance import VocabGuard
from megatron_adamc.data.tokenizer import Tokenizer
from megatron_adamc.data.validate import check_eval_pass, check_split_sizes
from megatron_adamc.errors import DataError
from megatron_adamc.files import cache_lock


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Use the caller's process group, or a throwaway in-memory 1-rank one (no network, no env vars)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def _index_cache_lock(cache_dir: str) -> Iterator[None]:
    """Rank 0 (the rank megatron-core builds the index caches on; the others wait at its barrier) holds the cache's
    lock, so another job on the same cache never loads an index this one is still writing."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        yield
        return
    with cache_lock(cache_dir):
        yield


def build_gpt_datasets(
    train_blend: str | Sequence[object],
    valid_blend: str | Sequence[object] | None,
    seq_len: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int | None,
    tokenizer: Tokenizer | str,
    cache_dir: str | None = None,
    split: str | None = None,
):
    """Build ``(train_ds, valid_ds)``: megatron-core GPTDataset (one prefix) or BlendedDataset (weighted blend).

    Items are dicts with ``tokens`` and ``labels`` (int64, length ``seq_len``, labels = tokens shifted by one) and
    ``loss_mask``/``position_ids``. Either pass ``valid_blend`` (separate validation prefixes) or ``split`` (e.g.
    ``"98,2,0"``: train and validation drawn from the documents of ``train_blend``). ``num_valid_samples=None``
    means one pass over an unweighted validation set. Must be called on every rank when torch.distributed is up;
    ``cache_dir`` (default: ``index_cache`` beside the first train prefix) must be shared by all ranks.
    """
    if seq_len < 1:
        raise DataError(f"train.seq_len must be >= 1 (got {seq_len})")
    if num_train_samples < 1:
        raise DataError(f"num_train_samples must be >= 1 (got {num_train_samples})")
    if valid_blend is not None and split is not None:
        raise DataError("data: give either a validation blend or a split string, not both")
    train = parse_blend(train_blend, "data.train")
    valid = parse_blend(valid_blend, "data.valid") if valid_blend is not None else None
    # Before megatron-core: a split with no tokens would hang it (GPTDataset._get_num_epochs) and a bad split string
    # would be misread.
    check_split_sizes(train[0], valid[0] if valid is not None else None, split, seq_len)
    world = _world_size()
    check_eval_pass(train, valid, split, seq_len, num_valid_samples // world if num_valid_samples else None)
    if valid is not None and valid[1] is not None and num_valid_samples is None:
        raise DataError("data.valid has weights, so the number of validation samples must be given")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer, field="data.tokenizer")
    cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(train[0][0])), "index_cache")

    quiet_megatron_import()
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blend_kwargs: dict[str, object]
    if valid is None:
        blend_kwargs = {"blend": train, "split": split or "100,0,0"}
        if split is None:
            num_valid_samples = 0  # no validation split; megatron-core wants a number, not None, beside weights
        elif train[1] is not None and num_valid_samples is None:
            raise DataError("data.train has weights, so with a split the number of validation samples must be given")
    else:
        blend_kwargs = {"blend_per_split": [train, valid, None]}
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        tokenizer=tokenizer,
        path_to_cache=cache_dir,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model builds its causal mask; a seq x seq tensor per item is waste
        mid_level_dataset_surplus=0.05,
        **blend_kwargs,
    )
    sizes = [num_train_samples, num_valid_samples, 0]
    try:
        with _process_group(), _index_cache_lock(cache_dir):
            datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    except OSError as err:  # megatron-core writes its index cache in place (a read-only or full folder)
        where = err.filename or cache_dir
        raise DataError(
            f"data.index_cache_dir: cannot write megatron-core's index cache {where} ({err.strerror or err}); set "
            "data.index_cache_dir to a writable folder"
        ) from None
    train_ds, valid_ds = datasets[0], datasets[1]
    if train_ds is None or len(train_ds) == 0:
        raise DataError(f"data.train: no training samples of length {seq_len}; use more data or a shorter seq_len")
    if valid_ds is not None and len(valid_ds) == 0:
        raise DataError(f"data.valid: fewer tokens than train.seq_len={seq_len}; use more validation data")
    # Every sample checked against the vocabulary as it is read (data/provenance.py): never an IndexError.
    train_ds = VocabGuard(train_ds, tokenizer, train[0], "data.train")
    if valid_ds is not None:
        valid_ds = VocabGuard(valid_ds, tokenizer, (valid or train)[0], "data.valid" if valid else "data.train")
    return train_ds, valid_ds


def describe_blend(blend: Blend) -> str:
    prefixes, weights = blend
    if weights is None:
        return ", ".join(prefixes)
    return ", ".join(f"{w:g}*{p}" for w, p in zip(weights, prefixes, strict=True))
