"""Full fp32 weights from one DeepSpeed checkpoint tag, whatever the ZeRO stage, offload or data-parallel size.

ZeRO 1-3 (and the bf16 optimizer) keep the fp32 master weights as flat partitions in ``*_optim_states.pt``;
DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` joins them. Only its script form imports huggingface_hub
(for sharded saving), not the function, so nothing outside the project's dependencies is needed. ZeRO 0 has no
partitions: an fp32 run's ``mp_rank_00_model_states.pt`` holds the weights themselves, a bf16/fp16 run's holds
low-precision weights beside the fp32 masters of its optimizer wrapper, which are unflattened here by param group.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from megatron_adamc.errors import CheckpointError
from megatron_adamc.param_groups import decay_param_groups

MODEL_STATES = "mp_rank_00_model_states.pt"
_READ_ERRORS = (OSError, ValueError, KeyError, IndexError, RuntimeError, EOFError, pickle.UnpicklingError)


def consolidate_fp32(
    tag_dir: str | Path, group_names: Sequence[Sequence[str]] | None = None
) -> dict[str, torch.Tensor]:
    """``{name: fp32 tensor}`` of the model in ``tag_dir`` (e.g. ``RUN/checkpoints/step_100``).

    ``group_names``: the parameter names of each optimizer param group, in order (``group_names(model)``); needed
    only for a ZeRO-0 bf16/fp16 checkpoint, whose fp32 masters are stored by group without names. Reads only.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such checkpoint directory")
    try:
        if any(tag_dir.glob("*_optim_states.pt")):
            return _zero_partitions(tag_dir)
        if (tag_dir / MODEL_STATES).is_file():
            return _stage0(tag_dir, group_names)
    except _READ_ERRORS as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{tag_dir}: not a complete DeepSpeed checkpoint ({reason})") from None
    raise CheckpointError(f"{tag_dir}: no DeepSpeed checkpoint files ({MODEL_STATES} or *_optim_states.pt)")


def group_names(
    model: nn.Module, exclude_embeddings: bool = False, adamc_exclude: Sequence[str] = ()
) -> list[list[str]]:
    """The parameter names of each param group the trainer builds (``decay_param_groups``), in order."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = decay_param_groups(model, exclude_embeddings=exclude_embeddings, adamc_exclude=adamc_exclude)
    return [[names[id(p)] for p in group["params"]] for group in groups]


def _zero_partitions(tag_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()  # it prints a line per stage and a progress bar
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {name: t.detach().float() for name, t in state.items()}  # views of the joined partitions


def _stage0(tag_dir: Path, group_names: Sequence[Sequence[str]] | None) -> dict[str, torch.Tensor]:
    states = torch.load(tag_dir / MODEL_STATES, map_location="cpu", weights_only=False)
    module: dict[str, torch.Tensor] = states["module"]
    optimizer = states.get("optimizer") or {}
    if "fp32_groups_flat" in optimizer:  # FP16_Optimizer (fused): one flat fp32 vector per group
        groups = _by_group(optimizer["fp32_groups_flat"], group_names)
        masters = [_unflatten(flat, names, module) for flat, names in groups]
    elif "fp32_groups" in optimizer:  # FP16_UnfusedOptimizer: a list of fp32 tensors per group
        groups = _by_group(optimizer["fp32_groups"], group_names)
        masters = [dict(zip(names, group, strict=True)) for group, names in groups]
    else:  # fp32 training: the module's weights are the masters
        low = sorted(name for name, t in module.items() if t.is_floating_point() and t.dtype != torch.float32)
        if low:
            raise CheckpointError(f"{tag_dir}: {low[0]} is {module[low[0]].dtype} and no fp32 masters are stored")
        return {name: t.clone() for name, t in module.items()}
    state = {name: t.float() for group in masters for name, t in group.items()}
    missing = sorted(module.keys() - state.keys())
    if missing:
        raise CheckpointError(f"{tag_dir}: no fp32 master weight for {missing[0]}: the param groups do not match")
    for name, master in state.items():  # the low-precision weights are the masters rounded: a wrong order shows
        if master.shape != module[name].shape or not torch.equal(master.to(module[name].dtype), module[name]):
            raise CheckpointError(f"{tag_dir}: the fp32 master of {name} does not round to its stored weight")
    return state


def _by_group(groups: list, group_names: Sequence[Sequence[str]] | None) -> list:
    if group_names is None or len(group_names) != len(groups):
        have = "no" if group_names is None else len(group_names)
        raise CheckpointError(f"ZeRO-0 checkpoint with {len(groups)} fp32 param groups, {have} group name lists given")
    return list(zip(groups, group_names, strict=True))


def _unflatten(flat: torch.Tensor, names: Sequence[str], module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in names:
        n = module[name].numel()
        out[name] = flat[offset : offset + n].view(module[name].shape)
        offset += n
    if offset != flat.numel():
        raise CheckpointError(f"a flat fp32 group holds {flat.numel()} values, its parameters {offset}")
    return out
