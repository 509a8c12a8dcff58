"""The training config refuses bad values up front, one line naming the key, for every optimizer alike."""

from __future__ import annotations

import pytest
from conftest import REPO

from megatron_adamc.config.train import load_config
from megatron_adamc.errors import UserError

pytestmark = pytest.mark.unit  # make test-fast

CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["optimizer.type=AdamW", "optimizer.lr=.inf"], "config: optimizer.lr: Input should be a finite number"),
        (["optimizer.lr=0"], "config: optimizer.lr: Input should be greater than 0"),
        (["optimizer.betas=[0.9, 1.0]"], "optimizer.betas[1]=1.0 must be in [0, 1)"),
        (["optimizer.betas=[-0.1, 0.9]"], "optimizer.betas[0]=-0.1 must be in [0, 1)"),
        (["optimizer.eps=.nan"], "config: optimizer.eps: Input should be a finite number"),
        (["optimizer.weight_decay=-1"], "config: optimizer.weight_decay: Input should be greater than or equal to 0"),
        (["train.max_bad_steps=0"], "config: train.max_bad_steps: Input should be greater than 0"),
        (["train.spike_skip_ratio=0.5"], "config: train.spike_skip_ratio: Input should be greater than 1"),
        (["train.activation_checkpointing=some"], "train.activation_checkpointing: Input should be 'none', 'full'"),
        (["checkpoint.keep=0"], "config: checkpoint.keep: Input should be greater than 0"),
        (["eval.intervall=3"], "config: eval.intervall: unknown key"),
        (["scheduler.warmup_steps=500"], "scheduler.warmup_steps=500 must be below train.steps=200"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line(sets, message) -> None:
    with pytest.raises(UserError) as err:
        load_config(CONFIG, sets)
    text = str(err.value)
    assert message in text and "\n" not in text, text
