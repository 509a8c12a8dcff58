"""The DeepSpeed JSON below its top level, checked by DeepSpeed's own parser before any process group exists.

WHY: DeepSpeed validates its sections only inside ``deepspeed.initialize``, on every rank, as a pydantic traceback
(``zero_optimization.stage`` 5, a misspelled key inside ``bf16``) or an ``AttributeError`` (``"bf16": true`` where
a section belongs). Here every section with a pydantic model in the installed DeepSpeed is validated with that
model, then the whole JSON with ``DeepSpeedConfig`` (the object the engine builds, cross-section rules included:
fp16 with bf16), and any refusal becomes one line: the key path, what was given and what is allowed. Nothing is
copied from DeepSpeed, so the allowed values follow the installed version. On top, one rule DeepSpeed does not
enforce: ``offload_param`` is a ZeRO-3 feature that stages 0-2 ignore without a word.
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from typing import Any

from megatron_adamc.errors import ConfigError

# section key -> (module, class): DeepSpeed's pydantic model of that section (looked up lazily: DeepSpeed is heavy).
_SECTION_MODELS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "bfloat16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "hybrid_engine": ("deepspeed.runtime.config", "HybridEngineConfig"),
    "tensor_parallel": ("deepspeed.runtime.tensor_parallel.config", "TPTrainingConfig"),
}
# Sections DeepSpeed reads with ``.get`` (a scalar there is an AttributeError deep inside DeepSpeed).
_DICT_SECTIONS = {
    "zero_optimization", "bf16", "bfloat16", "fp16", "amp", "activation_checkpointing", "flops_profiler",
    "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "checkpoint", "data_types", "aio",
    "autotuning", "compile", "hybrid_engine", "tensor_parallel", "pipeline", "curriculum_learning",
    "data_efficiency", "compression_training", "nebula", "elasticity", "sparse_attention", "eigenvalue",
    "progressive_layer_drop", "timers",
}  # fmt: skip


def _model(section: str) -> Any | None:
    import importlib

    module, name = _SECTION_MODELS[section]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # another DeepSpeed version: DeepSpeedConfig below still checks it
        return None


def validate_sections(ds: dict[str, Any], path: str) -> None:
    """Raise one ConfigError for the first thing DeepSpeed would refuse in ``ds`` (or ignore, for offload_param)."""
    from pydantic import ValidationError

    where = f"train.deepspeed={path}"
    for key, value in ds.items():
        if key in _DICT_SECTIONS and not isinstance(value, dict):
            raise ConfigError(
                f'{where}: {key} must be an object (a section such as {{"enabled": true}} or {{"stage": 1}}), '
                f"not {json_text(value)}"
            )
    for key in _SECTION_MODELS:
        if key not in ds:
            continue
        model = _model(key)
        if model is None:
            continue
        try:
            model(**ds[key])
        except ValidationError as err:
            raise ConfigError(f"{where}: {describe(err, key, model)}") from None
        except (ValueError, TypeError, AssertionError) as err:
            raise ConfigError(f"{where}: {key}: {_first_line(err)}") from None
    _check_offload(ds, where)
    _check_with_deepspeed(ds, where)


def _check_offload(ds: dict[str, Any], where: str) -> None:
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    param = zero.get("offload_param") or {}
    if param.get("device", "none") not in ("none", None) and stage != 3:
        raise ConfigError(
            f"{where}: zero_optimization.offload_param is a ZeRO-3 feature and stage {stage} ignores it: set "
            "zero_optimization.stage to 3 or remove offload_param (offload_optimizer works from stage 1)"
        )


def _check_with_deepspeed(ds: dict[str, Any], where: str) -> None:
    """The whole JSON through ``DeepSpeedConfig``, as the engine parses it (it needs no process group)."""
    from pydantic import ValidationError

    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:  # pragma: no cover - DeepSpeed is a dependency
        return
    try:
        DeepSpeedConfig(dict(ds))
    except ValidationError as err:
        section = _section_of(err, ds)
        raise ConfigError(f"{where}: {describe(err, section, None)}") from None
    except (ValueError, TypeError, KeyError, AssertionError, AttributeError) as err:
        raise ConfigError(f"{where}: DeepSpeed refuses it: {_first_line(err)}") from None


def _section_of(err: Any, ds: dict[str, Any]) -> str | None:
    """The top-level key a ValidationError of DeepSpeedConfig belongs to: the section holding its key path."""
    loc = err.errors()[0]["loc"]
    for key, value in ds.items():
        node: Any = value
        for part in loc:
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                break
        else:
            return key
    return None


def describe(err: Any, section: str | None, model: Any | None) -> str:
    """pydantic's first error as ``section.key.path: <given> is not one of <allowed>`` (or its own message)."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    name = ".".join([section, *loc] if section else loc) or (section or "")
    given = first.get("input")
    kind = first["type"]
    if kind == "extra_forbidden":
        known = _field_names(model, loc[:-1]) if model is not None else []
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}" if known else ""
        return f"{name}: unknown key{f' ({hint})' if hint else ''}; DeepSpeed refuses it"
    if kind in ("enum", "literal_error") and "expected" in first.get("ctx", {}):
        allowed = _allowed(first["ctx"]["expected"])
        return f"{name}: {json_text(given)} is not one of {', '.join(allowed)}"
    if kind in ("model_type", "dict_type"):
        return f"{name}: must be an object (a section), not {json_text(given)}"
    message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if message.startswith(name):  # DeepSpeed's own messages often name the key already
        return f"{message} (got {json_text(given)})"
    return f"{name}: {message} (got {json_text(given)})"


def _allowed(expected: str) -> list[str]:
    """pydantic's "'none', 'cpu' or 'nvme'" (or "0, 1, 2, 3 or 3") as unique plain values."""
    parts = re.split(r", | or ", expected)
    return list(dict.fromkeys(p.strip().strip("'") for p in parts if p.strip()))


def _field_names(model: Any, path: list[str]) -> list[str]:
    """Keys (names and aliases) the model accepts at ``path`` inside it."""
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = _submodel(field.annotation)
        if model is None:
            return []
    names = []
    for name, field in getattr(model, "model_fields", {}).items():
        names.append(name)
        if field.alias:
            names.append(field.alias)
    return names


@functools.cache
def _submodel(annotation: Any) -> Any | None:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def json_text(value: Any) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
