"""The project's weight file: one safetensors file of a ``Llama``'s state dict plus its ``LlamaConfig``.

It is what ``megatron-adamc import-hf`` writes and what ``checkpoint.init_from`` reads. The config rides in the
file's metadata, so a mismatch is named by field (``n_layers``) rather than by a tensor shape, and loading is
strict: every tensor the model has must be in the file with its shape, and nothing else may be.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from megatron_adamc.errors import CheckpointError
from megatron_adamc.files import atomic_path
from megatron_adamc.model.config import LlamaConfig

FORMAT = "megatron-adamc-llama"
# LlamaConfig fields that decide which tensors exist and their shapes: a difference is an error.
SHAPE_FIELDS = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings",
    "qk_norm", "qkv_norm", "post_proj_norm", "post_fc2_norm", "embedding_norm",
)  # fmt: skip
# Fields that change the forward but not the tensors: reported, since they may differ on purpose (a longer
# max_seq_len or larger rope_theta for long-context continued pretraining). init, init_std and z_loss act in
# training only.
FUNCTION_FIELDS = ("max_seq_len", "rope_theta", "norm_eps", "softmax_cap", "embedding_scale")


def save_weights(state: Mapping[str, torch.Tensor], config: LlamaConfig, path: str | os.PathLike) -> None:
    """Write ``state`` (project names, e.g. ``layers.0.attn.qkv.weight``) and ``config``; atomic: a failed write
    leaves any earlier file at ``path`` as it was."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    metadata = {"format": FORMAT, "llama_config": config.model_dump_json()}
    with atomic_path(os.fspath(path)) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def read_weights(path: str | os.PathLike, field: str = "checkpoint.init_from") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the config dict stored with them ({} for a safetensors file without one)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{field}={path}: no such file; pass the model.safetensors that import-hf wrote")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{field}={path}: not a readable safetensors file ({err})") from None
    config = json.loads(metadata["llama_config"]) if "llama_config" in metadata else {}
    return tensors, config


def load_weights(model: nn.Module, path: str | os.PathLike, field: str = "checkpoint.init_from") -> dict[str, Any]:
    """Copy the file's tensors into ``model`` (cast to each parameter's dtype and device), strictly.

    Returns the ``FUNCTION_FIELDS`` where the file and the model differ, ``{field: (file, model)}``, for the
    caller to log (the weights load either way). Raises ``CheckpointError`` with one line naming the field,
    tensor or shape that does not match; the model is untouched then.
    """
    tensors, stored = read_weights(path, field)
    config = getattr(model, "config", None)
    differences: dict[str, Any] = {}
    if stored and isinstance(config, LlamaConfig):
        ours = config.model_dump()
        for name in SHAPE_FIELDS:
            if name in stored and stored[name] != ours[name]:
                raise CheckpointError(
                    f"{field}={path}: made for model.{name}={stored[name]}, this model has {ours[name]}: "
                    f"set --set model.{name}={json.dumps(stored[name])} (the train.yaml import-hf wrote has them all)"
                )
        differences = {k: (stored[k], ours[k]) for k in FUNCTION_FIELDS if k in stored and stored[k] != ours[k]}
    expected = model.state_dict()
    check_tensors(tensors, expected, f"{field}={path}")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])
    return differences


def check_tensors(found: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """The same names and shapes as ``expected`` (a model's state dict, meta tensors will do), or one line saying
    what differs: a file made for another config must fail before anything is copied."""
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise CheckpointError(f"{what}: {'; '.join(parts)}: the file was made for another model config")
    for name, target in expected.items():
        if tuple(found[name].shape) != tuple(target.shape):
            raise CheckpointError(
                f"{what}: {name} has shape {tuple(found[name].shape)}, the model wants {tuple(target.shape)}: "
                f"the file was made for another model config"
            )
        if not found[name].is_floating_point():
            raise CheckpointError(f"{what}: {name} is {found[name].dtype}, not a floating-point tensor")


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
