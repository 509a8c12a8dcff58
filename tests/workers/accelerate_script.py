"""An Accelerate training loop that knows nothing of megatron-adamc: AdamC comes from the DeepSpeed JSON alone.

``accelerate_script.py OUT RUN [RUN ...]``, each RUN ``NAME=plugin:DS_JSON`` (``Accelerator(deepspeed_plugin=
DeepSpeedPlugin(hf_ds_config=DS_JSON))``, run under torchrun), ``NAME=plugin:DS_JSON:hand`` (the same, a reference
whose loop sets each group's weight decay to its lambda * lr_t / LR before each step, by hand) or ``NAME=launch`` (a
bare ``Accelerator()``, run under ``accelerate launch --config_file``, whose file names the DeepSpeed JSON). Rank 0
writes, per run, the lr and the applied decay of every step and the final FP32 weights.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DummyOptim, DummyScheduler
from deepspeed.utils import safe_get_full_fp32_param
from tiny_llama import APPLIED_KEY, LR, MICRO_BATCH, STEPS, WARMUP, WD, llama_config, token_rows
from transformers import LlamaForCausalLM


def train(accelerator: Accelerator, hand: bool) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    loader = torch.utils.data.DataLoader(token_rows(), batch_size=MICRO_BATCH, shuffle=False)
    optimizer = DummyOptim(model.parameters(), lr=LR, weight_decay=WD)
    scheduler = DummyScheduler(optimizer, total_num_steps=STEPS, warmup_num_steps=WARMUP)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    lrs, applied = [], []
    lambdas = [float(g["weight_decay"]) for g in optimizer.param_groups]
    for batch in loader:
        groups = optimizer.param_groups
        lrs.append([float(g["lr"]) for g in groups])
        if hand:
            for g, lam in zip(groups, lambdas, strict=True):
                g["weight_decay"] = lam * float(g["lr"]) / LR
        accelerator.backward(model(**batch).loss)  # DeepSpeed's backward and step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        applied.append([float(g.get(APPLIED_KEY, g["weight_decay"])) for g in groups])
    weights = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in model.module.named_parameters()}
    return {"lrs": lrs, "applied": applied, "weights": weights}


def main() -> None:
    out, *runs = sys.argv[1:]
    results = {}
    for run in runs:
        name, _, spec = run.partition("=")
        mode, _, rest = spec.partition(":")
        ds_json, _, flag = rest.partition(":")
        plugin = DeepSpeedPlugin(hf_ds_config=ds_json) if mode == "plugin" else None
        accelerator = Accelerator(deepspeed_plugin=plugin)
        results[name] = train(accelerator, flag == "hand")
        AcceleratorState._reset_state(True)  # the next run in this process starts from a clean slate
        PartialState._reset_state()
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
