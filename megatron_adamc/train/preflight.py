"""Everything a user can get wrong, checked before any process group, data preparation or write.

``train`` runs it first on every rank and ``slurm submit`` runs it before submitting, so a job never waits in a queue
for hours to fail on a typo. It needs no GPU, no process group and no data preparation. The families it covers, each
by one mechanism (docs/resilience.md): the config and the DeepSpeed JSON (DeepSpeed's own parser), the paths the run
writes (one writability probe, and no two roles on one path), the run directory's own files, the data against its
tokenizer (data/provenance.py), the optional packages the config asks for, and, on the machine that will train
(``local``), the device and the memory the run needs (the planner, plan/fit.py).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from megatron_adamc.config.deepspeed_json import build_deepspeed_config, precision, resolve_global_batch, zero_stage
from megatron_adamc.config.model_shape import model_config
from megatron_adamc.config.train import TrainConfig
from megatron_adamc.data.validate import check_eval_pass, check_split_sizes, parse_split, resolve_split
from megatron_adamc.errors import ConfigError, DataError, UserError
from megatron_adamc.outputs import check_cache_dir, check_output_dir
from megatron_adamc.train.run_dir import check_run_dir

# The default corpus's files: present, the cache may be read-only (prebuilt and shared).
_DEFAULT_CORPUS_FILES = ("tokenizer.model", "train.bin", "train.idx", "valid.bin", "valid.idx")


def check_data_paths(config: TrainConfig) -> Any | None:
    """A custom dataset's prefixes (files intact), split (well-formed, every part large enough, one validation pass
    within it), tokenizer (a SentencePiece model, the one the data was made with); returns that tokenizer.

    The default corpus is built at train time, so only custom data can be checked here (and the default corpus's
    validation pass, once an earlier run built it).
    """
    data = config.data
    if data.split is not None:
        parse_split(data.split)
    per_rank = config.eval.batches * config.train.micro_batch_size  # one rank's validation pass, in samples
    if data.default_corpus:
        valid = os.path.join(os.path.expanduser(data.cache_dir), "valid")
        if os.path.isfile(valid + ".idx") and os.path.isfile(valid + ".bin"):  # built by an earlier run
            check_eval_pass(([], None), ([valid], None), None, config.train.seq_len, per_rank)
        return None
    from megatron_adamc.data.blend import parse_blend
    from megatron_adamc.data.provenance import check_matches_tokenizer
    from megatron_adamc.data.tokenizer import Tokenizer

    train = parse_blend(data.train, "data.train")
    valid = parse_blend(data.valid, "data.valid") if data.valid is not None else None
    split = resolve_split(data.valid, data.split)
    label = f"data.split={split}" + (" (the default without data.valid)" if data.split is None else "")
    check_split_sizes(train[0], valid[0] if valid else None, split, config.train.seq_len, split_label=label)
    check_eval_pass(train, valid, split, config.train.seq_len, per_rank)
    if not Path(os.path.expanduser(data.tokenizer)).is_file():
        raise DataError(
            f"data.tokenizer={data.tokenizer}: no such file; train one with `megatron-adamc tokenizer train`"
        )
    tokenizer = Tokenizer(os.path.expanduser(data.tokenizer), field="data.tokenizer")
    check_matches_tokenizer(train[0], tokenizer, "data.train")
    if valid is not None:
        check_matches_tokenizer(valid[0], tokenizer, "data.valid")
    return tokenizer


def check_paths(config: TrainConfig, run_dir: Path) -> None:
    """The run's folders: each writable (or a complete read-only cache), and no two roles on one folder.

    WHY the collisions: the run directory and a cache are both locked through a ``.lock`` file in them, so one folder
    in both roles waits on itself forever; and a cache inside ``checkpoints/`` would be pruned with them.
    """
    data = config.data
    roles: dict[str, Path] = {"--output-dir": run_dir}
    if data.default_corpus:
        cache = Path(os.path.expanduser(data.cache_dir))
        complete = all((cache / name).is_file() for name in _DEFAULT_CORPUS_FILES)
        check_cache_dir(data.cache_dir, "data.cache_dir", complete=complete)
        roles["data.cache_dir"] = cache
    if data.index_cache_dir is not None:
        check_cache_dir(data.index_cache_dir, "data.index_cache_dir", complete=Path(data.index_cache_dir).is_dir())
        roles["data.index_cache_dir"] = Path(os.path.expanduser(data.index_cache_dir))
    resolved = {role: path.resolve() for role, path in roles.items()}
    names = list(resolved)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if resolved[first] == resolved[second]:
                raise UserError(
                    f"{first} and {second} are the same folder ({roles[first]}); give each its own (both lock "
                    "their folder, so the run would wait on itself)"
                )
    checkpoints = resolved["--output-dir"] / "checkpoints"
    for role, path in resolved.items():
        if role != "--output-dir" and (path == checkpoints or checkpoints in path.parents):
            raise UserError(f"{role}={roles[role]} is inside the run's checkpoints/, which pruning deletes from")


def check_extras(config: TrainConfig) -> None:
    """Optional packages the config asks for are installed (named with the extra that installs them)."""
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.wandb=true needs the wandb package: pip install 'megatron-adamc[wandb]' (then `wandb login`), "
            "or set logging.wandb=false"
        )
    if config.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard, or set "
                          "logging.tensorboard=false")  # fmt: skip


def check_device(ds_config: dict[str, Any]) -> None:
    """What this machine's accelerator cannot do, asked of DeepSpeed's own accelerator (as the engine will)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    kind = precision(ds_config)
    if kind == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError(
            f"train.deepspeed: fp16 is enabled, but this machine's {accelerator.device_name()} accelerator has no "
            "fp16 training; use bf16 (configs/deepspeed/*_bf16.json) or fp32"
        )
    if kind == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError(
            f"train.deepspeed: bf16 is enabled, but this machine's {accelerator.device_name()} accelerator has no "
            "bf16; use fp16 or fp32"
        )


def preflight(config: TrainConfig, run_dir: Path, world_size: int, local: bool = True) -> dict[str, Any]:
    """All checks that need nothing but the config and the file system; returns the DeepSpeed config.

    ``local``: this machine is the one that trains (``train``), so its device and memory are checked too; ``slurm
    submit`` (a login node) passes False.
    """
    check_output_dir(run_dir, "--output-dir")
    check_run_dir(run_dir)
    check_paths(config, run_dir)
    model_config(config)
    resolve_global_batch(config, world_size)  # the config's own consistency before its data
    tokenizer = check_data_paths(config)
    if tokenizer is not None:
        model_config(config, tokenizer.vocab_size)
    ds_config = build_deepspeed_config(config, world_size)  # imports DeepSpeed: after the checks that need none
    if config.train.compile:
        from megatron_adamc.model.parallelize import check_compile

        check_compile(zero_stage(ds_config))
    check_extras(config)
    if local:
        from megatron_adamc.plan.fit import check_fits_here

        check_device(ds_config)
        check_fits_here(config, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return ds_config
