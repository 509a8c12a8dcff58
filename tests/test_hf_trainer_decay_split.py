"""``"decay_split"``: the one param group HF Trainer / Accelerate hand DeepSpeed is split inside the optimizer build.

On a real one-rank ZeRO-2 engine in this process, a tiny random LlamaForCausalLM passed as ONE group (as HF does) with
AdamC and ``decay_split`` must train bit for bit like DeepSpeed's AdamW given ``decay_param_groups(model)`` (the
project's decay / no-decay rule) with the decay set by hand to lambda * lr_t / lr_max, for ``true`` and for
``"exclude_embeddings"``; bad values fail at initialize with one line naming the field.
"""

from __future__ import annotations

import copy

import deepspeed
import pytest
import torch
from transformers import LlamaForCausalLM
from workers.tiny_llama import LR, MICRO_BATCH, STEPS, WD, llama_config, token_rows

import megatron_adamc.deepspeed as mad
from megatron_adamc.core.adamc import APPLIED_KEY
from megatron_adamc.core.decay import AdamCError

CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO_BATCH,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamC", "params": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.95], "eps": 1e-8}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": 2}},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 10**9,
}


def config(optimizer: str, **params) -> dict:
    cfg = copy.deepcopy(CONFIG)
    cfg["optimizer"]["type"] = optimizer
    cfg["optimizer"]["params"].update(params)
    return cfg


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config())


def train(engine, hand: bool) -> tuple[list[torch.Tensor], list[tuple[float, list[float]]]]:
    rows = token_rows()
    groups = engine.basic_optimizer.param_groups
    lambdas = [g["weight_decay"] for g in groups]
    applied = []
    for step in range(STEPS):
        ids = torch.stack([r["input_ids"] for r in rows[step * MICRO_BATCH : (step + 1) * MICRO_BATCH]])
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        if hand:
            for g, lam in zip(groups, lambdas, strict=True):
                g["weight_decay"] = lam * g["lr"] / LR
        lr = groups[0]["lr"]
        engine.step()
        applied.append((lr, [g.get(APPLIED_KEY, g["weight_decay"]) for g in groups]))
    return [p.detach().clone() for g in groups for p in g["params"]], applied


@pytest.mark.parametrize("split", [True, "exclude_embeddings"])
def test_one_group_split_equals_decay_param_groups(single_rank_dist, split):
    exclude = split == "exclude_embeddings"
    m = model()
    adamc = mad.initialize(model=m, model_parameters=list(m.parameters()), config=config("AdamC", decay_split=split))[0]
    # the split DeepSpeed built: the same tensors, in the same order, as the project's own rule gives
    expected = mad.decay_param_groups(m, exclude_embeddings=exclude)
    built = adamc.optimizer.bit16_groups
    assert [[id(p) for p in g] for g in built] == [[id(p) for p in g["params"]] for g in expected]
    assert [g["weight_decay"] for g in adamc.optimizer.param_groups] == [WD, 0.0]
    adamc_master, adamc_applied = train(adamc, hand=False)

    m = model()
    groups = mad.decay_param_groups(m, weight_decay=WD, exclude_embeddings=exclude)
    reference = deepspeed.initialize(model=m, model_parameters=groups, config=config("AdamW"))[0]
    reference_master, _ = train(reference, hand=True)

    for a, b in zip(adamc_master, reference_master, strict=True):
        assert torch.equal(a, b)
    assert max(lr for lr, _ in adamc_applied) == LR
    for lr, per_group in adamc_applied:  # lambda * lr_t / lr_max on the decayed group, 0 on the other, every step
        assert per_group == pytest.approx([WD * lr / LR, 0.0], rel=1e-12, abs=0)


def test_groups_already_split_are_left_alone(single_rank_dist):
    m = model()
    groups = mad.decay_param_groups(m)
    engine = mad.initialize(model=m, model_parameters=groups, config=config("AdamC", decay_split=True))[0]
    assert [len(g) for g in engine.optimizer.bit16_groups] == [len(g["params"]) for g in groups]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"decay_split": "yes"}, 'optimizer.params.decay_split must be true, false or "exclude_embeddings"'),
        (
            {"decay_split": True, "lr_max": [LR, LR]},
            r"optimizer.params.lr_max has 2 values for 1 param groups \(before decay_split\)",
        ),
    ],
)
def test_bad_decay_split_input_fails_at_initialize(single_rank_dist, params, message):
    m = model()
    with pytest.raises(AdamCError, match=message) as err:
        mad.initialize(model=m, model_parameters=list(m.parameters()), config=config("AdamC", **params))
    assert "\n" not in str(err.value)
