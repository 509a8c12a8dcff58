"""The DeepSpeed JSON of a run: the user's file (ZeRO stage, offload, precision) completed from the train config.

The train config owns batch sizes, clipping and the optimizer, so the two cannot disagree silently: a JSON value that
contradicts the train config is an error naming both keys. Below the top level the JSON goes through DeepSpeed's own
parser (its pydantic section models, then ``DeepSpeedConfig`` as the engine would build it), in preflight, before
any process group: a wrong value or a misspelled key anywhere is one line naming its key path and what is allowed,
instead of a traceback on every rank (``deepspeed_sections.py``).
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any

from megatron_adamc.config.deepspeed_sections import validate_sections
from megatron_adamc.config.train import TrainConfig
from megatron_adamc.errors import ConfigError, UserError

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
        data = json.loads(file.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as err:
        raise UserError(f"train.deepspeed={path}: not UTF-8 text (offset {err.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise UserError(f"train.deepspeed={path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except _DuplicateKey as err:
        raise UserError(f"train.deepspeed={path}: key '{err}' is given twice in one object; keep one") from None
    if not isinstance(data, dict):
        raise UserError(f"train.deepspeed={path}: the top level must be an object")
    return data


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice is an error (json keeps the last; DeepSpeed's own loader refuses it)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


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


def resolve_global_batch(config: TrainConfig, world_size: int) -> None:
    """With ``train.global_batch_size`` set, derive ``train.grad_accum`` for ``world_size`` ranks (in place), or refuse
    a rank count that cannot divide it, naming counts and batches that would."""
    tc = config.train
    want = tc.global_batch_size
    if want is None:
        return
    per_step = tc.micro_batch_size * world_size
    if "grad_accum" in tc.model_fields_set and tc.micro_batch_size * tc.grad_accum * world_size != want:
        raise ConfigError(
            f"train.global_batch_size={want} contradicts train.micro_batch_size={tc.micro_batch_size} x "
            f"train.grad_accum={tc.grad_accum} x {world_size} rank(s) = {per_step * tc.grad_accum}; drop "
            "train.grad_accum (it follows from the global batch)"
        )
    if want % per_step:
        ranks = [n for n in range(1, want // tc.micro_batch_size + 1) if want % (n * tc.micro_batch_size) == 0]
        near = sorted(ranks, key=lambda n: abs(n - world_size))[:2]
        lower, upper = want // per_step * per_step, (want // per_step + 1) * per_step
        batches = " or ".join(str(b) for b in (lower, upper) if b > 0)
        raise ConfigError(
            f"train.global_batch_size={want} cannot be split over {world_size} rank(s) with "
            f"train.micro_batch_size={tc.micro_batch_size} ({want} is not a multiple of {per_step}): use "
            f"{' or '.join(map(str, sorted(near)))} ranks, or a global batch of {batches}"
        )
    tc.grad_accum = want // per_step


def build_deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON completed from ``config`` for ``world_size`` ranks (``train.grad_accum`` is resolved in
    ``config`` first when ``train.global_batch_size`` is set); every section checked by DeepSpeed's parser."""
    resolve_global_batch(config, world_size)
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
                f"world size = {want}; drop train_batch_size from the JSON (to fix the global batch whatever the "
                "rank count, set train.global_batch_size instead)"
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
    validate_sections(ds, path)
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict[str, Any]) -> str:
    if ds.get("bf16", ds.get("bfloat16", {})).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
