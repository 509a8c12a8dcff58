"""The GPU half of "every path where DeepSpeed steps": run on one CUDA GPU, returns a dict of figures.

``python tests/workers/ds_paths_gpu.py [--out FILE.json]`` (one process; it sets up its own one-rank NCCL group), or
``from workers.ds_paths_gpu import check_paths_on_gpu; figures = check_paths_on_gpu()`` with ``tests/`` on sys.path.
Every engine is one rank, the small model of ds_adamc_worker, 8 steps, an overflow injected at step 3; each AdamC run
is compared with DeepSpeed's "AdamW" on the same path whose weight decay is set by hand to lambda * lr_t / lr_max.

Figures, per path: ``wrapper`` (what DeepSpeed stepped through), ``bitwise_equal`` and ``max_abs_diff`` (AdamC vs the
hand-decayed AdamW, FP32 masters), ``taken`` (steps the base optimizer took), ``decay_ok`` (lambda * lr_t / lr_max on
every step taken), or ``error`` where the path would not run. Paths: the CPU set of tests/test_deepspeed_paths.py with
CUDA kernels (fp16 dynamic loss scaling on ZeRO 0 and 2, the torch-autocast GradScaler, BF16_Optimizer), DeepCompile
on ZeRO 1 and 3 (CUDA only), ZeRO-3 partial optimizer offload with plain AdamW (``backup_lr_frozen``: whether the
backup optimizer's first group kept its initial lr while the schedule moved, the reason AdamC refuses that path), and
the refusals (``refused``: the one-line message) of ratio < 1, ZenFlow and SuperOffload where they really engage.
Expected: every ``bitwise_equal`` true (or ``max_abs_diff`` 0), every ``decay_ok`` true, three ``refused`` messages.
Budget: about a minute plus DeepSpeed's first JIT build of FusedAdam / CPUAdam (minutes) if the image lacks them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for workers.*

import torch  # noqa: E402
from workers.ds_adamc_worker import LR, WD, make_model  # noqa: E402
from workers.ds_paths_worker import (  # noqa: E402
    INF_STEP,
    PATHS,
    REFUSED,
    STEPS,
    ds_config,
    partial_offload_backup_lr,
    run,
)

GPU_PATHS = {
    "deepcompile-zero1": ({"compile": {"deepcompile": True}, "zero_optimization": {"stage": 1}}, None, False),
    "deepcompile-zero3": ({"compile": {"deepcompile": True}, "zero_optimization": {"stage": 3}}, None, False),
}


def _init_process_group() -> None:
    import deepspeed

    if not torch.distributed.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        deepspeed.init_distributed()


def _compare(extra: dict, skips: bool) -> dict:
    adamc, ref = run("AdamC", extra, False), run("AdamW", extra, True)
    diffs = [(a - b).abs().max().item() for a, b in zip(adamc["master"], ref["master"], strict=True)]
    taken = set(adamc["taken"])
    decay_ok = all(
        applied == WD * lr / LR
        for step, (lr, applied) in enumerate(zip(adamc["lrs"], adamc["applied"], strict=True))
        if step + 1 in taken
    )
    return {
        "wrapper": adamc["wrapper"],
        "bitwise_equal": all(torch.equal(a, b) for a, b in zip(adamc["master"], ref["master"], strict=True)),
        "max_abs_diff": max(diffs),
        "taken": sorted(taken),
        "expected_taken": [s + 1 for s in range(STEPS) if not (skips and s == INF_STEP)],
        "same_taken_as_reference": adamc["taken"] == ref["taken"],
        "decay_ok": decay_ok,
    }


def _refusal(extra: dict) -> dict:
    import megatron_adamc.deepspeed as mad

    model = make_model()
    try:
        mad.initialize(model=model, model_parameters=mad.decay_param_groups(model), config=ds_config("AdamC", extra))
    except Exception as err:  # noqa: BLE001 - the figure is the message, whatever raised it
        return {"refused": f"{type(err).__name__}: {err}"}
    return {"refused": None}


def check_paths_on_gpu() -> dict:
    """Runs every GPU path; never raises for one path (its figure says ``error``)."""
    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    _init_process_group()
    figures: dict = {"device": torch.cuda.get_device_name(0)}
    cases = {name: (extra, skips) for name, (extra, _, skips) in {**PATHS, **GPU_PATHS}.items()}
    for name, (extra, skips) in cases.items():
        try:
            figures[name] = _compare(extra, skips)
        except Exception as err:  # noqa: BLE001
            figures[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
    try:
        figures["partial-offload-adamw-backup-lr"] = partial_offload_backup_lr()
    except Exception as err:  # noqa: BLE001
        figures["partial-offload-adamw-backup-lr"] = {"error": f"{type(err).__name__}: {err}"[:500]}
    for key, extra in REFUSED.items():
        figures[f"refusal {key}"] = _refusal(extra)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    figures = check_paths_on_gpu()
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
