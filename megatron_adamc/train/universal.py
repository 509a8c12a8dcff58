"""Resume on another number of ranks: DeepSpeed's universal checkpoint, converted automatically.

A ZeRO checkpoint is partitioned by the data-parallel world size it was saved with; loading it on another is a
``ZeRORuntimeException``. DeepSpeed's answer is the universal checkpoint (``ds_to_universal``: per-parameter fp32
weights and optimizer states, any ZeRO stage), loaded with ``checkpoint.load_universal``. Here rank 0 converts
``step_N`` into ``step_N_universal`` (built under a temporary name and renamed when complete, so a kill never leaves
a half conversion that looks usable), and only the invocation that changes the world size loads it; its next save
is an ordinary checkpoint again, so the flag never leaks into a later resume.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_adamc.errors import CheckpointError
from megatron_adamc.train.checkpointer import UNIVERSAL_SUFFIX


def universal_tag(tag: str) -> str:
    return f"{tag}{UNIVERSAL_SUFFIX}"


def convert(ckpt_dir: Path, tag: str, log=print) -> str:
    """Rank 0 converts (once; a finished conversion is reused), every rank waits; returns the universal tag."""
    out = ckpt_dir / universal_tag(tag)
    error = None
    if dist.get_rank() == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = ckpt_dir / f".{out.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(ckpt_dir / tag), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        log(f"converting {ckpt_dir / tag} to a universal checkpoint for the new world size")
        try:
            quiet = io.StringIO()  # ds_to_universal prints every tensor it touches, and progress bars
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                ds_to_universal.main(args)
            # DeepSpeed's loader reads the model states of the tag it is given: keep them beside the fragments.
            for state in (ckpt_dir / tag).glob("mp_rank_*_model_states.pt"):
                if not (tmp / state.name).exists():
                    shutil.copy2(state, tmp / state.name)
            tmp.rename(out)
        except Exception as err:  # noqa: BLE001 - reported to every rank as one line
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"converting {ckpt_dir / tag} to a universal checkpoint failed: {type(err).__name__}: {err}"
    box = [error]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(f"{box[0]}; resume on the world size it was saved with")
    return out.name


# DeepSpeed 0.19.8's ZeRO-3 universal load has two bugs (both worth reporting upstream), repaired around the load:
# ``load_hp_checkpoint_state_from_checkpoint_dir_stage3`` copies param group 0's hyperparameters into EVERY group
# (no-decay groups would be decayed from then on), and gives every sub-group's state the SAME ``step`` tensor, which
# torch's Adam increments in place (each step would count once per sub-group).
def groups_as_built(engine: Any) -> list[tuple[bool, str | None]]:
    """Before a load: whether each param group is decayed, and its name, as the engine was built."""
    return [(g["weight_decay"] > 0, g.get("name")) for g in engine.optimizer.param_groups]


def repair_after_load(engine: Any) -> None:
    """After a load: one ``step`` tensor per sub-group, as a fresh optimizer has. (The groups' hyperparameters are
    rewritten from the config by the trainer, with ``groups_as_built``.)"""
    import torch

    from megatron_adamc.train.build import base_optimizer

    for opt_state in base_optimizer(engine).state.values():
        if isinstance(opt_state.get("step"), torch.Tensor):
            opt_state["step"] = opt_state["step"].clone()
