"""A run's checkpoint as a Hugging Face model: what ``megatron-adamc export`` does once it has the run's config and a
verified checkpoint. The model is the run's (``config.model_shape``, the trainer's own function), its vocabulary the
checkpoint's embedding rows, its param groups the trainer's (a ZeRO-0 bf16 checkpoint stores masters by group)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_adamc.config.model_shape import model_config
from megatron_adamc.config.train import TrainConfig
from megatron_adamc.errors import CheckpointError, UserError
from megatron_adamc.hf.consolidate import consolidate_fp32, group_names
from megatron_adamc.hf.export import Exported, export_hf


def run_config(run_dir: Path) -> TrainConfig:
    """The config a run recorded in its run.json."""
    from pydantic import ValidationError

    from megatron_adamc.config.train import one_line

    path = run_dir / "run.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no run.json; pass a `megatron-adamc train` output directory")
    try:
        return TrainConfig.model_validate(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as err:  # JSON errors and pydantic's ValidationError are ValueErrors
        why = one_line(err) if isinstance(err, ValidationError) else str(err)
        raise UserError(f"{path}: not a run record this version reads ({why})") from None


def export_run(
    config: TrainConfig, tag_dir: Path, output: str, tokenizer: str | None, dtype: str, max_shard_bytes: int
) -> Exported:
    """Consolidate ``tag_dir`` to fp32 and write it to ``output``; ``tokenizer``: a SentencePiece model, "none", or
    None for the run's own."""
    state = consolidate_fp32(tag_dir, _group_names(config))
    model = _model_config(config, state, tag_dir)
    return export_hf(state, model, output, _tokenizer_path(config, tokenizer, model.vocab_size), dtype, max_shard_bytes)


def _group_names(config: TrainConfig) -> list[list[str]]:
    import torch

    from megatron_adamc.model import Llama

    with torch.device("meta"):
        model = Llama(model_config(config))
    opt = config.optimizer
    return group_names(model, opt.exclude_embeddings_from_decay, opt.adamc_exclude)


def _model_config(config: TrainConfig, state: dict[str, Any], tag_dir: Path):
    vocab = None
    if "vocab_size" not in config.model.overrides():  # the trainer took it from the tokenizer: the embedding rows
        if "tok_embeddings.weight" not in state:
            raise CheckpointError(f"{tag_dir}: no tok_embeddings.weight: not a checkpoint of this project's Llama")
        vocab = int(state["tok_embeddings.weight"].shape[0])
    return model_config(config, vocab)


def _tokenizer_path(config: TrainConfig, given: str | None, vocab_size: int) -> str | None:
    from megatron_adamc.data.tokenizer import Tokenizer

    if given is not None:
        return None if given == "none" else given
    data = config.data
    if data.default_corpus:
        path, field = os.path.join(os.path.expanduser(data.cache_dir), "tokenizer.model"), "data.cache_dir"
    else:
        path, field = os.path.expanduser(data.tokenizer), "data.tokenizer"
    if not (os.path.isfile(path) or os.path.isfile(path + ".model")):
        raise UserError(
            f"run.json {field}: the run's tokenizer {path} is gone; pass --tokenizer MODEL (or --tokenizer none)"
        )
    pieces = Tokenizer(path, field=field).vocab_size
    if "vocab_size" not in config.model.overrides() and pieces != vocab_size:
        raise UserError(
            f"run.json {field}: {path} now has {pieces} pieces, the model was trained with {vocab_size} (rebuilt "
            f"since?); pass the run's tokenizer with --tokenizer MODEL"
        )
    return path
