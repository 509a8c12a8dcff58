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

from megatron_adamc.core.adamc import ENABLED_KEY
from megatron_adamc.core.decay import AdamCError
from megatron_adamc.core.norms import strip_wrappers

DEFAULT_EXCLUDE: tuple[str, ...] = ("output_layer",)
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

    matcher = ExclusionMatcher(patterns)
    predicate = ParamWithNamePredicate(name=f"adamc_exclude:{','.join(patterns)}", fn=matcher)
    return {ParamKey(with_name_predicate=predicate): {ENABLED_KEY: False}}, matcher


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
