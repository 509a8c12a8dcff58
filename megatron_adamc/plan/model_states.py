"""Parameters, gradients and optimizer states per GPU under DeepSpeed ZeRO, as DeepSpeed 0.19 allocates them.

With ``w`` the bytes of a weight (2 under bf16/fp16, 4 in fp32), ``P`` the parameters, ``N`` the data-parallel GPUs,
``L`` the largest module's own parameters, and Adam-type optimizers (AdamC, AdamW: two fp32 moments):

====== ========================== =============================== =========================================
stage  parameters                 gradients                       optimizer (fp32 master, fp32 grad, m, v)
====== ========================== =============================== =========================================
0      w P                        w P                             16 P (bf16/fp16), 8 P (fp32: no master copy)
1      w P                        w P (grad_accum > 1), else w P/N 16 P/N
2      w P                        w P/N                           16 P/N
3      w P/N + w L (gathered)     w P/N + w L (gathered)          12 P/N + 4 min(P/N, sub_group_size)
====== ========================== =============================== =========================================

CPU offload of the optimizer moves the optimizer column and the gradient partition to the host (ZeRO-1/2 keep no
gradient partition on the GPU then); ZeRO-3's parameter offload moves the parameter partition too.

DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs``: ``2P + 18P/N``; ``estimate_zero3_...``:
``18P/N + 4L``) assume 16-bit weights; for ZeRO-2 the table gives the same bytes. For ZeRO-3 it gives ``2P/N``
more: the 16-bit gradient partition (``grad_partitions_flat_buffer`` in ``stage3.py``) that the estimator leaves
out; and where a partition exceeds ``sub_group_size`` it counts the fp32 gradient of one sub-group, as ZeRO-3
steps sub-group by sub-group, where the estimator counts the whole partition. ``tests/test_plan.py`` asserts these
statements against the installed DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_adamc.errors import ConfigError

# DeepSpeed's defaults for the zero_optimization keys read here (DeepSpeedZeroConfig in deepspeed 0.19; the test
# suite checks them against the installed DeepSpeed, so importing DeepSpeed is not needed to plan).
ZERO_DEFAULTS: dict[str, Any] = {
    "reduce_bucket_size": 500_000_000,
    "overlap_comm": None,  # DeepSpeed: true at stage 3, false below
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 50_000_000,
    "sub_group_size": 1_000_000_000,
}


@dataclass(frozen=True)
class ZeroSetup:
    """What the DeepSpeed JSON says about memory: ZeRO stage, precision, offload and bucket sizes."""

    stage: int
    precision: str  # bf16 | fp16 | fp32
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: int = ZERO_DEFAULTS["reduce_bucket_size"]
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = ZERO_DEFAULTS["stage3_prefetch_bucket_size"]
    sub_group_size: int = ZERO_DEFAULTS["sub_group_size"]

    @property
    def weight_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    def describe(self) -> str:
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if on]
        return f"ZeRO-{self.stage} {self.precision}" + (
            f", {' and '.join(offload)} offloaded to CPU" if offload else ""
        )


def _offloaded(section: Any) -> bool:
    return isinstance(section, dict) and section.get("device", "none") not in (None, "none")


def _count(zero: dict[str, Any], key: str, path: str) -> int:
    value = zero.get(key, ZERO_DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{path}: zero_optimization.{key}={value!r} must be a positive number of elements")
    return int(value)


def zero_setup(ds: dict[str, Any], path: str) -> ZeroSetup:
    """The memory-relevant part of a DeepSpeed JSON (as ``config/deepspeed_json.py`` reads it)."""
    from megatron_adamc.config.deepspeed_json import precision, zero_stage

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be an object")
    try:
        stage = zero_stage(ds)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: zero_optimization.stage={zero.get('stage')!r} must be 0, 1, 2 or 3") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} must be 0, 1, 2 or 3")
    offload_optimizer = _offloaded(zero.get("offload_optimizer"))
    offload_param = _offloaded(zero.get("offload_param"))
    if offload_optimizer and stage == 0:
        raise ConfigError(f"{path}: offload_optimizer needs ZeRO stage 1, 2 or 3")
    if offload_param and stage != 3:
        raise ConfigError(f"{path}: offload_param needs ZeRO stage 3")
    overlap = zero.get("overlap_comm", ZERO_DEFAULTS["overlap_comm"])
    return ZeroSetup(
        stage=stage,
        precision=precision(ds),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        reduce_bucket_size=_count(zero, "reduce_bucket_size", path),
        overlap_comm=stage == 3 if overlap is None else bool(overlap),
        contiguous_gradients=bool(zero.get("contiguous_gradients", ZERO_DEFAULTS["contiguous_gradients"])),
        prefetch_bucket_size=_count(zero, "stage3_prefetch_bucket_size", path),
        sub_group_size=_count(zero, "sub_group_size", path),
    )


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def model_states(params: int, largest_layer: int, world_size: int, setup: ZeroSetup, grad_accum: int) -> ModelStates:
    """The table of the module docstring, in bytes per GPU."""
    w, stage, n = setup.weight_bytes, setup.stage, world_size
    shard = params / n
    if stage == 0:
        return ModelStates(round(w * params), round(w * params), round((8 if w == 4 else 16) * params))
    if stage in (1, 2):
        if setup.offload_optimizer:
            grads = 0.0  # reduced straight into the host's fp32 partition
        elif stage == 1 and grad_accum > 1:
            grads = w * params  # full gradients accumulate between reductions
        else:
            grads = w * shard
        optimizer = 0.0 if setup.offload_optimizer else 16 * shard
        return ModelStates(round(w * params), round(grads), round(optimizer))
    gathered = w * largest_layer  # one module's full parameters, and its full gradient, at a time
    param_shard = 0.0 if setup.offload_param else w * shard
    grad_shard = 0.0 if setup.offload_optimizer else w * shard
    optimizer = 0.0 if setup.offload_optimizer else 12 * shard + 4 * min(shard, setup.sub_group_size)
    return ModelStates(round(param_shard + gathered), round(grad_shard + gathered), round(optimizer))


def communication_buffers(setup: ZeroSetup, largest_layer: int) -> int:
    """DeepSpeed's gradient buckets (and ZeRO-3's parameter prefetch) on the GPU, in bytes.

    ZeRO-1/2: ``reduce_bucket_size`` elements of the 16-bit gradient, twice with ``overlap_comm``, plus one
    parameter's gradient as autograd produces it before it is copied into a bucket (the largest one counts).
    ZeRO-3: one reduce bucket and ``stage3_prefetch_bucket_size`` elements of parameters being gathered ahead.
    """
    w = setup.weight_bytes
    if setup.stage == 0:
        return 0
    if setup.stage in (1, 2):
        buckets = (2 if setup.overlap_comm else 1) * setup.reduce_bucket_size if setup.contiguous_gradients else 0
        return w * (buckets + largest_layer)
    return w * ((setup.reduce_bucket_size if setup.contiguous_gradients else 0) + setup.prefetch_bucket_size)
