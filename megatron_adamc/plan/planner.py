"""The plan of a run: memory per GPU term by term, whether it fits, the fix when it does not, and time to train.

Inputs are the train config (model, batch, checkpointing, DeepSpeed JSON) and the hardware (nodes, GPUs per node,
memory per GPU, peak FLOP/s, expected MFU). Memory is in GiB (2^30 bytes, as DeepSpeed's estimators and
``torch.cuda`` report it). The total is an upper bound: the loss-side temporaries (at the start of the backward)
and the recomputation of a checkpointed block (later in the backward) never coexist, yet both are added.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_adamc.config.model_shape import model_config
from megatron_adamc.config.train import TrainConfig
from megatron_adamc.errors import UserError
from megatron_adamc.model.config import LlamaConfig
from megatron_adamc.plan.activations import ActivationMemory, activation_memory
from megatron_adamc.plan.model_states import ModelStates, ZeroSetup, communication_buffers, model_states, zero_setup

GiB = 2**30
# Memory outside PyTorch's allocator: the CUDA context (~0.5 GiB on an H100), NCCL's communicator buffers and the
# cuBLAS/cuDNN workspaces. An assumption, not a measurement: the GPU check (issue 14) measures it.
CUDA_CONTEXT_GIB = 2.0
# The caching allocator's slack (blocks split but not reusable): this fraction of what the allocator holds.
FRAGMENTATION = 0.05
H100_BF16_TFLOPS = 989.0  # dense, SXM; the trainer's PEAK_FLOPS uses the same figure for MFU
TERMS = ("params", "grads", "optimizer", "activations", "buffers")


@dataclass(frozen=True)
class Hardware:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    peak_tflops: float = H100_BF16_TFLOPS
    mfu: float = 0.4

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class RunShape:
    """What a fix may change: the model, the ZeRO setup, the batch split and the checkpointing."""

    model: LlamaConfig
    zero: ZeroSetup
    deepspeed_path: str
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    checkpointing: str
    steps: int
    preset: str = ""


@dataclass(frozen=True)
class ModelFacts:
    params: int
    largest_layer: int  # DeepSpeed's "largest layer": the most parameters one module owns directly
    flops_per_token: int


def model_facts(cfg: LlamaConfig, seq_len: int) -> ModelFacts:
    """Counted on the real model class built on the meta device (nothing is allocated)."""
    return _model_facts(cfg.model_dump_json(), seq_len)


@functools.lru_cache(maxsize=8)
def _model_facts(cfg_json: str, seq_len: int) -> ModelFacts:
    import torch

    from megatron_adamc.model.llama import Llama

    with torch.device("meta"):
        model = Llama(LlamaConfig.model_validate_json(cfg_json))
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return ModelFacts(model.num_params(), largest, model.flops_per_token(seq_len))


@dataclass(frozen=True)
class Plan:
    shape: RunShape
    hardware: Hardware
    facts: ModelFacts
    states: ModelStates
    activations: ActivationMemory
    comm_buffers: int
    vocab_source: str

    @property
    def buffer_parts(self) -> dict[str, float]:
        """Bytes of each buffer: DeepSpeed's buckets, the loss temporaries, allocator slack, the CUDA context."""
        held = self.states.total + self.activations.total + self.comm_buffers + self.activations.logits_temporaries
        return {
            "deepspeed_buckets": self.comm_buffers,
            "logits_temporaries": self.activations.logits_temporaries,
            "fragmentation": FRAGMENTATION * held,
            "cuda_context": CUDA_CONTEXT_GIB * GiB,
        }

    @property
    def per_gpu_bytes(self) -> dict[str, float]:
        terms = {
            "params": self.states.params,
            "grads": self.states.grads,
            "optimizer": self.states.optimizer,
            "activations": self.activations.total,
            "buffers": sum(self.buffer_parts.values()),
        }
        return {**terms, "total": sum(terms.values())}

    @property
    def fits(self) -> bool:
        return self.per_gpu_bytes["total"] <= self.hardware.gpu_memory_gib * GiB

    @property
    def largest_term(self) -> str:
        terms = self.per_gpu_bytes
        return max(TERMS, key=lambda name: terms[name])

    @property
    def global_batch(self) -> int:
        return self.shape.micro_batch_size * self.shape.grad_accum * self.hardware.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.shape.seq_len

    @property
    def seconds_to_train(self) -> float:
        hw = self.hardware
        flops = self.shape.steps * self.tokens_per_step * self.facts.flops_per_token
        return flops / (hw.world_size * hw.peak_tflops * 1e12 * hw.mfu)


def plan_shape(shape: RunShape, hardware: Hardware, vocab_source: str = "") -> Plan:
    facts = model_facts(shape.model, shape.seq_len)
    act_bytes = shape.zero.weight_bytes  # DeepSpeed casts the module: activations share the weights' dtype
    return Plan(
        shape=shape,
        hardware=hardware,
        facts=facts,
        states=model_states(facts.params, facts.largest_layer, hardware.world_size, shape.zero, shape.grad_accum),
        activations=activation_memory(
            shape.model, shape.seq_len, shape.micro_batch_size, shape.checkpointing, act_bytes
        ),
        comm_buffers=communication_buffers(shape.zero, facts.largest_layer),
        vocab_source=vocab_source,
    )


def resolve_model(config: TrainConfig) -> tuple[LlamaConfig, str]:
    """The LlamaConfig the trainer would build, and where its vocabulary size comes from.

    The trainer takes the vocabulary from the tokenizer unless ``model.vocab_size`` is set; the planner reads the
    tokenizer when the file exists, else uses the default corpus's ``data.vocab_size`` or the preset's.
    """
    data = config.data
    tokenizer_vocab, source = None, f"preset {config.model.preset} (training uses the tokenizer's)"
    if data.default_corpus:
        tokenizer_vocab, source = data.vocab_size, "data.vocab_size (default corpus)"
    elif data.tokenizer and Path(data.tokenizer).expanduser().is_file():
        from megatron_adamc.data.tokenizer import Tokenizer

        tokenizer_vocab = Tokenizer(str(Path(data.tokenizer).expanduser()), field="data.tokenizer").vocab_size
        source = f"data.tokenizer ({data.tokenizer})"
    if "vocab_size" in config.model.overrides():
        source = "model.vocab_size"
    return model_config(config, tokenizer_vocab), source


def plan_run(config: TrainConfig, hardware: Hardware) -> Plan:
    """The plan of ``config`` on ``hardware``; bad input raises a one-line ``UserError``."""
    from megatron_adamc.config.deepspeed_json import build_deepspeed_config

    for name, value in (("--nodes", hardware.nodes), ("--gpus-per-node", hardware.gpus_per_node)):
        if value < 1:
            raise UserError(f"{name}={value}: must be at least 1")
    for name, value in (("--gpu-memory-gb", hardware.gpu_memory_gib), ("--peak-tflops", hardware.peak_tflops)):
        if not value > 0 or math.isinf(value):
            raise UserError(f"{name}={value}: must be a positive number")
    if not 0 < hardware.mfu <= 1:
        raise UserError(f"--mfu={hardware.mfu}: must be in (0, 1], e.g. 0.4")
    model, vocab_source = resolve_model(config)
    ds = build_deepspeed_config(config, hardware.world_size)
    tc = config.train
    shape = RunShape(
        model=model,
        zero=zero_setup(ds, tc.deepspeed),
        deepspeed_path=tc.deepspeed,
        micro_batch_size=tc.micro_batch_size,
        grad_accum=tc.grad_accum,
        seq_len=tc.seq_len,
        checkpointing=tc.activation_checkpointing,
        steps=tc.steps,
        preset=config.model.preset,
    )
    return plan_shape(shape, hardware, vocab_source)


# --- the fix when it does not fit ---------------------------------------------------------------------------


def _zero_fix(stage: int, precision: str) -> str:
    if precision == "fp16":
        return f"ZeRO-{stage}: zero_optimization.stage={stage} in the DeepSpeed JSON"
    suffix = "_bf16" if precision == "bf16" else ""
    return f"ZeRO-{stage}: --set train.deepspeed=configs/deepspeed/zero{stage}{suffix}.json"


def _candidates(plan: Plan) -> list[tuple[str, RunShape, Hardware]]:
    """Single changes, those that shrink the largest term first."""
    shape, hw = plan.shape, plan.hardware
    activation_side: list[tuple[str, RunShape, Hardware]] = []
    for mode in {"none": ("selective", "full"), "selective": ("full",)}.get(shape.checkpointing, ()):
        activation_side.append((f"--set train.activation_checkpointing={mode}", replace(shape, checkpointing=mode), hw))
    per_gpu = shape.micro_batch_size * shape.grad_accum
    micro = shape.micro_batch_size // 2
    while micro >= 1:
        if per_gpu % micro == 0:
            accum = per_gpu // micro
            fix = f"--set train.micro_batch_size={micro} --set train.grad_accum={accum} (same global batch)"
            activation_side.append((fix, replace(shape, micro_batch_size=micro, grad_accum=accum), hw))
        micro //= 2
    state_side: list[tuple[str, RunShape, Hardware]] = []
    for stage in range(shape.zero.stage + 1, 4):
        state_side.append(
            (_zero_fix(stage, shape.zero.precision), replace(shape, zero=replace(shape.zero, stage=stage)), hw)
        )
    for nodes in (hw.nodes * 2**k for k in range(1, 11)):
        batch = per_gpu * nodes * hw.gpus_per_node
        fix = f"more nodes: --nodes {nodes} (the global batch grows to {batch} sequences unless train.grad_accum falls)"
        state_side.append((fix, shape, replace(hw, nodes=nodes)))
    if plan.largest_term in ("activations", "buffers"):
        return activation_side + state_side
    return state_side + activation_side


def suggest_fix(plan: Plan) -> tuple[str, Plan | None]:
    """The first single change that makes the plan fit, else full checkpointing, micro batch 1 and ZeRO-3 with the
    nodes that then fit: ``(advice, the plan after the fix, or None when nothing fits)``."""
    for fix, shape, hw in _candidates(plan):
        fixed = plan_shape(shape, hw, plan.vocab_source)
        if fixed.fits:
            return fix, fixed
    shape = plan.shape
    shape = replace(
        shape,
        checkpointing="full",
        micro_batch_size=1,
        grad_accum=shape.grad_accum * shape.micro_batch_size,
        zero=replace(shape.zero, stage=3),
    )
    for nodes in (plan.hardware.nodes * 2**k for k in range(0, 11)):
        fixed = plan_shape(shape, replace(plan.hardware, nodes=nodes), plan.vocab_source)
        if fixed.fits:
            zero = _zero_fix(3, shape.zero.precision)
            return f"--set train.activation_checkpointing=full, micro batch 1, {zero}, --nodes {nodes}", fixed
    return (
        "nothing fits up to 1024x the nodes with full checkpointing, micro batch 1 and ZeRO-3: "
        "shorten train.seq_len, use GPUs with more memory, or tensor/pipeline parallelism (configs/megatron/)",
        None,
    )
