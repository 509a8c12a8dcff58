"""Unmodified HF Trainer and Accelerate scripts get AdamC from the DeepSpeed JSON alone, under the real launchers.

The scripts (tests/workers/hf_trainer_script.py, accelerate_script.py) never name megatron-adamc; they run in a venv
where the package is installed from its wheel (tests/workers/autoload_venv.py), so only the start-up hook can make
``"type": "AdamC"`` work there. Three launches, one rank each, a tiny random LlamaForCausalLM, no download:

- the ``deepspeed`` launcher + HF Trainer, ``deepspeed="ds.json"`` with "auto" values and HF's own cosine schedule:
  AdamC, DeepSpeed AdamW with the decay set by hand, plain AdamW, and AdamC with ``decay_split`` under ZeRO-3 with a
  DeepSpeed WarmupDecayLR section of "auto" values;
- torchrun + ``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=...))``: AdamC and the hand-decayed AdamW;
- ``accelerate launch --config_file`` naming the same JSON: AdamC.

Asserted: the FP32 weights equal the hand-decayed AdamW bit for bit, the decay applied at every step is
lambda * lr_t / lr_max with lr_max the schedule's peak (HF's ``learning_rate``), plain AdamW ends elsewhere, and the
split leaves exactly the 1-D tensors undecayed. Each launch writes its results; the tests share them.
"""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch
from conftest import WORKERS, free_port
from transformers import LlamaForCausalLM
from workers.autoload_venv import clean_env, installed_venv, venv_python
from workers.tiny_llama import LR, WD, llama_config

MIN_ADAMW_GAP = 1e-3

HF_JSON = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamC", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**9,
}
ACCELERATE_JSON = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamC", "params": {"lr": "auto", "weight_decay": "auto", "betas": [0.9, 0.95], "eps": 1e-8}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**9,
}


def variant(base: dict, optimizer: str, **changes) -> dict:
    cfg = copy.deepcopy(base)
    cfg["optimizer"]["type"] = optimizer
    for key, value in changes.items():
        if key == "split":
            cfg["optimizer"]["params"]["decay_split"] = True
        else:
            cfg[key] = value
    return cfg


def write_json(path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def launch(cmd: list, out) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent, env=clean_env())
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return torch.load(out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    python = venv_python(installed_venv(tmp_path_factory.getbasetemp() / "autoload-wheel", "wheel"))
    tmp = tmp_path_factory.mktemp("hf")
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name in cache:
            return cache[name]
        out = tmp / f"{name}.pt"
        if name == "hf-trainer":
            warmup_decay = {"type": "WarmupDecayLR", "params": dict.fromkeys(
                ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps"), "auto")}  # fmt: skip
            runs = {
                "adamc": write_json(tmp / "adamc.json", HF_JSON),
                "reference": write_json(tmp / "adamw.json", variant(HF_JSON, "AdamW")) + ":hand",
                "adamw": str(tmp / "adamw.json"),
                "split": write_json(
                    tmp / "split.json",
                    variant(HF_JSON, "AdamC", split=True, scheduler=warmup_decay, zero_optimization={"stage": 3}),
                ),
            }
            cmd = [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port())]
            cmd += [WORKERS / "hf_trainer_script.py", out, *(f"{k}={v}" for k, v in runs.items())]
        elif name == "accelerate-plugin":
            adamc = write_json(tmp / "acc_adamc.json", ACCELERATE_JSON)
            adamw = write_json(tmp / "acc_adamw.json", variant(ACCELERATE_JSON, "AdamW"))
            cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
            cmd += [f"--rdzv-endpoint=127.0.0.1:{free_port()}", WORKERS / "accelerate_script.py", out]
            cmd += [f"adamc=plugin:{adamc}", f"reference=plugin:{adamw}:hand"]
        else:  # accelerate-launch
            ds_json = write_json(tmp / "acc_launch.json", ACCELERATE_JSON)
            config = tmp / "accelerate.yaml"
            config.write_text(
                "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                f"deepspeed_config:\n  deepspeed_config_file: {ds_json}\n  zero3_init_flag: false\n"
                "num_machines: 1\nnum_processes: 1\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\n"
                f"main_process_port: {free_port()}\nrdzv_backend: static\nsame_network: true\nuse_cpu: false\n"
            )
            cmd = [python, "-m", "accelerate.commands.launch", "--config_file", config]
            cmd += [WORKERS / "accelerate_script.py", out, "adamc=launch"]
        cache[name] = launch(cmd, out)
        return cache[name]

    return get


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_applied_every_step(run: dict, lambdas: list[float]) -> None:
    assert max(lrs[0] for lrs in run["lrs"]) == pytest.approx(LR, rel=1e-9)  # the schedule reached its peak
    for lrs, applied in zip(run["lrs"], run["applied"], strict=True):
        for lr, got, lam in zip(lrs, applied, lambdas, strict=True):
            assert got == pytest.approx(lam * lr / LR, rel=1e-12, abs=0)


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


def test_hf_trainer_under_the_deepspeed_launcher(results):
    r = results("hf-trainer")
    assert r["adamc"]["lrs"] == r["reference"]["lrs"]
    assert_same_weights(r["adamc"]["weights"], r["reference"]["weights"])
    assert_applied_every_step(r["adamc"], [WD])
    assert r["adamc"]["group_weight_decay"] == [WD]  # HF hands DeepSpeed one group; between steps it holds lambda
    assert max_rel_diff(r["adamw"]["weights"], r["adamc"]["weights"]) >= MIN_ADAMW_GAP


def test_hf_trainer_decay_split_on_zero3(results):
    split = results("hf-trainer")["split"]
    model = LlamaForCausalLM(llama_config())
    one_d = sorted(n for n, p in model.named_parameters() if p.ndim < 2)
    assert one_d and split["undecayed"] == one_d  # norm gains (Llama has no biases), partitioned by zero.Init
    assert split["group_weight_decay"] == [WD, 0.0]
    assert_applied_every_step(split, [WD, 0.0])  # lr_max: WarmupDecayLR's "auto" warmup_max_lr, HF's peak


def test_accelerate_deepspeed_plugin_under_torchrun(results):
    r = results("accelerate-plugin")
    assert r["adamc"]["lrs"] == r["reference"]["lrs"]
    assert_same_weights(r["adamc"]["weights"], r["reference"]["weights"])
    assert_applied_every_step(r["adamc"], [WD])


def test_accelerate_launch_with_config_file(results):
    r = results("accelerate-launch")["adamc"]
    reference = results("accelerate-plugin")["reference"]  # the same JSON, loop and ranks, another launcher
    assert r["lrs"] == reference["lrs"]
    assert_same_weights(r["weights"], reference["weights"])
    assert_applied_every_step(r, [WD])
