"""Every path where DeepSpeed 0.19 steps, on a real one-rank engine in this process (CPU, gloo).

Paths that step through the base optimizer (fp16 dynamic loss scaling, the torch-autocast GradScaler, BF16_Optimizer):
AdamC's FP32 master tensors must equal, bit for bit, DeepSpeed's "AdamW" on the same path whose weight decay the test
sets by hand to lambda * lr_t / lr_max before every step, and the decay AdamC applied must be that value on every step
that was taken. An overflow is injected at step INF_STEP (the loss times inf), so each path really skips a step (the
BF16_Optimizer skips on a non-finite gradient norm). Paths that step with something else are refused at initialize
with one line naming the key (megatron_adamc/deepspeed/step_paths.py). What needs a GPU: tests/workers/ds_paths_gpu.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from workers.ds_adamc_worker import LR, WD, make_model
from workers.ds_paths_worker import INF_STEP, PATHS, REFUSED, STEPS, ds_config, partial_offload_backup_lr, run

import megatron_adamc.deepspeed as mad
from megatron_adamc.core.decay import AdamCError


@pytest.fixture(scope="module")
def results(single_rank_dist):
    from deepspeed.accelerator import get_accelerator

    cache: dict[str, dict] = {}

    def get(path: str) -> dict:
        if path not in cache:
            extra = PATHS[path][0]
            cache[path] = {"adamc": run("AdamC", extra, False), "reference": run("AdamW", extra, True)}
        return cache[path]

    with pytest.MonkeyPatch.context() as patch:
        # DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has fp16 kernels for this CPU (AVX512-FP16/AMX);
        # torch's own fp16 CPU ops, which the fp16 paths here run, work on any x86 CPU: lift only that probe.
        patch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
        yield get


@pytest.mark.parametrize("path", list(PATHS))
def test_adamc_equals_hand_decayed_adamw_on_the_path(results, path):
    r = results(path)
    _, wrapper, skips = PATHS[path]
    adamc, ref = r["adamc"], r["reference"]
    assert adamc["wrapper"] == ref["wrapper"] == wrapper  # the path under test really ran
    expected_taken = [s + 1 for s in range(STEPS) if not (skips and s == INF_STEP)]
    assert adamc["taken"] == ref["taken"] == expected_taken  # the injected overflow skipped exactly that step
    assert adamc["lrs"] == ref["lrs"]
    for a, b in zip(adamc["master"], ref["master"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", list(PATHS))
def test_applied_decay_on_every_step_taken(results, path):
    r = results(path)["adamc"]
    stepped = set(r["taken"])
    last = WD  # before the first step the group holds lambda itself
    for step, (lr, applied) in enumerate(zip(r["lrs"], r["applied"], strict=True)):
        if step + 1 in stepped:
            assert applied == pytest.approx(WD * lr / LR, rel=1e-12, abs=0)
            last = applied
        else:
            assert applied == last  # a skipped step applies nothing and changes nothing


@pytest.mark.parametrize("key", list(REFUSED))
def test_paths_adamc_cannot_correct_are_refused_at_initialize(single_rank_dist, key):
    model = make_model()
    cfg = ds_config("AdamC", REFUSED[key])
    with pytest.raises(AdamCError, match="^" + re.escape(key)) as err:
        mad.initialize(model=model, model_parameters=mad.decay_param_groups(model), config=cfg)
    assert "\n" not in str(err.value)


def test_partial_offload_backup_optimizer_misses_the_schedule(single_rank_dist):
    """Why ratio < 1 is refused: with plain AdamW the backup optimizer's first group keeps its initial lr (and decay)
    while DeepSpeed's scheduler moves the base optimizer's. Built on the CPU too (where no sub-group is on a GPU)."""
    figures = partial_offload_backup_lr()
    assert figures["backup_lr_frozen"], figures
