"""Tracked per-parameter norms on real ZeRO partitions (2 gloo ranks) against norms of the gathered tensors.

Tolerances: norms, ratios and predictions within 2e-5 relative (fp32 sums over slices vs fp32 norms of the
whole tensor, and a clip factor applied in float64); cosines within 2e-5 absolute; the bf16 stale fraction
exactly (it counts the same elements); amax exactly for weights (max of the same numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_adamc.ports import free_port

WORKER = Path(__file__).parent / "workers" / "tracking_worker.py"
CONFIGS = [
    "stage0_fp32",
    "stage0_bf16",
    "zero1_bf16",
    "zero1_bf16_fp32acc",
    "zero2_bf16",
    "zero3_bf16",
    "zero2_offload",
    "zero3_offload",
]
EXPECTED_KIND = {
    "stage0_fp32": "stage0",
    "stage0_bf16": "stage0_lp",
    "zero1_bf16": "zero1",
    "zero1_bf16_fp32acc": "bf16",
    "zero2_bf16": "zero2",
    "zero3_bf16": "zero3",
    "zero2_offload": "zero2",
    "zero3_offload": "zero3",
}
REL = 2e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("tracking") / "results.json"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("config", CONFIGS)
def test_partition_norms_match_gathered_tensors(results: dict, config: str) -> None:
    result = results[config]
    errors, info = result["errors"], result["info"]
    assert info["kind"] == EXPECTED_KIND[config], info
    assert info["basic"] == ("DeepSpeedCPUAdam" if "offload" in config else "FusedAdam"), info
    assert info["checked_steps"] == [0, 2, 4] or info["checked_steps"][:3] == [0, 2, 4]
    for key in ("weight_norm", "grad_norm", "update_norm", "grad_weight_ratio", "normalized_update_ratio"):
        assert errors[key] < REL, (key, errors[key])
    assert errors["predicted_adam_ratio"] < REL and errors["predicted_kosson_ratio"] < REL
    assert errors["cos_weight_grad_abs"] < REL
    assert errors["global_grad_norm"] < REL
    assert errors["fp8_weight_amax"] == 0.0
    assert errors["fp8_grad_amax"] < REL
    assert errors["act_rms"] < REL
    assert errors["max_attn_logit"] == 0.0
    assert info["n_logits"] == 2 and info["n_acts"] == 8
    assert info["clip_factor"] > 1.0, "the test must clip, or unclipping is not exercised"
    if "bf16" in config or "offload" in config:
        assert errors["bf16_stale_frac_abs"] == 0.0


def test_spike_event_names_layers(results: dict) -> None:
    events = results["zero2_bf16"]["info"]["events"]
    spikes = [e for e in events if e["kind"] == "loss" and e["step"] == 11]
    assert spikes, events
    event = spikes[0]
    assert event["layers_step"] == 12 and event["zscore"] > 6
    assert len(event["top_layers"]) == 5
    changes = [layer["log_change"] for layer in event["top_layers"]]
    assert changes == sorted(changes, reverse=True)
