"""The LlamaConfig a train config describes: the preset, its ``model.*`` overrides and the tokenizer's vocabulary.

One function for the trainer (which knows the tokenizer) and the planner (which may not), so both build the same
model and refuse the same configs with the same one-line errors.
"""

from __future__ import annotations

from pydantic import ValidationError

from megatron_adamc.errors import UserError
from megatron_adamc.model.config import LlamaConfig
from megatron_adamc.train.config import TrainConfig


def model_config(config: TrainConfig, tokenizer_vocab: int | None) -> LlamaConfig:
    """``model.preset`` with the overrides; the vocabulary is the tokenizer's unless ``model.vocab_size`` is set
    (then it may not be smaller). ``tokenizer_vocab=None`` (tokenizer unknown) keeps the preset's."""
    overrides = config.model.overrides()
    try:
        model = LlamaConfig.from_preset(config.model.preset, **overrides)
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"model.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    if tokenizer_vocab is not None and "vocab_size" not in overrides:
        model.vocab_size = tokenizer_vocab
    elif tokenizer_vocab is not None and tokenizer_vocab > model.vocab_size:
        raise UserError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens: "
            f"drop model.vocab_size (it follows the tokenizer) or raise it"
        )
    if config.train.seq_len > model.max_seq_len:
        raise UserError(
            f"train.seq_len={config.train.seq_len} is above the model's max_seq_len={model.max_seq_len}: "
            f"lower train.seq_len or --set model.max_seq_len={config.train.seq_len}"
        )
    return model
