"""The usual decay / no-decay split, so nobody writes it by hand: the project's one rule (``undecayed``).

Weights of two or more dimensions are decayed; biases, norm gains and other 1-D tensors are not. Embeddings
(``nn.Embedding`` weights) can be excluded as well, as some recipes do. The trainer's groups, ``decay_param_groups``
and the ``"decay_split"`` of DeepSpeed's optimizer build (HF Trainer, Accelerate) all apply this rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def undecayed(name: str, ndim: int, embedding: bool = False) -> bool:
    """No weight decay for 1-D tensors (norm gains, biases), anything named ``*bias``, and excluded embeddings."""
    return ndim < 2 or name.endswith("bias") or embedding


def decay_param_groups(
    model: nn.Module,
    weight_decay: float | None = None,
    exclude_embeddings: bool = False,
    adamc_exclude: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Two param groups, ``decay`` and ``no_decay`` (empty groups are dropped), and with ``adamc_exclude`` a third,
    ``decay_plain``: the decayed parameters those patterns match (``core.exclude``), marked ``adamc: False`` (they
    keep AdamW's plain decay under AdamC).

    ``weight_decay``: the decay group's lambda; None leaves it to the optimizer's default (the DeepSpeed JSON).
    The no-decay group always gets weight_decay 0, so AdamC leaves it alone.
    """
    embedding_ids = set()
    if exclude_embeddings:
        embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if undecayed(name, param.ndim, id(param) in embedding_ids):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    groups: list[dict[str, Any]] = []
    if decay:
        group: dict[str, Any] = {"params": decay, "name": "decay"}
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    if no_decay:
        groups.append({"params": no_decay, "name": "no_decay", "weight_decay": 0.0})
    return _split_adamc_excluded(model, groups, adamc_exclude) if adamc_exclude else groups


def _split_adamc_excluded(model: nn.Module, groups: list[dict], patterns: Sequence[str]) -> list[dict]:
    """Decayed params matching ``optimizer.adamc_exclude`` move to a copy of their group marked ``adamc: False``."""
    from megatron_adamc.core.decay import AdamCError
    from megatron_adamc.core.exclude import parse_exclude, pattern_matches

    patterns = list(parse_exclude(patterns, "optimizer.adamc_exclude"))
    if not patterns:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}
    hit = {id(p) for p in model.parameters() if any(pattern_matches(x, names[id(p)]) for x in patterns)}
    if not hit:
        raise AdamCError(f"optimizer.adamc_exclude {patterns} matched no parameter: give module names such as output")
    out = []
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in hit or group.get("weight_decay", 1.0) == 0.0]
        moved = [p for p in group["params"] if id(p) in hit and group.get("weight_decay", 1.0) != 0.0]
        out += [{**group, "params": kept}] if kept else []
        if moved:
            out.append({**group, "params": moved, "name": f"{group.get('name', 'group')}_plain", "adamc": False})
    return out


def count_params(groups: list[dict[str, Any]]) -> int:
    return sum(p.numel() for g in groups for p in g["params"] if isinstance(p, torch.Tensor))
