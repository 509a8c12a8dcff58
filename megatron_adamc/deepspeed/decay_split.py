"""``"decay_split"`` in ``optimizer.params``: the decay / no-decay split, done inside DeepSpeed's optimizer build.

HF Trainer and Accelerate hand DeepSpeed ONE param group holding every parameter when the DeepSpeed JSON has an
``optimizer`` section, so biases and norm gains are decayed like the weight matrices. With ``"decay_split": true``
every group whose weight decay is > 0 is split in two: tensors of two or more dimensions keep the group's decay;
1-D tensors (norm gains, biases) and tensors named ``*bias`` go to a copy of the group with weight_decay 0, which
AdamC leaves alone. ``"decay_split": "exclude_embeddings"`` moves ``nn.Embedding`` weights there too (and an LM head
tied to them, being the same tensor). The rule is ``decay_param_groups``'s; groups a caller already split come out
unchanged. The dimensions are read from ``ds_shape`` when ZeRO-3's ``zero.Init`` has already partitioned a parameter
(its own tensor is then an empty slice).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from megatron_adamc.core.decay import AdamCError
from megatron_adamc.param_groups import undecayed as undecayed_by_rule

PARAM = "decay_split"
EXCLUDE_EMBEDDINGS = "exclude_embeddings"


def decay_split_mode(value: Any) -> str | None:
    """None (off), "1d" or "1d+embeddings"; anything else is refused with the field's name."""
    if value is False or value is None:
        return None
    if value is True:
        return "1d"
    if value == EXCLUDE_EMBEDDINGS:
        return "1d+embeddings"
    raise AdamCError(
        f'optimizer.params.{PARAM} must be true, false or "{EXCLUDE_EMBEDDINGS}" (got {value!r}): '
        "true keeps biases and 1-D tensors undecayed"
    )


def _true_ndim(param: Any) -> int:
    return len(getattr(param, "ds_shape", param.shape))


def split_param_groups(
    module: nn.Module, model_parameters: Any, mode: str, default_weight_decay: float
) -> tuple[list[dict[str, Any]], list[int]]:
    """The split groups, and for each the index of the caller's group it came from (for per-group settings)."""
    items = list(model_parameters)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    names = {id(p): name for name, p in module.named_parameters()}
    embeddings = set()
    if mode == "1d+embeddings":
        embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}

    def undecayed(p: Any) -> bool:
        return undecayed_by_rule(names.get(id(p), ""), _true_ndim(p), id(p) in embeddings)

    out: list[dict[str, Any]] = []
    origin: list[int] = []
    for index, group in enumerate(groups):
        params = list(group["params"])
        keep = [p for p in params if not undecayed(p)]
        drop = [p for p in params if undecayed(p)]
        if group.get("weight_decay", default_weight_decay) == 0 or not keep or not drop:
            out.append({**group, "params": params})
            origin.append(index)
            continue
        out.append({**group, "params": keep})
        no_decay = {**group, "params": drop, "weight_decay": 0.0}
        if "name" in group:
            no_decay["name"] = f"{group['name']}/no_decay"
        out.append(no_decay)
        origin += [index, index]
    return out, origin


def per_caller_group(value: Any, origin: list[int], field: str) -> Any:
    """A per-group list the user wrote for the groups they passed, spread over the split groups."""
    if not isinstance(value, (list, tuple)):
        return value
    num_caller_groups = max(origin) + 1
    if len(value) != num_caller_groups:
        raise AdamCError(
            f"{field} has {len(value)} values for {num_caller_groups} param groups (before {PARAM}): give one per group"
        )
    return [value[i] for i in origin]
