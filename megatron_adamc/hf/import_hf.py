"""A local Hugging Face Llama (or Qwen3) directory -> project weights plus a train config that continues from them.

Writes into the new directory ``output``: ``model.safetensors`` (project names, via ``model.weights``, the source
dtype kept: loading casts to the model's), ``tokenizer.model`` when the source has one, and ``train.yaml``, a
complete trainer config whose only edits are the data paths. Nothing is downloaded: ``hf_dir`` is a path.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from megatron_adamc.data.tokenizer import Tokenizer
from megatron_adamc.errors import DataError, UserError
from megatron_adamc.hf.files import new_output_dir, read_json, read_safetensors
from megatron_adamc.hf.hf_config import from_hf_config
from megatron_adamc.hf.mapping import from_hf
from megatron_adamc.model import Llama, LlamaConfig
from megatron_adamc.model.weights import check_tensors, save_weights

WEIGHTS = "model.safetensors"
TRAIN_CONFIG = "train.yaml"
DATA_PLACEHOLDER = "EDIT/path/to/train_text_document"


@dataclass(frozen=True)
class Imported:
    config: LlamaConfig
    architecture: str
    num_params: int
    weights: Path
    train_config: Path
    tokenizer: Path | None
    tokenizer_note: str | None  # why no tokenizer.model was written


def import_hf(hf_dir: str | Path, output: str | Path) -> Imported:
    hf_dir, output = Path(hf_dir), Path(output).resolve()
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir}: no such directory; pass a local Hugging Face model directory (nothing downloads)")
    config, architecture = from_hf_config(read_json(hf_dir / "config.json"), f"{hf_dir}/config.json")
    state = from_hf(read_safetensors(hf_dir), config, str(hf_dir))
    with torch.device("meta"):
        check_tensors(state, Llama(config).state_dict(), str(hf_dir))
    tokenizer, tokenizer_note = _sentencepiece(hf_dir / "tokenizer.model", config.vocab_size)
    num_params = sum(t.numel() for t in state.values())
    with new_output_dir(output) as staging:
        save_weights(state, config, staging / WEIGHTS)
        if tokenizer is not None:
            shutil.copyfile(tokenizer.path, staging / "tokenizer.model")
        tokenizer_path = output / "tokenizer.model" if tokenizer is not None else None
        text = train_yaml(config, architecture, hf_dir, output / WEIGHTS, tokenizer_path, num_params)
        (staging / TRAIN_CONFIG).write_text(text)
    return Imported(
        config, architecture, num_params, output / WEIGHTS, output / TRAIN_CONFIG, tokenizer_path, tokenizer_note
    )


def _sentencepiece(path: Path, vocab_size: int) -> tuple[Tokenizer | None, str | None]:
    """The source's SentencePiece tokenizer, or None and why (absent; Llama 3 ships a tiktoken file by that name)."""
    if not path.is_file():
        return None, f"{path.parent} has no tokenizer.model"
    try:
        tokenizer = Tokenizer(str(path), field=str(path.parent))
    except DataError:
        if _is_tiktoken(path):
            return None, f"{path} is a tiktoken BPE file (Llama 3's), not a SentencePiece model"
        raise DataError(
            f"{path}: neither a SentencePiece model nor a tiktoken BPE file (damaged, or not a tokenizer); replace "
            f"it with the model's tokenizer, or remove it to import the weights without one"
        ) from None
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{path}: {tokenizer.vocab_size} pieces, above the model's vocab_size={vocab_size}")
    return tokenizer, None


def _is_tiktoken(path: Path) -> bool:
    """Llama 3's tokenizer.model: lines of ``<base64 token> <rank>``; the first 64 lines are enough to tell."""
    import base64
    import binascii
    import itertools

    try:
        with open(path, encoding="ascii") as handle:
            lines = [line.split() for line in itertools.islice(handle, 64) if line.strip()]
        for token, rank in lines:
            base64.b64decode(token, validate=True)
            int(rank)
    except (OSError, UnicodeDecodeError, ValueError, binascii.Error):
        return False
    return bool(lines)


def train_yaml(
    config: LlamaConfig, architecture: str, source: Path, weights: Path, tokenizer: Path | None, num_params: int
) -> str:
    """A complete ``megatron-adamc train`` config continuing from ``weights``: every model field the weights fix,
    a conservative schedule for continued pretraining, and placeholder data paths (the only edits needed)."""
    model = {"preset": "tiny"}  # every field below overrides the preset, so the preset does not matter
    model.update(config.model_dump(include={
        "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "max_seq_len", "rope_theta",
        "norm_eps", "tie_embeddings", "qk_norm",
    }))  # fmt: skip
    model["n_kv_heads"] = config.kv_heads
    big = num_params > 1e9
    body = {
        "seed": 1234,
        "model": model,
        "checkpoint": {"init_from": str(weights), "interval": 500, "keep": 2},
        "optimizer": {"type": "AdamC", "lr": 1.0e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1.0e-8},
        "scheduler": {"type": "cosine", "warmup_steps": 100, "min_lr": 1.0e-5},
        "train": {
            "steps": 10000,
            "micro_batch_size": 1 if big else 4,
            "grad_accum": 1,
            "seq_len": min(config.max_seq_len, 4096),
            "grad_clip": 1.0,
            "deepspeed": "configs/deepspeed/zero3_bf16.json" if big else "configs/deepspeed/zero1.json",
            "activation_checkpointing": "full" if big else "none",
        },
        "data": {
            "default_corpus": False,
            "train": DATA_PLACEHOLDER,
            "split": "98,2,0",
            "tokenizer": str(tokenizer) if tokenizer else "EDIT/path/to/tokenizer.model",
        },
    }
    tokenizer_note = (
        f"tokenized with {tokenizer}"
        if tokenizer
        else "tokenized with the model's SentencePiece tokenizer (the source had none: set data.tokenizer)"
    )
    header = [
        f"# Continued pretraining of {source.resolve()} ({architecture}, {num_params / 1e6:,.1f}M parameters),",
        "# written by `megatron-adamc import-hf`. The model section matches checkpoint.init_from exactly: keep it.",
        f"# Edit data.train (Megatron indexed prefix, {tokenizer_note}):",
        f"#   megatron-adamc preprocess --input docs.jsonl --tokenizer {tokenizer or 'TOKENIZER.model'} "
        "--output-prefix data/train --append-eod",
        "# Then, from the repository root (train.deepspeed is relative to it), on the GPUs you have:",
        f"#   megatron-adamc train --config {weights.parent / TRAIN_CONFIG} --output-dir runs/continued",
        "# The schedule is a starting point for continued pretraining (peak lr well below pretraining's, short",
        "# warmup); size steps to your token budget (tokens/step = micro_batch_size * grad_accum * GPUs * seq_len).",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False)
