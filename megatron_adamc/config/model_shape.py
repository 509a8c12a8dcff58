"""The model a run builds, from its config and its tokenizer's vocabulary: the one place that turns a ``TrainConfig``
into a ``LlamaConfig``, used by preflight, the trainer's build, the planner and export."""

from __future__ import annotations

from megatron_adamc.config.train import TrainConfig
from megatron_adamc.errors import ConfigError

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
