"""An HF Trainer script that knows nothing of megatron-adamc: AdamC comes from the DeepSpeed JSON alone.

Usage (under the ``deepspeed`` launcher, torchrun, ...): ``hf_trainer_script.py OUT RUN [RUN ...]``, each RUN
``NAME=DS_JSON`` or ``NAME=DS_JSON:hand`` (a reference: the callback sets every decayed group's weight decay to
WD * lr_t / LR before each step, as a user would by hand). Each run trains the tiny Llama with the same seeds; rank 0
writes, per run, the lr and the decay of every group at every step, which tensors are in an undecayed group, and the
final FP32 weights.
"""

from __future__ import annotations

import sys

import torch
from accelerate.state import AcceleratorState, PartialState
from deepspeed.utils import safe_get_full_fp32_param
from tiny_llama import APPLIED_KEY, LR, MICRO_BATCH, STEPS, WARMUP, WD, llama_config, token_rows
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config


class Record(TrainerCallback):
    def __init__(self, hand: bool) -> None:
        self.hand, self.lrs, self.applied, self.base = hand, [], [], []
        self.lambdas: list[float] | None = None  # each group's own weight decay, as DeepSpeed built it

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        self.lrs.append([float(g["lr"]) for g in groups])
        if self.lambdas is None:
            self.lambdas = [float(g["weight_decay"]) for g in groups]
        if self.hand:  # the lr of this step is already in the groups: the scheduler stepped after the last one
            for g, lam in zip(groups, self.lambdas, strict=True):
                g["weight_decay"] = lam * float(g["lr"]) / LR

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        self.applied.append([float(g.get(APPLIED_KEY, g["weight_decay"])) for g in groups])
        self.base.append([float(g["weight_decay"]) for g in groups])


def train(ds_json: str, hand: bool, out_dir: str) -> dict:
    args = TrainingArguments(
        output_dir=out_dir, deepspeed=ds_json, per_device_train_batch_size=MICRO_BATCH, max_steps=STEPS,
        learning_rate=LR, weight_decay=WD, adam_beta2=0.95, warmup_steps=WARMUP, lr_scheduler_type="cosine",
        max_grad_norm=1.0, seed=0, data_seed=0, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config())  # under zero.Init when the JSON asks for ZeRO-3
    record = Record(hand)
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(), callbacks=[record])
    trainer.train()
    engine = trainer.accelerator.deepspeed_engine_wrapped.engine
    groups = engine.optimizer.param_groups
    names = {id(p): n for n, p in engine.module.named_parameters()}
    result = {
        "lrs": record.lrs, "applied": record.applied, "base": record.base,
        "group_weight_decay": [float(g["weight_decay"]) for g in groups],
        "weights": {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()},
        "undecayed": sorted(names[id(p)] for p in _undecayed_params(engine)),
    }  # fmt: skip
    del trainer, engine
    unset_hf_deepspeed_config()  # the next run in this process starts from a clean slate
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    return result


def _undecayed_params(engine) -> list:
    """The model's parameters in groups whose weight decay is 0 (ZeRO holds flat copies; map back by the groups)."""
    optimizer = engine.optimizer
    groups = getattr(optimizer, "fp16_groups", None) or getattr(optimizer, "bit16_groups", None)
    if groups is None:
        return []
    return [
        p for group, pg in zip(groups, optimizer.param_groups, strict=True) if pg["weight_decay"] == 0 for p in group
    ]


def main() -> None:
    out, *runs = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    results = {}
    for run in runs:
        name, _, spec = run.partition("=")
        ds_json, _, mode = spec.partition(":")
        results[name] = train(ds_json, mode == "hand", f"{out}.{name}")
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
