"""The GPU check on this CPU (``benchmarks/gpu_check.py --cpu --quick``): every step runs at tiny sizes through the
same code a GPU run takes, so the one command prepared for a rare GPU cannot rot. Plus: a step that fails is recorded
while the others run, and the Megatron step's readers on real TensorBoard files and Megatron's log format.

The quick check takes about 1.5-2 minutes on an idle 2-core machine (more under load); the rest, seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMALL_CORPUS_DIR, SMALL_TRAIN_SETS, subprocess_env

sys.path.insert(0, str(REPO / "benchmarks"))
from gpu import megatron as megatron_step  # noqa: E402
from gpu.trainer_runs import CPU_DATA  # noqa: E402

CHECK = REPO / "benchmarks" / "gpu_check.py"
STEPS = ["parity", "throughput", "tracking", "ds_paths", "megatron", "curves"]


def gpu_check(tmp_path: Path, *args: str, data_cache: Path = SMALL_CORPUS_DIR) -> tuple[int, dict, str]:
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(CHECK), "--cpu", "--quick", "--out", str(out), "--work", str(work)]
    cmd += ["--data-cache", str(data_cache), *args]
    # No Megatron-LM checkout: the CI machine has none; the device machine gets .whl/Megatron-LM.
    env = {k: v for k, v in subprocess_env().items() if k != "MEGATRON_LM_PATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
    return proc.returncode, report, proc.stdout + proc.stderr


def test_cpu_data_is_the_test_suites_small_corpus():
    # The same vocabulary and size: the quick check reuses the suite's prepared corpus instead of building its own.
    assert f"data.vocab_size={CPU_DATA['vocab_size']}" in SMALL_TRAIN_SETS
    assert f"data.max_bytes={CPU_DATA['max_bytes']}" in SMALL_TRAIN_SETS


def test_quick_cpu_check_runs_every_step(tmp_path):
    code, report, output = gpu_check(tmp_path)
    assert code == 0, output[-6000:]
    assert report["device"]["name"] and report["device"]["torch"]
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    for step in steps.values():
        assert {"name", "ok", "seconds"} <= step.keys()
        assert step["ok"] is not False, step

    parity = steps["parity"]
    assert parity["fused_adam_built"] is True
    cases = [(c["zero"], c["precision"]) for c in parity["cases"]]
    assert cases == [(0, "fp32"), (3, "fp32"), (0, "bf16"), (3, "bf16")]
    for case in parity["cases"]:
        assert case["kernel"] == "FusedAdam"  # DeepSpeed's own kernel (its CPU build here), not a fallback
        assert case["max_rel_diff"] <= 1e-6 and case["same_lrs"] and case["decay_rule_error"] <= 1e-12
    assert parity["cases"][0]["adamw_gap"] >= 1e-3  # plain AdamW differs: the comparison can fail
    cost = parity["step_cost"]
    assert cost["kernel"] == "FusedAdam (DeepSpeed CPU build)" and cost["adamw_ms"] > 0 and cost["adamc_ms"] > 0

    runs = steps["throughput"]["runs"]
    assert [(r["model"], r["variant"]) for r in runs] == [("micro", "eager"), ("micro", "ckpt-full")]
    for r in runs:
        assert r["steps"] == 12 and r["finite"] and r["tokens_per_s"] > 0 and r["precision"] == "bf16"
        assert r["tokens_per_step"] == 2 * 64  # micro batch x sequence, from the trainer's own figures
        assert r["plan"]["total_gib"] > r["plan"]["allocated_gib"] > 0 and r["plan"]["fits"] is True  # `plan --json`

    tracking = steps["tracking"]
    assert set(tracking["modes"]) == {"off", "every step", "every 10 steps"}
    assert tracking["modes"]["off"]["tracked_steps"] == []
    assert tracking["modes"]["every step"]["tracked_steps"] == list(range(1, 31))
    assert {10, 20, 30} <= set(tracking["modes"]["every 10 steps"]["tracked_steps"])
    assert set(tracking["overhead"]) == {"every step", "every 10 steps"}

    assert "needs a GPU" in steps["ds_paths"]["skipped"]
    assert steps["megatron"]["ok"] is None and "Megatron-LM not found" in steps["megatron"]["skipped"]

    curves = steps["curves"]
    assert set(curves["runs"]) == {"AdamW", "AdamC"}
    for r in curves["runs"].values():
        assert r["steps"] == curves["steps"] >= 30 and math.isfinite(r["grad_norm_rise"])
    assert curves["lr"] * curves["weight_decay"] * curves["steps"] == pytest.approx(6.0)
    out = tmp_path / "out"
    assert (out / "curves.png").stat().st_size > 10_000
    markdown = (out / "gpu_check.md").read_text()
    assert "| step | result | seconds |" in markdown and "AdamC vs hand-set AdamW" in markdown
    assert "===== parity: ok" in (out / "gpu_check.log").read_text()


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path):
    not_a_folder = tmp_path / "corpus-is-a-file"
    not_a_folder.write_text("the trainer cannot put its corpus here\n")
    code, report, output = gpu_check(tmp_path, "--only", "throughput,ds_paths", data_cache=not_a_folder)
    assert code == 1, output[-4000:]
    throughput, ds_paths = report["steps"]
    assert throughput["ok"] is False
    eager, checkpointed = throughput["runs"]
    assert "data.cache_dir" in eager["error"] or "corpus-is-a-file" in eager["error"]  # the trainer's own line
    assert checkpointed["skipped"] == "not run: micro eager failed"
    assert ds_paths["ok"] is None and ds_paths["seconds"] < 60  # ran after the failure


def test_unknown_step_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CHECK), "--cpu", "--only", "parity,nope", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown step 'nope'; the steps are parity, throughput" in proc.stderr.strip().splitlines()[-1]


MEGATRON_LINE = (
    " [2026-11-30 10:00:00.000000] iteration {:8d}/{:8d} | consumed samples: {:12d} | elapsed time per iteration (ms):"
    " {:.1f} | throughput per GPU (TFLOP/s/GPU): 1.0 | learning rate: {:.6E} | global batch size:    16 | lm loss:"
    " {:.6E} | loss scale: 1.0 | grad norm: 1.000 |"
)  # Megatron-LM core_v0.16.1 training_log's format


def test_megatron_log_and_tensorboard_readers(tmp_path):
    from torch.utils.tensorboard import SummaryWriter  # what Megatron-LM writes its scalars with

    peak, wd = 1e-3, 0.1
    lrs = {i: peak * min(1.0, i / 5) * (0.5 + 0.5 * math.cos(math.pi * i / 30)) for i in range(1, 31)}
    writer = SummaryWriter(str(tmp_path / "tb"))
    for i, lr in lrs.items():
        writer.add_scalar(megatron_step.LR_TAG, lr, i)
        writer.add_scalar(megatron_step.DECAY_TAG, wd * lr / peak * (1.001 if i == 17 else 1.0), i)  # one off by 0.1%
    writer.close()
    scalars = megatron_step.tensorboard_scalars(tmp_path / "tb")
    found = megatron_step.decay_against_formula(scalars, peak, wd)
    assert found["iterations_compared"] == 30
    assert found["max_rel_error"] == pytest.approx(1e-3, rel=1e-3)  # the injected error, not float32 noise

    text = "\n".join(MEGATRON_LINE.format(i, 30, 16 * i, 100.0 + i, lrs[i], 10.0 - i / 10) for i in range(1, 31))
    log = megatron_step.iteration_log("some start-up line\n" + text)
    assert log["times_ms"][1] == 101.0 and log["times_ms"][30] == 130.0 and len(log["times_ms"]) == 30
    assert log["losses"][30] == pytest.approx(7.0)


def test_ds_paths_verdicts_read_the_paths_script_figures():
    from gpu.ds_paths import verdicts

    results = {  # the shape tests/workers/ds_paths_gpu.py writes (issue 13)
        "device": "NVIDIA H200",
        "fp16-zero2": {"bitwise_equal": True, "max_abs_diff": 0.0, "decay_ok": True, "same_taken_as_reference": True},
        "bf16-optimizer": {"bitwise_equal": False, "max_abs_diff": 0.0, "decay_ok": True},
        "autocast": {"bitwise_equal": False, "max_abs_diff": 2e-3, "decay_ok": True},
        "fp16-zero0": {"bitwise_equal": True, "decay_ok": True, "same_taken_as_reference": False},
        "deepcompile-zero1": {"error": "RuntimeError: no"},
        "refusal ratio": {"refused": "AdamCError: offload_optimizer.ratio=0.5 ..."},
        "refusal zenflow": {"refused": None},
        "partial-offload-adamw-backup-lr": {"backup_lr_frozen": True},
    }
    assert verdicts(results) == {
        "fp16-zero2": "equal",
        "bf16-optimizer": "equal",
        "autocast": "differs",
        "fp16-zero0": "differs",
        "deepcompile-zero1": "error",
        "refusal ratio": "refused",
        "refusal zenflow": "not refused",
        "partial-offload-adamw-backup-lr": "reported",
    }
    assert verdicts({"error": "no CUDA device"}) == {} and verdicts(None) == {}
