"""The trainer's one config: a YAML file validated by pydantic, plus ``--set key=value`` overrides.

Unknown or mistyped keys are errors that name the key, so a typo can never silently train the default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from megatron_adamc.errors import UserError
from megatron_adamc.resources import find_file
from megatron_adamc.tracking.config import TrackingConfig


class _Section(BaseModel):
    # No NaN or infinity anywhere: a value of .inf (YAML) must not become a loop bound or a ratio.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(BaseModel):
    """``preset`` plus any LlamaConfig field as an override; checked against LlamaConfig when the model is built."""

    model_config = ConfigDict(extra="allow")

    preset: str = "tiny"

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerSection(_Section):
    """Validated up front for AdamW as for AdamC: an infinite lr or a beta of 1 must not reach the first step."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["AdamC", "AdamW"] = "AdamC"
    lr: float = Field(3e-3, gt=0, description="the peak lr; the schedule multiplies it")
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    lr_max: float | None = Field(None, gt=0, description="AdamC's lr_max; default: optimizer.lr, the schedule's peak")
    exclude_embeddings_from_decay: bool = False
    adamc_exclude: list[str] = Field(
        default_factory=list,
        description="module paths or globs whose params keep AdamW's plain decay under AdamC (their group gets "
        "adamc: false), e.g. ['output']: Defazio 2025 leaves the output layer uncorrected; [] corrects every group",
    )
    torch_adam: bool = False

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimizerSection:
        for index, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ValueError(f"optimizer.betas[{index}]={beta} must be in [0, 1), e.g. [0.9, 0.95]")
        return self


class SchedulerSection(_Section):
    type: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the final fraction of steps that decays")


class TrainSection(_Section):
    """The loop itself: how long, how big a batch, and what the loop does to each step."""

    steps: int = Field(300, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    global_batch_size: int | None = Field(
        None, gt=0, description="samples per optimizer step over all ranks; when set, grad_accum follows from it "
        "(global / (micro batch x ranks)) and a rank count that cannot divide it is refused",
    )  # fmt: skip
    seq_len: int = Field(256, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off")
    deepspeed: str = Field("configs/deepspeed/zero1.json", description="DeepSpeed JSON: ZeRO stage, precision")
    stop_at_step: int | None = Field(
        None, gt=0, description="end this invocation after this step (checkpointed); the schedule still spans steps"
    )
    max_bad_steps: int = Field(
        3, gt=0, description="consecutive non-finite (or spike-skipped) steps before the run stops as diverged"
    )
    spike_skip_ratio: float | None = Field(
        None, gt=1, description="skip the update when the loss exceeds this ratio of its running mean (off: null)"
    )
    spike_skip_window: int = Field(50, gt=1, description="good losses in the running mean spike_skip_ratio compares to")
    max_weight_growth: float | None = Field(
        100.0, gt=1, description="refuse to save (exit 3) weights whose norm grew more than this factor since the last "
        "checkpoint (or the start): an lr blow-up with a finite loss; null turns it off",
    )  # fmt: skip
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none",
        description="full: recompute every block; selective: keep matmul and attention outputs, recompute the cheap "
        "ops between them (see docs/model.md)",
    )
    compile: bool = Field(False, description="torch.compile each transformer block")


class CheckpointSection(_Section):
    interval: int = Field(100, gt=0, description="save every this many steps (and at the end, and on preemption)")
    keep: int = Field(2, gt=0, description="verified checkpoints kept; older ones are pruned")
    init_from: str | None = Field(
        None, description="weights (safetensors, e.g. from `megatron-adamc import-hf`) a fresh run starts from"
    )


class EvalSection(_Section):
    interval: int = Field(100, gt=0, description="validation every this many steps (and at the last)")
    batches: int = Field(8, gt=0, description="micro batches per rank in one validation pass")
    full_split: bool = Field(
        False,
        description="evaluate every token of the validation split instead (documents in file order, the same windows "
        "for every seed; ignores batches)",
    )


class DataSection(_Section):
    """Either the embedded default corpus (``default_corpus: true``) or Megatron indexed datasets."""

    default_corpus: bool = True
    cache_dir: str = "~/.cache/megatron-adamc/default-corpus"
    vocab_size: int = Field(4096, gt=0, description="default corpus: the tokenizer's vocabulary")
    max_bytes: int = Field(8_000_000, gt=0, description="default corpus: bytes of stdlib source to use")
    train: str | list[Any] | None = Field(None, description="indexed-dataset prefix, or a blend [w1, p1, w2, p2, ...]")
    valid: str | list[Any] | None = None
    split: str | None = Field(None, description='e.g. "98,2,0": validation drawn from data.train')
    tokenizer: str | None = Field(None, description="SentencePiece .model matching data.train")
    index_cache_dir: str | None = None
    num_workers: int = Field(1, ge=0, description="background loader processes (0: batches built on the main thread)")
    prefetch_factor: int = Field(4, gt=0, description="micro batches each loader worker keeps ready")

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if not self.default_corpus and (self.train is None or self.tokenizer is None):
            raise ValueError("data.train and data.tokenizer are required when data.default_corpus is false")
        return self


class LoggingSection(_Section):
    interval: int = Field(1, gt=0, description="write metrics every this many steps (evaluations always)")
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron-adamc"
    progress: bool = True


class TrainConfig(_Section):
    seed: int = Field(1234, ge=0, le=2**32 - 1, description="numpy's seed range: 0 .. 2**32-1")
    model: ModelSection = ModelSection()
    optimizer: OptimizerSection = OptimizerSection()
    scheduler: SchedulerSection = SchedulerSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    data: DataSection = DataSection()
    tracking: TrackingConfig = TrackingConfig()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainConfig:
        if self.scheduler.warmup_steps >= self.train.steps:
            raise ValueError(
                f"scheduler.warmup_steps={self.scheduler.warmup_steps} must be below train.steps={self.train.steps}"
            )
        if self.scheduler.min_lr > self.optimizer.lr:
            raise ValueError(f"scheduler.min_lr={self.scheduler.min_lr} is above optimizer.lr={self.optimizer.lr}")
        return self


def one_line(err: ValidationError) -> str:
    """pydantic's first error as ``key.path: message``, the fix included where pydantic gives it."""
    first = err.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key: check its spelling against configs/train/llama_tiny.yaml"
    elif first["type"].startswith("literal_error"):
        msg = f"{msg} (got {first['input']!r})"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise UserError(
                    f"{key_node.start_mark.name}: key '{key}' is given twice (lines {seen[key]} and {line}); "
                    "keep one of them"
                )
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text with duplicate keys refused; a syntax error is one UserError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_loader(source))  # noqa: S506 - _StrictLoader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{source}: not valid YAML ({problem}{where})") from None


def _loader(source: str) -> Any:
    def make(stream: str) -> _StrictLoader:
        loader = _StrictLoader(stream)
        loader.name = source
        return loader

    return make


def read_text_file(path: Path, field: str) -> str:
    """A config file's text: UTF-8, no NUL bytes; else one UserError (a binary file, a latin-1 export)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise UserError(f"{field} {path}: a binary file, not YAML text; pass a .yaml file such as "
                        "configs/train/llama_tiny.yaml")  # fmt: skip
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{field} {path}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); save it as UTF-8"
        ) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b.c=value`` (value parsed as YAML) into the nested dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
        node = raw
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"--set {item!r}: {key!r} has an empty part; write section.key=value")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(value, f"--set {key}") if value != "" else None
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
    given = path
    path = find_file(path)
    if path.is_dir():
        raise UserError(f"--config {given}: is a folder; pass a YAML file such as configs/train/llama_tiny.yaml")
    if not path.is_file():
        raise UserError(f"--config {path}: no such file; pass a YAML file such as configs/train/llama_tiny.yaml")
    raw = parse_yaml(read_text_file(path, "--config"), str(path))
    if raw is None or raw == {}:
        raise UserError(f"--config {path}: the config is empty (no settings, only comments or blank lines); "
                        "start from configs/train/llama_tiny.yaml")  # fmt: skip
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = TrainConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"config: {one_line(err)}") from None
    config.train.deepspeed = resolve_relative(config.train.deepspeed, path.parent)
    return config


def resolve_relative(value: str, config_dir: Path) -> str:
    """A path as given from the working directory, else relative to the config file's folder, else (``configs/...``)
    the copy shipped in the package."""
    candidate = Path(os.path.expanduser(value))
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    beside = config_dir / candidate
    return str(beside) if beside.exists() else str(find_file(candidate))
