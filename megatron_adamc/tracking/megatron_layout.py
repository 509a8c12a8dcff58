"""Which FP32 main tensor on this rank belongs to which model parameter, for Megatron's optimizers.

Megatron's inner optimizer (TE/apex FusedAdam, torch AdamW) steps FP32 main tensors that its wrapper keeps beside
the model's (bf16/fp16) parameters, group by group in the same order:

- ``DistributedOptimizer`` (``--use-distributed-optimizer``): ``shard_fp32_from_float16_groups[i][k]`` is this data-
  parallel rank's contiguous slice of ``model_float16_groups[i][k]`` (``shard_fp32_groups`` / ``model_fp32_groups``
  for fp32 parameters). The slices are cut by the grad buffer's bucket ranges (``_build_model_gbuf_range``), so a
  parameter may be split unevenly between ranks or absent; the slices of all ranks tile it exactly once.
- ``Float16OptimizerWithFloat16Params``: ``fp32_from_float16_groups`` beside ``float16_groups``, whole tensors on
  every data-parallel rank; ``FP32Optimizer``: the parameters themselves. ``ChainedOptimizer`` chains several.

A main tensor is counted on this rank unless another rank's copy is counted already, by Megatron's own rules for its
gradient norm (``get_main_grads_for_grad_norm``): not ``shared`` (the tied output weight on the last pipeline stage,
a copy of the embedding), not a tensor-parallel duplicate (a replicated norm gain counts on TP rank 0), and, when the
optimizer is not sharded, on data-parallel rank 0 only. With those rules one SUM all-reduce over all ranks of the
per-row sums gives each full parameter's sums.

Rows are GLOBAL names, identical on every rank: the wrappers' ``module.`` prefixes dropped and each transformer layer
renumbered by its global ``layer_number`` (a pipeline stage numbers its layers from 0), gathered once at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_adamc.core.norms import strip_wrappers

_LAYERS = re.compile(r"^(?:.*\.)?layers\.\d+$")
_NUMBER = re.compile(r"(\d+)")


@dataclass
class Entry:
    row: int
    counted: bool


@dataclass
class MegatronLayout:
    names: list[str]
    entries: dict[int, Entry]  # id(main tensor) -> its row
    inner: list[torch.optim.Optimizer]  # the optimizers whose step() steps the main tensors
    sharded: bool  # the distributed optimizer: data-parallel ranks hold disjoint slices
    model_params: dict[int, torch.nn.Parameter] = field(default_factory=dict)  # id(main) -> model parameter

    def find(self, main: torch.Tensor) -> Entry | None:
        return self.entries.get(id(main))


def layer_renames(chunk: torch.nn.Module) -> list[tuple[str, str]]:
    """(local prefix, global prefix) of each transformer layer of a model chunk: ``decoder.layers.0.`` on the
    second of two 4-layer pipeline stages is ``decoder.layers.4.`` (its ``layer_number`` is global and 1-based)."""
    renames = []
    for module_name, module in chunk.named_modules():
        number = getattr(module, "layer_number", None)
        if isinstance(number, int) and _LAYERS.match(module_name):
            local = strip_wrappers(module_name)
            renames.append((local + ".", local.rsplit(".", 1)[0] + f".{number - 1}."))
    return renames


def rename(name: str, renames: list[tuple[str, str]]) -> str:
    name = strip_wrappers(name)
    for old, new in renames:
        if (name + ".").startswith(old):
            return (new + name[len(old) :]).rstrip(".")
    return name


def global_names(model_chunks: list[torch.nn.Module]) -> dict[int, str]:
    """id(parameter) -> global name, for every parameter of this rank's model chunks."""
    out: dict[int, str] = {}
    for chunk in model_chunks:
        renames = layer_renames(chunk)
        for name, param in chunk.named_parameters():
            out.setdefault(id(param), rename(name, renames))
    return out


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in _NUMBER.split(name)]


def _pairs(optimizer: Any) -> tuple[list[tuple[torch.optim.Optimizer, list[tuple[Any, Any]]]], bool]:
    """[(inner optimizer, [(model param, main tensor), ...])], and whether the main tensors are DP shards."""
    if hasattr(optimizer, "chained_optimizers"):
        out, sharded = [], set()
        for sub in optimizer.chained_optimizers:
            pairs, sub_sharded = _pairs(sub)
            out += pairs
            sharded.add(sub_sharded)
        if len(sharded) > 1:
            raise TypeError("norm tracking: a ChainedOptimizer mixing distributed and plain optimizers")
        return out, sharded.pop() if sharded else False
    if getattr(optimizer, "is_stub_optimizer", False):
        return [], False
    inner = optimizer.optimizer
    if hasattr(optimizer, "shard_fp32_from_float16_groups"):
        pairs = []
        for i in range(len(optimizer.model_float16_groups)):
            pairs += zip(optimizer.model_fp32_groups[i], optimizer.shard_fp32_groups[i], strict=True)
            pairs += zip(optimizer.model_float16_groups[i], optimizer.shard_fp32_from_float16_groups[i], strict=True)
        if any(main is None for _, main in pairs):
            raise TypeError("norm tracking needs FP32 main params (not --use-precision-aware-optimizer)")
        return [(inner, pairs)], True
    if hasattr(optimizer, "fp32_from_float16_groups"):
        pairs = []
        for i in range(len(optimizer.float16_groups)):
            pairs += zip(optimizer.float16_groups[i], optimizer.fp32_from_float16_groups[i], strict=True)
            pairs += [(p, p) for p in optimizer.fp32_from_fp32_groups[i]]
        return [(inner, pairs)], False
    if isinstance(inner, torch.optim.Optimizer):  # FP32Optimizer: the parameters are the main tensors
        return [(inner, [(p, p) for group in inner.param_groups for p in group["params"]])], False
    raise TypeError(
        f"norm tracking does not know Megatron's optimizer {type(optimizer).__name__}: use the distributed "
        "optimizer, the bf16/fp16 or the fp32 one (not --optimizer-cpu-offload)"
    )


def counted(param: Any, sharded: bool, tp_rank: int, dp_rank: int) -> bool:
    if getattr(param, "shared", False):
        return False
    if not getattr(param, "tensor_model_parallel", False) and tp_rank != 0:
        return False
    return sharded or dp_rank == 0


def build_layout(
    optimizer: Any,
    model_chunks: list[torch.nn.Module],
    tp_rank: int,
    dp_rank: int,
    gather: Any = None,
) -> MegatronLayout:
    """The layout of this rank. ``gather(list) -> list of lists`` collects every rank's names (default: one
    ``all_gather_object`` over all ranks, once, at start-up); the row order is the same on every rank."""
    names_of = global_names(model_chunks)
    pairs, sharded = _pairs(optimizer)
    local: list[tuple[torch.optim.Optimizer, Any, Any, str]] = []
    for inner, inner_pairs in pairs:
        for param, main in inner_pairs:
            if id(param) not in names_of:
                raise TypeError("norm tracking: an optimizer parameter that is not in the model chunks given")
            if getattr(param, "allreduce", True) is False and _expert_parallel_size() > 1:
                raise TypeError("norm tracking does not support expert-parallel models yet: drop tracking or EP")
            local.append((inner, param, main, names_of[id(param)]))
    if gather is None:
        gather = _all_gather_names
    all_names = {name for names in gather(sorted({name for *_, name in local})) for name in names}
    names = sorted(all_names, key=natural_key)
    row_of = {name: row for row, name in enumerate(names)}
    entries = {
        id(main): Entry(row_of[name], counted(param, sharded, tp_rank, dp_rank)) for _, param, main, name in local
    }
    inner_list = list(dict.fromkeys(inner for inner, *_ in local)) or [inner for inner, _ in pairs]
    return MegatronLayout(names, entries, inner_list, sharded, {id(main): param for _, param, main, _ in local})


def _all_gather_names(names: list[str]) -> list[list[str]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [names]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, names)
    return out


def _expert_parallel_size() -> int:
    try:
        from megatron.core import parallel_state

        return parallel_state.get_expert_model_parallel_world_size()
    except (ImportError, AssertionError, AttributeError):
        return 1
