"""Which Megatron param groups AdamC corrects: ``--adamc-exclude`` as megatron-core's own per-parameter overrides.

megatron-core (0.16+) builds its param groups from ``config_overrides``, a dict of ``ParamKey`` (which parameters)
to ``ParamGroupOverride`` (extra keys of their group). A group gets every key of its override, so an override
``{"adamc": False}`` puts the matching parameters into groups of their own that carry ``adamc: False``: the key the
DeepSpeed side already reads (``core.adamc.ENABLED_KEY``) and ``AdamCParamScheduler`` skips. Those groups keep the
plain decay ``lambda`` (times their ``wd_mult``); every other decayed group is corrected. Megatron-LM
(``get_megatron_optimizer_config``) and Megatron-Bridge (``OptimizerConfigOverrideProvider``) both hand such a dict
to ``get_megatron_optimizer``, so this one function serves them and any megatron-core loop.

Default: ``output_layer`` (Defazio 2025 "consider[s] every linear layer as normalized, excluding the output layer of
the network", as quoted by Chou, arXiv 2512.08217): no normalization follows the output layer, so the steady-state
argument does not cover it. See docs/megatron.md, "Which groups are corrected".
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

from megatron_adamc.core.decay import AdamCError
from megatron_adamc.core.norms import strip_wrappers

DEFAULT_EXCLUDE: tuple[str, ...] = ("output_layer",)
# core.adamc.ENABLED_KEY, the DeepSpeed side's per-group opt-out (not imported: that module imports torch, and the
# flags are parsed, by `slurm submit` too, before anything needs torch; tests check the two agree).
ENABLED_KEY = "adamc"
# What a tied output layer is called in an exclusion: it IS the embedding's weight (one tensor, two stages).
TIED_EMBEDDING_NAME = "embedding.word_embeddings.weight"
_GLOB = set("*?[")


def parse_exclude(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"output_layer,embedding"`` or a list -> the patterns; ``""`` / ``"none"`` -> none (correct every group)."""
    if value is None:
        return DEFAULT_EXCLUDE
    items = value.split(",") if isinstance(value, str) else [part for item in value for part in str(item).split(",")]
    patterns = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    if patterns in ((), ("none",)):
        return ()
    for pattern in patterns:
        if pattern == "none" or not all(part for part in pattern.split(".")):
            raise AdamCError(
                f"--adamc-exclude {pattern!r} is not a module path or glob: give dotted module names such as "
                "output_layer,embedding (or 'none' alone to correct every decayed group)"
            )
    return patterns


def canonical_name(name: str, param: Any = None) -> str:
    """The name a pattern is matched against: wrappers' ``module.`` prefixes dropped; a tied output weight (the last
    pipeline stage's copy of the embedding, marked ``shared_embedding``) named as the embedding it is."""
    name = strip_wrappers(name)
    if param is not None and getattr(param, "shared_embedding", False) and name.startswith("output_layer."):
        return TIED_EMBEDDING_NAME
    return name


def pattern_matches(pattern: str, name: str) -> bool:
    """A glob matches the whole name; a plain dotted path matches where its components appear in a row."""
    if _GLOB & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    wanted, parts = pattern.split("."), name.split(".")
    return any(parts[i : i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


class ExclusionMatcher:
    """The predicate megatron-core calls with every (param, name); remembers which patterns matched on this rank."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self.matched: set[str] = set()

    def __call__(self, param: Any, name: str) -> bool:
        canonical = canonical_name(name, param)
        hits = [pattern for pattern in self.patterns if pattern_matches(pattern, canonical)]
        self.matched.update(hits)
        return bool(hits)


def exclusion_overrides(patterns: Sequence[str]) -> tuple[dict, ExclusionMatcher | None]:
    """``{ParamKey: {"adamc": False}}`` for megatron-core's ``config_overrides`` (merge it into yours), and the
    matcher (to ask later which patterns matched). Empty for no patterns."""
    if not patterns:
        return {}, None
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    install_positional_group_matching()
    matcher = ExclusionMatcher(patterns)
    predicate = ParamWithNamePredicate(name=f"adamc_exclude:{','.join(patterns)}", fn=matcher)
    return {ParamKey(with_name_predicate=predicate): {ENABLED_KEY: False}}, matcher


def install_positional_group_matching() -> None:
    """Make Megatron's checkpoint load pair look-alike param groups by position (idempotent).

    ``MegatronOptimizer._filter_and_reorder_param_groups`` (the FP32 and float16 optimizers' load, 0.16 to main)
    matches saved groups to the current ones by ``param_group_identifier_keys`` only (0.16: wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr); an excluded group looks like the corrected one beside it, so both map to
    ONE saved dict, which it appends twice after giving it the second one's params: torch's load then fails on the
    first group's size. Here each current group takes the saved group at its own position when that one has the same
    identifier (construction order is the same in a resumed run), else the first unused look-alike, as a copy; any
    other mismatch goes to Megatron's own function and its own error. (The distributed optimizer's load already
    copies per group; the ``adamc`` flag it may take from a look-alike is stamped back by AdamC's scheduler.)"""
    from megatron.core.optimizer import optimizer as megatron_optimizer

    cls = megatron_optimizer.MegatronOptimizer
    original = cls._filter_and_reorder_param_groups
    if getattr(original, "adamc_original", None) is not None:
        return

    def identifier(group: dict) -> tuple:
        keys = megatron_optimizer.param_group_identifier_keys
        return tuple(group.get(key, group.get(f"pre_{key}")) for key in keys)

    def filter_and_reorder(current_groups: list[dict], state_dict_groups: list[dict]) -> list[dict]:
        wanted = [identifier(group) for group in current_groups]
        saved = [identifier(group) for group in state_dict_groups]
        if len(wanted) != len(saved) or sorted(map(repr, wanted)) != sorted(map(repr, saved)):
            return original(current_groups, state_dict_groups)
        used: set[int] = set()
        out = []
        for index, key in enumerate(wanted):
            if saved[index] == key and index not in used:
                match = index
            else:
                match = next(j for j, other in enumerate(saved) if other == key and j not in used)
            used.add(match)
            out.append({**state_dict_groups[match], "params": state_dict_groups[index]["params"]})
        return out

    filter_and_reorder.adamc_original = original  # type: ignore[attr-defined]
    cls._filter_and_reorder_param_groups = staticmethod(filter_and_reorder)


def merge_overrides(base: dict | None, extra: dict) -> dict | None:
    """``base`` plus ``extra``; None stays None when there is nothing to add (megatron-core then applies its own
    standard overrides, which an explicit dict would replace)."""
    if not extra:
        return base
    if base is None:
        raise AdamCError(
            "--adamc-exclude needs megatron-core's standard config overrides to merge with (config_overrides=None): "
            "pass get_standard_config_overrides(config) | exclusion_overrides(...)[0]"
        )
    return {**base, **extra}


def unmatched(matcher: ExclusionMatcher | None) -> list[str]:
    """Patterns that matched no parameter on ANY rank (one MAX all-reduce at start-up when distributed)."""
    if matcher is None:
        return []
    import torch
    import torch.distributed as dist

    flags = torch.tensor([float(p in matcher.matched) for p in matcher.patterns], dtype=torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            flags = flags.cuda()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [p for p, hit in zip(matcher.patterns, flags.tolist(), strict=True) if not hit]


def check_matched(matcher: ExclusionMatcher | None, flag: str = "--adamc-exclude") -> None:
    missing = unmatched(matcher)
    if missing:
        raise AdamCError(
            f"{flag} {','.join(missing)} matched no parameter of the model: give module names of the model "
            "(e.g. output_layer, embedding, decoder.layers.0) or a glob such as '*.linear_fc2.weight'"
        )


def corrected_flags(param_groups: Sequence[dict]) -> list[bool]:
    """Per group: does AdamC correct it? (decayed and not excluded)"""
    return [bool(group.get(ENABLED_KEY, True)) and group.get("wd_mult", 1.0) != 0.0 for group in param_groups]
