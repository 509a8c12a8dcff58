"""Everything a user can get wrong, checked before any process group, data preparation or write.

``train`` runs it first on every rank and ``slurm submit`` runs it before submitting, so a job never waits in a queue
for hours to fail on a typo. It needs no GPU, no process group and no data preparation; the checks that need the
tokenizer's vocabulary (``model.vocab_size``) run again once the tokenizer is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megatron_adamc.data.validate import check_split_sizes, parse_split, resolve_split
from megatron_adamc.errors import ConfigError, DataError, UserError
from megatron_adamc.train.config import TrainConfig
from megatron_adamc.train.deepspeed_config import build_deepspeed_config, zero_stage

# A stand-in vocabulary for validating the model before the tokenizer is known (the default corpus trains its own).
_PROVISIONAL_VOCAB = 32_000


def model_config(config: TrainConfig, vocab_size: int | None = None):
    """The LlamaConfig of the run; ``vocab_size`` is the tokenizer's (None: validate shapes only)."""
    from pydantic import ValidationError

    from megatron_adamc.model import LlamaConfig

    overrides = config.model.overrides()
    try:
        model = LlamaConfig.from_preset(config.model.preset, **overrides)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"model.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if "vocab_size" not in overrides:
        model.vocab_size = vocab_size or model.vocab_size or _PROVISIONAL_VOCAB
    elif vocab_size is not None and vocab_size > model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {vocab_size} tokens: "
            f"drop model.vocab_size (it follows the tokenizer) or raise it"
        )
    if config.train.seq_len > model.max_seq_len:
        raise ConfigError(
            f"train.seq_len={config.train.seq_len} is above the model's max_seq_len={model.max_seq_len}: "
            f"lower train.seq_len or --set model.max_seq_len={config.train.seq_len}"
        )
    return model


def check_data_paths(config: TrainConfig) -> None:
    """A custom dataset's prefixes (files intact), split (well-formed, every part large enough) and tokenizer.

    The default corpus is built at train time, so only custom data can be checked here.
    """
    data = config.data
    if data.split is not None:
        parse_split(data.split)
    if data.default_corpus:
        return
    from megatron_adamc.data.blend import parse_blend

    train = parse_blend(data.train, "data.train")[0]
    valid = parse_blend(data.valid, "data.valid")[0] if data.valid is not None else None
    split = resolve_split(data.valid, data.split)
    label = f"data.split={split}" + (" (the default without data.valid)" if data.split is None else "")
    check_split_sizes(train, valid, split, config.train.seq_len, split_label=label)
    if not Path(os.path.expanduser(data.tokenizer)).is_file():
        raise DataError(
            f"data.tokenizer={data.tokenizer}: no such file; train one with `megatron-adamc tokenizer train`"
        )


def check_output_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir}: exists and is not a directory; choose another path")


def preflight(config: TrainConfig, run_dir: Path, world_size: int) -> dict[str, Any]:
    """All checks that need nothing but the config and the file system; returns the DeepSpeed config."""
    check_output_dir(run_dir)
    model_config(config)
    check_data_paths(config)
    ds_config = build_deepspeed_config(config, world_size)
    if config.train.compile:
        from megatron_adamc.model.parallelize import check_compile

        check_compile(zero_stage(ds_config))
    return ds_config
