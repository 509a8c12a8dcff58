"""One of 2 gloo ranks of tests/test_megatron_scheduler.py: megatron-core's own param groups, stepped by AdamC.

Phase 1 (TP 1, PP 1): the groups Megatron-LM's training builds for a tiny CPU GPTModel (decoupled-lr embedding and
output, wd_mult 0 gains), AdamC and the stock scheduler side by side for every decay style; the same groups with
``--adamc-exclude output_layer``; and a resume through Megatron's own group matching
(``MegatronOptimizer._filter_and_reorder_param_groups``, then the inner optimizer's ``load_state_dict``, what its
FP32 and float16 optimizers do) with and without ``--override-opt-param-scheduler``.
Phase 2 (PP 2): the output layer lives on rank 1 only; an exclusion matched there must count on rank 0 too.
"""

from __future__ import annotations

import copy

import torch

LR, MIN_LR, DECOUPLED_LR, DECOUPLED_MIN_LR, WD = 1e-3, 1e-5, 3e-3, 3e-5, 0.1
GLOBAL_BATCH = 4  # Megatron counts scheduler steps in samples: one iteration = increment of the global batch
ITERATIONS = 50  # 200 samples: past lr_decay_steps, so the min_lr tail is covered too

# Scheduler arguments per case, in samples. Every case warms up; one also ramps lambda itself (weight_decay_incr).
COMMON = dict(init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=20, lr_decay_steps=160)
CASES: dict[str, dict] = {
    "cosine": dict(COMMON, lr_decay_style="cosine"),
    "linear": dict(COMMON, lr_decay_style="linear"),
    "WSD": dict(COMMON, lr_decay_style="WSD", wsd_decay_steps=60, lr_wsd_decay_style="cosine"),
    "WSD-minus-sqrt": dict(COMMON, lr_decay_style="WSD", wsd_decay_steps=60, lr_wsd_decay_style="minus_sqrt"),
    "inverse-square-root": dict(COMMON, lr_decay_style="inverse-square-root"),
    "cosine-init-lr": dict(COMMON, init_lr=1e-5, lr_decay_style="cosine"),
    "cosine-wd-incr-linear": dict(
        COMMON, lr_decay_style="cosine", start_wd=0.02, end_wd=WD, wd_incr_steps=120, wd_incr_style="linear"
    ),
}


def scheduler_args(case: str, **overrides) -> dict:
    args = {"start_wd": WD, "end_wd": WD, "wd_incr_steps": ITERATIONS * GLOBAL_BATCH, "wd_incr_style": "constant"}
    args.update(CASES[case])
    args.update(overrides)
    return args


def gpt_model(pre_process: bool = True, post_process: bool = True, pipeline: int = 1) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=True,
        pipeline_model_parallel_size=pipeline,
        pipeline_dtype=torch.float32 if pipeline > 1 else None,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=64,
        max_sequence_length=16,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
    )


def megatron_groups(
    model: torch.nn.Module, exclude: list[str] | None = None, scale: float = 1.0, decoupled: bool = True
) -> tuple:
    """The overrides Megatron-LM's training passes (wd_mult 0 for biases and 1-D tensors, decoupled embedding/output
    lr), plus AdamC's exclusion the way the plugin adds it; ``scale`` multiplies both peaks (a changed --lr)."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups, get_standard_config_overrides

    from megatron_adamc.megatron.groups import exclusion_overrides

    config = OptimizerConfig(
        lr=LR * scale,
        min_lr=MIN_LR,
        weight_decay=WD,
        decoupled_lr=DECOUPLED_LR * scale if decoupled else None,
        decoupled_min_lr=DECOUPLED_MIN_LR if decoupled else None,
    )
    extra, matcher = exclusion_overrides(exclude or [])
    return _get_param_groups([model], config, {**get_standard_config_overrides(config), **extra}), matcher


def adamw(groups: list[dict]) -> torch.optim.AdamW:
    # What megatron-core builds when neither TE nor apex is installed; each optimizer gets its own group dicts.
    return torch.optim.AdamW([dict(group) for group in groups], lr=LR, weight_decay=WD)


def trace(scheduler, iterations: int) -> list[list[tuple]]:
    steps = []
    for iteration in range(iterations + 1):
        if iteration:  # iteration 0 records what the constructor's step(0) wrote
            scheduler.step(GLOBAL_BATCH)
        steps.append([(g["lr"], g["weight_decay"]) for g in scheduler.optimizer.param_groups])
    return steps


def meta(groups: list[dict]) -> list[dict]:
    return [
        {
            "max_lr": g["max_lr"],
            "wd_mult": g["wd_mult"],
            "adamc": g.get("adamc", True),
            "numel": sum(p.numel() for p in g["params"]),
        }
        for g in groups
    ]


def resume(model: torch.nn.Module, override: bool, exclude: list[str], scale: float = 2.0) -> dict:
    """Train 12 iterations at --lr LR, save, rebuild at --lr scale*LR and load as Megatron does; 8 more iterations.
    No --decoupled-lr here: on 0.16.1 its groups collide on load (Megatron's own bug, fixed in 0.19). A load that
    Megatron refuses (0.19+: a changed --lr no longer matches a saved group) is recorded as its error."""
    try:
        return _resume(model, override, exclude, scale)
    except (ValueError, KeyError) as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}


def _resume(model: torch.nn.Module, override: bool, exclude: list[str], scale: float) -> dict:
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    from megatron_adamc.megatron.scheduler import AdamCParamScheduler

    groups, _ = megatron_groups(model, exclude, decoupled=False)
    first = AdamCParamScheduler(adamw(groups), **scheduler_args("cosine"))
    trace(first, 12)
    saved_optimizer, saved_scheduler = copy.deepcopy(first.optimizer.state_dict()), first.state_dict()
    new_groups, _ = megatron_groups(model, exclude, scale=scale, decoupled=False)
    optimizer = adamw(new_groups)
    built = [group.get("adamc", True) for group in new_groups]
    flags = dict(override_opt_param_scheduler=override, use_checkpoint_opt_param_scheduler=not override)
    scheduler = AdamCParamScheduler(optimizer, **scheduler_args("cosine", max_lr=scale * LR), **flags)
    megatron_match = getattr(MegatronOptimizer._filter_and_reorder_param_groups, "adamc_original", None)
    aliased = None
    if megatron_match is not None:  # Megatron's own matching, on copies: look-alike groups become one dict
        matched = megatron_match(copy.deepcopy(optimizer.param_groups), copy.deepcopy(saved_optimizer["param_groups"]))
        aliased = len({id(group) for group in matched}) < len(matched)
    saved_optimizer["param_groups"] = MegatronOptimizer._filter_and_reorder_param_groups(
        optimizer.param_groups, saved_optimizer["param_groups"]
    )
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    after = trace(scheduler, 8)
    return {
        "scheduler_max_lr": scheduler.max_lr,
        "max_lr": [g["max_lr"] for g in optimizer.param_groups],
        "adamc": [g["adamc"] for g in optimizer.param_groups],
        "built": built,
        "wd_mult": [g["wd_mult"] for g in optimizer.param_groups],
        "plain": [[scheduler.get_wd(g) * g["wd_mult"] for g in optimizer.param_groups]],
        "steps": after,
        "uninterrupted": trace(AdamCParamScheduler(adamw(groups), **scheduler_args("cosine")), 20)[12:],
        "history": scheduler.state_dict()["adamc_history"],
        "megatron_aliases_groups": aliased,
    }


def run(rank: int, world: int, out_dir: str) -> None:
    from megatron.core import parallel_state
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_adamc.core.decay import AdamCError
    from megatron_adamc.megatron.groups import check_matched
    from megatron_adamc.megatron.scheduler import AdamCParamScheduler

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    model = gpt_model()
    groups, _ = megatron_groups(model)
    results = {}
    for case in CASES:
        adamc = trace(AdamCParamScheduler(adamw(groups), **scheduler_args(case)), ITERATIONS)
        plain = trace(OptimizerParamScheduler(adamw(groups), **scheduler_args(case)), ITERATIONS)
        results[case] = [[(*a, *p) for a, p in zip(ai, pi, strict=True)] for ai, pi in zip(adamc, plain, strict=True)]
    excluded_groups, matcher = megatron_groups(model, ["output_layer"])
    check_matched(matcher)
    excluded = {
        "meta": meta(excluded_groups),
        "adamc": trace(AdamCParamScheduler(adamw(excluded_groups), **scheduler_args("cosine")), ITERATIONS),
        "plain": trace(OptimizerParamScheduler(adamw(excluded_groups), **scheduler_args("cosine")), ITERATIONS),
    }
    _, typo = megatron_groups(model, ["output_layer", "outptu_layer"])
    try:
        check_matched(typo)
        typo_error = None
    except AdamCError as err:
        typo_error = str(err)
    resumed = {  # the exclusion last: it installs the positional group matching for the rest of the process
        "override": resume(model, True, []),
        "checkpoint": resume(model, False, []),
        "override_excluded": resume(model, True, ["output_layer"]),
        "same_lr_excluded": resume(model, False, ["output_layer"], scale=1.0),
    }
    from megatron.core.optimizer import optimizer as megatron_optimizer

    identifier_keys = list(megatron_optimizer.param_group_identifier_keys)
    parallel_state.destroy_model_parallel()

    # Phase 2: two pipeline stages; only the last holds the output layer.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    stage = gpt_model(pre_process=rank == 0, post_process=rank == 1, pipeline=2)
    stage_groups, stage_matcher = megatron_groups(stage, ["output_layer"])
    check_matched(stage_matcher)  # raises on rank 0 if "matched on no rank" were decided per rank
    pipeline = {"matched_here": sorted(stage_matcher.matched), "meta": meta(stage_groups)}
    parallel_state.destroy_model_parallel()
    torch.save(
        {
            "meta": meta(groups),
            "results": results,
            "excluded": excluded,
            "typo_error": typo_error,
            "resumed": resumed,
            "pipeline": pipeline,
            "identifier_keys": identifier_keys,
        },
        f"{out_dir}/rank{rank}.pt",
    )
