"""Project weights -> a Hugging Face model directory that ``from_pretrained`` loads with no code of ours.

Writes ``config.json``, ``generation_config.json``, safetensors weights (sharded past ``max_shard_bytes``) and the
tokenizer files. Everything is written into a staging directory renamed onto ``output`` at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_adamc.data.tokenizer import Tokenizer
from megatron_adamc.errors import DataError
from megatron_adamc.hf.files import new_output_dir, write_safetensors
from megatron_adamc.hf.hf_config import DTYPES, to_hf_config
from megatron_adamc.hf.mapping import hf_architecture, to_hf
from megatron_adamc.model import Llama, LlamaConfig
from megatron_adamc.model.weights import check_tensors

DEFAULT_SHARD_BYTES = 5 * 10**9  # the Hub's customary shard size


@dataclass(frozen=True)
class Exported:
    architecture: str
    files: list[str]
    num_params: int


def export_hf(
    state: dict[str, torch.Tensor],
    config: LlamaConfig,
    output: str | Path,
    tokenizer_path: str | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Exported:
    """Write ``state`` (project names, full tensors) as the HF model of ``config`` into the new directory
    ``output``; ``tokenizer_path`` (a SentencePiece .model) adds the tokenizer files."""
    if dtype not in DTYPES:
        raise DataError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    architecture = hf_architecture(config)
    with torch.device("meta"):
        expected = Llama(config).state_dict()
    check_tensors(state, expected, "checkpoint")
    tokenizer = Tokenizer(tokenizer_path, field="tokenizer") if tokenizer_path else None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.path}: {tokenizer.vocab_size} pieces, more than the model's vocab_size="
            f"{config.vocab_size}: not the tokenizer this model was trained with; pass the right one"
        )
    hf_tensors = {name: t.to(getattr(torch, dtype)) for name, t in to_hf(state, config).items()}
    ids = dict.fromkeys(("bos_id", "eos_id", "pad_id"))
    if tokenizer is not None:
        ids = {key: (value if value >= 0 else None) for key, value in
               (("bos_id", tokenizer.bos_id), ("eos_id", tokenizer.eos_id), ("pad_id", tokenizer.pad_id))}  # fmt: skip
    hf_config = to_hf_config(config, architecture, dtype, **ids)
    with new_output_dir(Path(output)) as staging:
        files = write_safetensors(hf_tensors, staging, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        files += ["config.json", "generation_config.json"]
        if tokenizer is not None:
            from megatron_adamc.hf.tokenizer import write_tokenizer

            files += write_tokenizer(tokenizer, staging, config.max_seq_len)
    return Exported(architecture, files, sum(t.numel() for t in state.values()))
