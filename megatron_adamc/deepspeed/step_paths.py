"""Where DeepSpeed steps other than through the base optimizer's ``step()``, and what AdamC does on each path.

AdamC's corrected decay is set in the base optimizer's step pre-hook. DeepSpeed 0.19 steps through it on ZeRO 0-3,
under CPU/NVMe offload, with fp16 dynamic loss scaling (an overflowing step is skipped whole: no step, no decay, no
scheduler step), through the torch-autocast GradScaler (``GradScaler.step`` calls ``step()`` or skips), through
BF16_Optimizer and under DeepCompile (which changes how gradients are reduced, not the step). Three paths step with
something else, each built from copies of the groups taken at initialize, so AdamC refuses them there with one line:

- ZeRO-3 partial optimizer offload (``offload_optimizer.ratio`` < 1): the GPU-resident sub-groups are stepped by a
  separate torch AdamW (``backup_optimizer``) whose first group is a copy: it keeps the initial weight decay, and even
  the initial lr, since DeepSpeed's scheduler writes only the base optimizer's groups.
- ZenFlow (``zero_optimization.zenflow``): a selective AdamW on the GPU built from copies of the groups, and a CPU
  Adam fed from the groups outside any ``step()``.
- SuperOffload (``offload_optimizer.super_offload``): a worker process whose own CPU Adam copied the groups at
  start-up and is sent only the lr.
"""

from __future__ import annotations

from typing import Any

from megatron_adamc.core.decay import AdamCError


def refuse_unsupported_step_paths(engine: Any) -> None:
    """Raises AdamCError naming the config key of a path whose steps AdamC cannot correct."""
    from megatron_adamc.deepspeed.internals import zero_config

    zero = zero_config(engine)
    offload = zero.offload_optimizer
    if zero.zenflow is not None:
        raise AdamCError(
            "zero_optimization.zenflow steps with its own Adam kernels fed from copies of the param groups, which "
            "AdamC cannot correct: remove zenflow or set optimizer.type to AdamW"
        )
    if offload is not None and getattr(offload, "super_offload", False):
        raise AdamCError(
            "zero_optimization.offload_optimizer.super_offload steps in a worker process whose optimizer copied the "
            "param groups at start-up, which AdamC cannot correct: set it to false or set optimizer.type to AdamW"
        )
    if engine.zero_optimization_stage() == 3 and engine.zero_use_cpu_optimizer() and offload.ratio != 1.0:
        raise AdamCError(
            f"zero_optimization.offload_optimizer.ratio {offload.ratio} < 1 steps the GPU-resident sub-groups with a "
            "separate torch AdamW built from a copy of the first param group, which AdamC cannot correct: set it to 1"
        )
