"""One rank of the Megatron tracking test: the shards Megatron's distributed optimizer builds, on a CPU.

TP 2 x PP 2 x DP 2 (8 gloo ranks). Each rank builds its pipeline stage of a 4-layer megatron-core GPTModel (TP-split
linears, TP-replicated RMSNorm gains), casts it to bf16, and lays its parameters into megatron-core's real
``_ParamAndGradBuffer`` (distributed-optimizer padding, several buckets); megatron-core's own
``DistributedOptimizer._build_gbuf_range_map`` / ``_build_model_param_gbuf_map`` / ``_build_optimizer_group_ranges``
cut this DP rank's ranges, and ``_get_param_groups`` builds the groups (with AdamC's ``--adamc-exclude output_layer``
override). The FP32 main shards are then made exactly as ``DistributedOptimizer._build_model_and_main_param_groups``
makes them (``model_param.view(-1)[range].clone().float()``: that method itself only accepts ``torch.cuda.*`` tensor
types) and handed to a torch AdamW, the inner optimizer. The only CUDA call on the way, the buffers' allocation
device (``torch.cuda.current_device()``), is pointed at the CPU.

The step: AdamC's scheduler (mid-schedule, so corrected and excluded decays differ), then the inner step under the
tracker. Every rank also computes, independently of the tracker, the sums of its WHOLE local (TP-sliced) parameters
and a reference AdamW step on them; all of that is gathered to rank 0, which writes it with the tracker's metrics.
"""

from __future__ import annotations

import inspect
import json
import zlib
from types import SimpleNamespace
from unittest import mock

import torch

LR, MIN_LR, WD, CLIP, GRAD_NORM = 1e-3, 1e-4, 0.1, 1.0, 2.5
TP, PP = 2, 2


def build_stage() -> torch.nn.Module:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(1234)  # the same on every rank: DP replicas equal, TP slices cut from one master weight
    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        normalization="RMSNorm",
        add_bias_linear=False,
        use_cpu_initialization=True,
        tensor_model_parallel_size=TP,
        pipeline_model_parallel_size=PP,
        pipeline_dtype=torch.bfloat16,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=128,
        max_sequence_length=16,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
    )


def distributed_optimizer_layout(model: torch.nn.Module) -> tuple[SimpleNamespace, list[dict]]:
    """The DistributedOptimizer's fields the tracker reads, from megatron-core's own range computation."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups, get_standard_config_overrides
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes

    from megatron_adamc.megatron.groups import exclusion_overrides

    model.bfloat16()
    params = [p for p in model.parameters() if p.requires_grad]
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    groups = SimpleNamespace(tp=parallel_state.get_tensor_model_parallel_group(), dp_cp=dp_group)
    names = {p: n for n, p in model.named_parameters()}
    # 0.16 takes the params, 0.19 and main (params, name) pairs; the rest of the signature is the same.
    takes_names = "params_with_names" in inspect.signature(_ParamAndGradBuffer.__init__).parameters
    param_list = [(p, names[p]) for p in params] if takes_names else params
    with mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):  # the buffers' allocation device only
        buffer = _ParamAndGradBuffer(
            DistributedDataParallelConfig(use_distributed_optimizer=True),
            torch.bfloat16,
            torch.float32,
            param_list,
            dp_group,
            3000,  # bucket size in elements: several buckets per stage
            names,
            1.0,
            list(range(len(params))),
            False,
            pg_collection=groups,
        )
    gbuf_ranges = [DistributedOptimizer._build_gbuf_range_map(buffer)]
    param_gbuf_map = DistributedOptimizer._build_model_param_gbuf_map(gbuf_ranges)
    config = OptimizerConfig(lr=LR, min_lr=MIN_LR, weight_decay=WD, bf16=True)
    overrides = {**get_standard_config_overrides(config), **exclusion_overrides(["output_layer"])[0]}
    param_groups = _get_param_groups([model], config, overrides)
    _, group_ranges = DistributedOptimizer._build_optimizer_group_ranges(param_groups, gbuf_ranges)
    model_groups, main_groups, shards = [], [], []
    for group_range in group_ranges:
        model_params, mains = [], []
        for param in group_range["params"]:
            gbuf_index, dtype, bucket_index = param_gbuf_map[param]
            param_range = gbuf_ranges[gbuf_index][dtype][bucket_index]["param_map"][param]["param"]
            main = param.detach().view(-1)[param_range.start : param_range.end].clone().float()
            copy_tensor_model_parallel_attributes(main, param)
            model_params.append(param)
            mains.append(main)
            shards.append({"param": param, "start": param_range.start, "end": param_range.end})
        group_range["orig_group"]["params"] = mains
        model_groups.append(model_params)
        main_groups.append(mains)
    inner = torch.optim.AdamW([g["orig_group"] for g in group_ranges], lr=LR, weight_decay=WD, betas=(0.9, 0.95))
    optimizer = SimpleNamespace(
        optimizer=inner,
        param_groups=inner.param_groups,
        model_float16_groups=model_groups,
        shard_fp32_from_float16_groups=main_groups,
        model_fp32_groups=[[] for _ in model_groups],
        shard_fp32_groups=[[] for _ in model_groups],
    )
    return optimizer, shards


def gradient(name: str, tp_rank: int, shape: torch.Size, split: bool) -> torch.Tensor:
    """A deterministic 'clipped' gradient of a (TP slice of a) parameter, the same on every DP replica."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}/{tp_rank if split else 0}".encode()))
    return torch.randn(shape, generator=generator) * 0.01


def run(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_adamc.megatron.scheduler import AdamCParamScheduler
    from megatron_adamc.tracking.megatron_layout import global_names
    from megatron_adamc.tracking.megatron_tracker import MegatronTracker

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    model = build_stage()
    optimizer, shards = distributed_optimizer_layout(model)
    names = global_names([model])
    # The scheduler half-way down its cosine: corrected groups decay by lambda * lr / peak, excluded ones by lambda.
    scheduler = AdamCParamScheduler(
        optimizer, init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=10, lr_decay_steps=100,
        lr_decay_style="cosine", start_wd=WD, end_wd=WD, wd_incr_steps=100, wd_incr_style="constant",
    )  # fmt: skip
    scheduler.step(55)
    # The gradient of each whole local parameter; each main shard gets its slice.
    grads = {}
    for param in model.parameters():
        split = bool(getattr(param, "tensor_model_parallel", False))
        grads[param] = gradient(names[id(param)], tp_rank, param.shape, split)
    for shard, main in zip(shards, [m for g in optimizer.shard_fp32_from_float16_groups for m in g], strict=True):
        main.grad = grads[shard["param"]].view(-1)[shard["start"] : shard["end"]].clone()
    tracker = MegatronTracker(
        optimizer, [model], interval=1, clip=CLIP, tp_rank=tp_rank, dp_rank=dp_rank,
        writer_rank=rank == world - 1, metrics_dir=out_dir,
    )  # fmt: skip
    # The reference: every whole local parameter, its own AdamW step with its group's settings (before the step).
    group_of = {}
    for group, model_params in zip(optimizer.param_groups, optimizer.model_float16_groups, strict=True):
        for param in model_params:
            group_of[param] = group
    reference = []
    for param in model.parameters():
        group = group_of.get(param)
        if group is None:
            continue  # not on this DP rank's ranges at all: its other DP replica reports it
        full = param.detach().float().clone().requires_grad_(True)
        full.grad = grads[param].clone()
        ref = torch.optim.AdamW([full], lr=group["lr"], weight_decay=group["weight_decay"], betas=group["betas"])
        before = full.detach().clone()
        ref.step()
        w, g, u = before.double(), grads[param].double() * (GRAD_NORM + 1e-6) / CLIP, (before - full.detach()).double()
        reference.append(
            {
                "name": names[id(param)],
                "tp_rank": tp_rank,
                "split": bool(getattr(param, "tensor_model_parallel", False)),
                "dp_rank": dp_rank,
                "sums": [
                    w.square().sum().item(),
                    g.square().sum().item(),
                    (w * g).sum().item(),
                    u.square().sum().item(),
                ],
                "corrected": bool(group.get("adamc", True)),
                "weight_decay": group["weight_decay"],
            }
        )
    shard_sizes = [(names[id(s["param"])], dp_rank, tp_rank, s["end"] - s["start"], s["param"].numel()) for s in shards]
    tracker.begin_step(1)
    optimizer.optimizer.step()
    metrics = tracker.end_step(1, grad_norm=GRAD_NORM, extra={"lr": scheduler.get_lr(optimizer.param_groups[0])})
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"reference": reference, "shards": shard_sizes, "metrics": metrics})
    if rank == 0:
        with open(f"{out_dir}/result.json", "w") as out:
            json.dump({"ranks": gathered, "names": tracker.names}, out)
    parallel_state.destroy_model_parallel()
