"""The DeepSpeed JSON of a run: the user's file (ZeRO stage, offload, precision) completed from the train config.

The train config owns batch sizes, clipping and the optimizer, so the two cannot disagree silently: a JSON value that
contradicts the train config is an error naming both keys.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any

from megatron_adamc.errors import ConfigError, UserError
from megatron_adamc.train.config import TrainConfig

# Top-level sections DeepSpeed reads outside DeepSpeedConfig's constructor (engine, activation checkpointing,
# profiler, async I/O, autotuning), which the recorder in ``known_top_level_keys`` cannot see.
_READ_ELSEWHERE = {"optimizer", "scheduler", "activation_checkpointing", "flops_profiler", "aio", "autotuning"}

# DeepSpeed JSON key -> (train config key, value)
_OWNED = {
    "train_micro_batch_size_per_gpu": ("train.micro_batch_size", lambda c: c.train.micro_batch_size),
    "gradient_accumulation_steps": ("train.grad_accum", lambda c: c.train.grad_accum),
    "gradient_clipping": ("train.grad_clip", lambda c: c.train.grad_clip),
}


def read_deepspeed_json(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"train.deepspeed={path}: no such file; point it at one of configs/deepspeed/*.json")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"train.deepspeed={path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"train.deepspeed={path}: the top level must be an object")
    return data


@functools.cache
def known_top_level_keys() -> frozenset[str]:
    """Every top-level key this DeepSpeed version looks up: its own config parser is run on a dict that records
    each key asked for, so the list follows the installed DeepSpeed instead of a copy that goes stale."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recorder(dict):
        def get(self, key: Any, default: Any = None) -> Any:
            seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key: Any) -> Any:
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key: object) -> bool:
            seen.add(key)  # type: ignore[arg-type]
            return super().__contains__(key)

    DeepSpeedConfig(Recorder(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1))
    return frozenset(k for k in seen if isinstance(k, str)) | _READ_ELSEWHERE


def check_top_level_keys(ds: dict[str, Any], path: str) -> None:
    """DeepSpeed ignores a top-level key it does not know: a typo such as ``zero_optimisation`` trains at ZeRO 0."""
    known = known_top_level_keys()
    for key in ds:
        if key in known or key.startswith("_"):  # "_comment"-style keys are a JSON convention
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see the DeepSpeed config reference"
        raise ConfigError(f"train.deepspeed={path}: unknown top-level key '{key}' ({hint}); DeepSpeed would ignore it")


def build_deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    path = config.train.deepspeed
    ds = read_deepspeed_json(path)
    check_top_level_keys(ds, path)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(f"train.deepspeed={path}: remove its '{key}' section; the train config's {key}.* owns it")
    for key, (ours, value) in _OWNED.items():
        want = value(config)
        if key in ds and ds[key] != "auto" and ds[key] != want:
            raise UserError(
                f"{path}: {key}={ds[key]} contradicts {ours}={want}; make them equal or drop it from the JSON"
            )
        ds[key] = want
    if "train_batch_size" in ds and ds["train_batch_size"] != "auto":
        want = config.train.micro_batch_size * config.train.grad_accum * world_size
        if ds["train_batch_size"] != want:
            raise UserError(
                f"{path}: train_batch_size={ds['train_batch_size']} contradicts micro_batch_size x grad_accum x "
                f"world size = {want}; drop train_batch_size from the JSON"
            )
    ds.pop("train_batch_size", None)
    opt = config.optimizer
    params: dict[str, Any] = {"lr": opt.lr, "weight_decay": opt.weight_decay, "betas": list(opt.betas), "eps": opt.eps}
    if opt.type == "AdamC" and opt.lr_max is not None:
        params["lr_max"] = opt.lr_max
    if opt.torch_adam:
        params["torch_adam"] = True
    ds["optimizer"] = {"type": opt.type, "params": params}
    ds.setdefault("steps_per_print", 10**9)  # the trainer prints its own progress
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict[str, Any]) -> str:
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
