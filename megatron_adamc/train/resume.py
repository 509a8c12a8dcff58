"""What a rerun on an existing run directory may change, and how it continues on another number of ranks.

The resolved config travels in every checkpoint. On resume it is compared with the new one key by key:

- keys that DEFINE the run (a change would silently mix two runs into one curve) are refused with one line listing
  them: ``model.*``, ``seed``, ``train.seq_len``, the global batch in samples (micro batch x accumulation x ranks:
  the first two may change as long as their product with the ranks stays), ``data.*`` except its locations and
  loader settings, ``optimizer.type``, and the precision and ZeRO stage of the DeepSpeed JSON;
- every other key may change mid-run (more steps, a new lr or schedule, intervals, tracking, logging, clipping, ...):
  it takes effect and is logged ``old -> new``.

On another world size the global batch stays: ``train.grad_accum`` is recomputed from it (one line when the batch
does not divide), and since the data position is the number of consumed samples, every global step still sees the
same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_adamc.errors import ResumeError

DEFINING_PREFIXES = ("model.",)
DEFINING_KEYS = {
    "seed",
    "train.seq_len",
    "optimizer.type",
    "data.default_corpus",
    "data.vocab_size",
    "data.max_bytes",
    "data.train",
    "data.valid",
    "data.split",
    "data.tokenizer",
    "global_batch",
    "precision",
    "zero_stage",
}
# Locations and loader settings: where the same data lives, or how fast it is read.
IGNORED_KEYS = {"data.cache_dir", "data.index_cache_dir", "data.num_workers", "data.prefetch_factor"}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def run_identity(config_dump: dict[str, Any], global_batch: int, precision: str, zero_stage: int) -> dict[str, Any]:
    """The flat config plus the derived keys that a resume compares."""
    return {**flatten(config_dump), "global_batch": global_batch, "precision": precision, "zero_stage": zero_stage}


@dataclass
class ResumePlan:
    changes: list[tuple[str, Any, Any]]  # legitimate changes, (key, old, new)
    grad_accum: int  # the gradient accumulation that keeps the global batch on this world size
    world_size_changed: bool


def plan_resume(saved: dict[str, Any], current: dict[str, Any], saved_world: int, world: int) -> ResumePlan:
    """Compare the saved identity with the current one; raises ResumeError for a change that defines the run."""
    micro, grad_accum = int(current["train.micro_batch_size"]), int(current["train.grad_accum"])
    global_batch = int(saved["global_batch"])
    if world != saved_world and micro * grad_accum * world != global_batch:
        if global_batch < world:
            raise ResumeError(
                f"the run's global batch of {global_batch} sample(s) cannot be split over {world} ranks (each rank "
                f"needs at least one sample a step): resume on at most {global_batch} rank(s)"
            )
        if global_batch % (micro * world):
            raise ResumeError(
                f"the run's global batch of {global_batch} samples cannot be kept on {world} rank(s) with "
                f"train.micro_batch_size={micro}: resume with a micro batch that divides {global_batch // world} "
                f"(e.g. --set train.micro_batch_size={_divisor(global_batch // world, micro)}) or on "
                f"{saved_world} rank(s)"
            )
        grad_accum = global_batch // (micro * world)
    current = {**current, "train.grad_accum": grad_accum, "global_batch": micro * grad_accum * world}
    refused, changes = [], []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new or key in IGNORED_KEYS:
            continue
        if key in DEFINING_KEYS or key.startswith(DEFINING_PREFIXES):
            refused.append(f"{key} {old!r} -> {new!r}")
        else:
            changes.append((key, old, new))
    if refused:
        raise ResumeError(
            f"this run directory holds a different run; changed: {', '.join(refused)}. Restore those values "
            "or start a new run in another --output-dir"
        )
    return ResumePlan(changes, grad_accum, world != saved_world)


def _divisor(n: int, near: int) -> int:
    """The divisor of ``n`` closest to ``near`` (a micro batch to suggest; 1 when ``n`` is 0)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d), default=1)


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What a checkpoint records of the tokenizer it was trained with."""
    return {"path": str(tokenizer.path), "sha256": tokenizer.sha256, "vocab_size": int(tokenizer.vocab_size)}


def check_same_tokenizer(saved: dict[str, Any] | None, tokenizer: Any, tag: str) -> None:
    """The tokenizer file may not change under a run, even at the same path (``data.tokenizer`` compares only the
    path): the model's vocabulary and every token's meaning come from it. ``saved``: the checkpoint's record
    (``tokenizer_identity``; older checkpoints have none)."""
    if not isinstance(saved, dict) or saved.get("sha256") in (None, tokenizer.sha256):
        return
    raise ResumeError(
        f"the tokenizer changed under this run: {tag} was trained with {saved.get('path')} ({saved.get('vocab_size')} "
        f"pieces, sha256 {str(saved['sha256'])[:12]}), now {tokenizer.path} has {tokenizer.vocab_size} pieces (sha256 "
        f"{tokenizer.sha256[:12]}). Restore the run's tokenizer, or start a new run in another --output-dir"
    )
