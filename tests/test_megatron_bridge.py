"""Megatron-Bridge with AdamC, against the real ``megatron-bridge`` 0.3.1 from the package index (the newest release
for Python 3.11 and megatron-core 0.16; installed without its GPU stack by ``make setup``).

One fresh interpreter (Bridge imports its whole model zoo, ~10 s), with stand-ins for Transformer Engine and triton
only (tests/workers/megatron_gpu_standins.py): a real ``ConfigContainer``, ``enable_adamc(cfg)``, Bridge's own
Hydra-style overrides of the two new fields, Bridge's ``OptimizerConfigOverrideProvider`` (through AdamC's) feeding
megatron-core's ``_get_param_groups``, and Bridge's own ``_get_scheduler`` building the scheduler. Not run here:
Bridge's ``setup_optimizer`` as a whole (megatron-core's ``get_megatron_optimizer`` needs CUDA) and ``pretrain``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from workers.megatron_ranks import free_port

WORKERS = Path(__file__).resolve().parent / "workers"

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from megatron_gpu_standins import stand_in
stand_in("transformer_engine")
import torch
import megatron.core.transformer.transformer_config  # noqa: F401 - torch probes triton here: the real answer
stand_in("triton")  # for megatron-core's Mamba kernels that Bridge's model zoo imports
import megatron.bridge.training.optim as optim  # the start-up hook wraps _get_scheduler here
from megatron.bridge.models import GPTModelProvider
from megatron.bridge.training import config as C
from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides
from megatron.core.optimizer import _get_param_groups
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
import megatron_adamc.autoload as hook
from megatron_adamc.core.decay import AdamCError
from megatron_adamc.megatron.bridge import enable_adamc

torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
out = {"hook": hook.states.get("megatron.bridge.training.optim")}

def recipe():  # what a recipe function returns: a ConfigContainer
    return C.ConfigContainer(
        train=C.TrainingConfig(train_iters=10, global_batch_size=4, micro_batch_size=2),
        model=GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4),
        optimizer=C.OptimizerConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1),
        scheduler=C.SchedulerConfig(lr_decay_style="cosine", lr_warmup_iters=2, start_weight_decay=0.1,
                                    end_weight_decay=0.1),
        dataset=None, logger=C.LoggerConfig(), tokenizer=C.TokenizerConfig(), checkpoint=C.CheckpointConfig(),
    )

def build(cfg):
    # The scheduler fields Bridge's cfg.validate() derives from the train config (iterations x global batch).
    cfg.scheduler.lr_warmup_steps, cfg.scheduler.lr_decay_steps, cfg.scheduler.wd_incr_steps = 8, 40, 40
    model = torch.nn.ModuleDict({"embedding": torch.nn.Embedding(8, 4), "decoder": torch.nn.Linear(4, 4),
                                 "output_layer": torch.nn.Linear(4, 8, bias=False)})
    context = C.OptimizerConfigOverrideProviderContext(cfg.scheduler, cfg.optimizer, model)
    overrides = cfg.optimizer_config_override_provider.build_config_overrides(context)
    optimizer = torch.optim.AdamW(_get_param_groups([model], cfg.optimizer, overrides))
    scheduler = optim._get_scheduler(cfg.optimizer, cfg.scheduler, optimizer)
    scheduler.step(20)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[sorted(names[id(p)] for p in g["params"]), g.get("adamc"), g["weight_decay"], g["lr"]]
              for g in optimizer.param_groups]
    return type(scheduler).__name__, groups

cfg = enable_adamc(recipe())  # the one line
out["fields"] = [type(cfg.scheduler).__name__, cfg.scheduler.adamc, cfg.scheduler.adamc_exclude,
                 type(cfg.optimizer_config_override_provider).__name__, cfg.scheduler.lr_decay_style]
out["adamc"] = build(cfg)
process_config_with_overrides(cfg, cli_overrides=["scheduler.adamc_exclude=[output_layer,embedding]"])
out["both_excluded"] = build(cfg)
process_config_with_overrides(cfg, cli_overrides=["scheduler.adamc=false"])
out["off"] = build(cfg)
out["stock"] = build(recipe())
typo = enable_adamc(recipe(), exclude=["outptu_layer"])
try:
    build(typo)
except AdamCError as err:
    out["typo"] = str(err)
graph = enable_adamc(recipe())
graph.optimizer.optimizer_cuda_graph = True  # megatron-core 0.18+'s OptimizerConfig field
try:
    build(graph)
except AdamCError as err:
    out["graph"] = str(err)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bridge() -> dict:
    found = importlib.util.find_spec("megatron.bridge") is not None
    assert found, "megatron-bridge is missing: make setup installs it (launch/setup.sh)"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGATRON_ADAMC_AUTOLOAD")}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SCRIPT, str(WORKERS), str(free_port())],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def by_names(groups: list) -> dict:
    return {tuple(names): (flag, decay, lr) for names, flag, decay, lr in groups if names}


def test_the_hook_wraps_bridges_scheduler_builder(bridge: dict) -> None:
    assert bridge["hook"] == "installed"


def test_one_line_turns_a_recipe_into_adamc_with_config_fields(bridge: dict) -> None:
    assert bridge["fields"] == ["AdamCSchedulerConfig", True, ["output_layer"], "AdamCConfigOverrideProvider", "cosine"]


def test_bridge_builds_adamc_and_the_default_exclusion_keeps_the_output_layer_plain(bridge: dict) -> None:
    name, groups = bridge["adamc"]
    assert name == "AdamCParamScheduler"
    groups = by_names(groups)
    (flag, decay, lr) = groups[("decoder.weight", "embedding.weight")]
    assert flag is True and lr < 1e-3 and decay == pytest.approx(0.1 * lr / 1e-3, rel=1e-12)
    assert groups[("output_layer.weight",)][:2] == (False, pytest.approx(0.1))
    assert groups[("decoder.bias",)][1] == 0.0  # Bridge's own rule: no decay for biases and 1-D params


def test_bridges_overrides_reach_the_new_fields(bridge: dict) -> None:
    name, groups = bridge["both_excluded"]
    groups = by_names(groups)
    assert groups[("embedding.weight", "output_layer.weight")][:2] == (False, pytest.approx(0.1))
    assert groups[("decoder.weight",)][0] is True
    off_name, off_groups = bridge["off"]
    stock_name, stock_groups = bridge["stock"]
    assert off_name == stock_name == "OptimizerParamScheduler"
    assert {tuple(sorted(n for g in off_groups for n in g[0]))} == {
        tuple(sorted(n for g in stock_groups for n in g[0]))
    }
    assert [g[2:] for g in off_groups if g[2]] == [
        [pytest.approx(0.1), pytest.approx(g[3])] for g in off_groups if g[2]
    ]


def test_wrong_settings_are_refused_in_one_line(bridge: dict) -> None:
    assert bridge["typo"].startswith("scheduler.adamc_exclude outptu_layer matched no parameter")
    assert bridge["graph"].startswith("scheduler.adamc with optimizer.optimizer_cuda_graph")
