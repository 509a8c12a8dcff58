"""Hugging Face model directories on disk: safetensors weights (one file, or shards with an index), config.json,
and a new output directory that appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_adamc.errors import CheckpointError, UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` (a
    tensor larger than that gets a shard of its own) plus the index HF reads them by. Returns the file names."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / SINGLE, metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        save_file(shard, out_dir / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX]


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors weights, one file or sharded."""
    from safetensors import SafetensorError, safe_open

    if (hf_dir / INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{hf_dir / INDEX}: not a safetensors index ({err})") from None
        files = sorted(set(weight_map.values()))
    elif (hf_dir / SINGLE).is_file():
        files = [SINGLE]
    else:
        found = "pytorch_model.bin (pickle)" if (hf_dir / "pytorch_model.bin").is_file() else "none"
        raise CheckpointError(
            f"{hf_dir}: no {SINGLE} or {INDEX} (found: {found}); save the model with safe_serialization=True"
        )
    tensors: dict[str, torch.Tensor] = {}
    for file_name in files:
        try:
            with safe_open(str(hf_dir / file_name), framework="pt") as handle:
                tensors.update((name, handle.get_tensor(name)) for name in handle.keys())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{hf_dir / file_name}: not a readable safetensors file ({err})") from None
    return tensors


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; pass a Hugging Face model directory (config.json + weights)") from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


@contextlib.contextmanager
def new_output_dir(path: Path, field: str = "--output") -> Iterator[Path]:
    """A staging directory beside ``path``, renamed onto it when the block succeeds and removed when it fails, so
    ``path`` is either complete or absent. ``path`` must not exist, or be an empty directory."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{field} {path}: exists and is not an empty directory; choose a new path")
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        path.rmdir()
    os.replace(staging, path)
