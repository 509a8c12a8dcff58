"""Which groups AdamC corrects, the same choice on both sides: ``--adamc-exclude`` (Megatron, tests of the groups
megatron-core builds: tests/test_megatron_scheduler.py) and ``optimizer.adamc_exclude`` of the DeepSpeed trainer's
config, whose groups get DeepSpeed AdamC's per-group ``"adamc": false`` (honoured by the engine patch: the
DeepSpeed tests)."""

from __future__ import annotations

import pytest

from megatron_adamc.config.train import OptimizerSection
from megatron_adamc.core.decay import AdamCError
from megatron_adamc.model import LlamaConfig
from megatron_adamc.model.llama import Llama
from megatron_adamc.param_groups import decay_param_groups

pytestmark = pytest.mark.unit  # make test-fast


def names(model, group) -> list[str]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return sorted(ids[id(p)] for p in group["params"])


def test_the_trainer_moves_excluded_decayed_params_to_a_plain_group() -> None:
    model = Llama(LlamaConfig.from_preset("tiny"), seed=0)
    groups = decay_param_groups(model, weight_decay=0.1)
    assert OptimizerSection().adamc_exclude == []  # the default: every decayed group corrected (see docs)
    exclude = OptimizerSection(adamc_exclude=["output", "norm"]).adamc_exclude
    split = decay_param_groups(model, weight_decay=0.1, adamc_exclude=exclude)
    by_name = {g["name"]: g for g in split}
    assert names(model, by_name["decay_plain"]) == ["output.weight"]  # norms are not decayed: nothing to exclude
    assert by_name["decay_plain"]["adamc"] is False and by_name["decay_plain"]["weight_decay"] == 0.1
    assert "adamc" not in by_name["decay"] and "output.weight" not in names(model, by_name["decay"])
    assert sum(len(g["params"]) for g in split) == sum(len(g["params"]) for g in groups)
    assert [g["name"] for g in decay_param_groups(model, weight_decay=0.1, adamc_exclude=[])] == ["decay", "no_decay"]
    with pytest.raises(AdamCError, match="optimizer.adamc_exclude .* matched no parameter"):
        decay_param_groups(model, weight_decay=0.1, adamc_exclude=["output_layer"])


def test_both_sides_read_the_same_group_key() -> None:
    from megatron_adamc.core.adamc import ENABLED_KEY
    from megatron_adamc.megatron import groups

    assert groups.ENABLED_KEY == ENABLED_KEY  # groups.py keeps its own copy so that parsing needs no torch
