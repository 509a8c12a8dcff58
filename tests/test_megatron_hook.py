"""The start-up hook gives Megatron-LM ``--adamc`` with no wrapper, and leaves it alone under ``python -S`` or
MEGATRON_ADAMC_AUTOLOAD=0; each half of the package imports without the other's framework or says which extra to
install.

Megatron-LM is not on the package index, so in CI the hook is exercised on a stand-in ``megatron.training``
(tests/workers/megatron_lm_standin: the call structure the plugin relies on, nothing else) in fresh interpreters of
this environment, whose editable install carries the start-up files. tests/test_megatron_plugin.py runs the same
against real Megatron-LM checkouts where MEGATRON_LM_PATH is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from workers.megatron_ranks import free_port

import megatron_adamc.autoload as autoload
from megatron_adamc.extras import MissingExtraError

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "workers" / "megatron_lm_standin"

HOOKED = r"""
import contextlib, io, json, sys
sys.modules["deepspeed"] = None  # a Megatron environment without DeepSpeed: import deepspeed fails
import megatron.training  # the first import: the hook installs the plugin here
import megatron.training.arguments as arguments
import megatron.training.training as training
from megatron.training import global_vars
import torch
import megatron_adamc.autoload as hook
port = sys.argv[1]

def parse(argv):
    sys.argv = ["pretrain_gpt.py", *argv]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return arguments.parse_args(), None
    except SystemExit as exit:
        return None, (exit.code, err.getvalue())

base = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
        "--train-iters", "10", "--global-batch-size", "4", "--weight-decay", "0.1"]
out = {"states": hook.states}
args, _ = parse(base + ["--adamc"])
global_vars.set_args(args)
config, overrides = training.get_megatron_optimizer_config(args)  # with --adamc: the exclusion is merged in
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:" + port, rank=0, world_size=1)
from megatron.core.optimizer import _get_param_groups
net = torch.nn.ModuleDict({"decoder": torch.nn.Linear(4, 4), "output_layer": torch.nn.Linear(4, 4, bias=False)})
optimizer = torch.optim.AdamW(_get_param_groups([net], config, overrides))
scheduler = training.get_optimizer_param_scheduler(optimizer)
scheduler.step(20)
out["adamc"] = [args.adamc, args.adamc_exclude, type(scheduler).__name__, len(overrides)]
out["groups"] = [[g.get("adamc", True), g["wd_mult"], g["weight_decay"], g["lr"]] for g in optimizer.param_groups]
plain_args, _ = parse(base)
global_vars.set_args(plain_args)
out["plain"] = [plain_args.adamc, type(training.get_optimizer_param_scheduler(optimizer)).__name__]
out["deepspeed"] = sorted(name for name in sys.modules if name.startswith("deepspeed") and sys.modules[name])
out["refused"] = [parse(base + extra)[1] for extra in (
    ["--adamc", "--optimizer-cuda-graph"], ["--adamc", "--lr-warmup-init", "2e-3"], ["--adamcc"])]
print(json.dumps(out))
"""

UNTOUCHED = r"""
import json, sys
import megatron.training.arguments as arguments
sys.argv = ["pretrain_gpt.py", "--lr", "1e-3", "--adamc"]
hook = sys.modules.get("megatron_adamc.autoload")
patched = hasattr(arguments.add_megatron_arguments, "adamc_original")
print(json.dumps({"patched": patched, "hook": getattr(hook, "state", None), "states": getattr(hook, "states", None)}))
arguments.parse_args()
"""


def run(code: str, *flags: str, path: list[str], argv: tuple = (), **env: str) -> subprocess.CompletedProcess:
    drop = ("PYTHONPATH", autoload.ENV_VAR, "MEGATRON_LM_PATH")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    environ.update(PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code), *argv],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_unmodified_script_gets_the_flags_and_the_scheduler_from_the_hook() -> None:
    proc = run(HOOKED, path=[str(STANDIN)], argv=(str(free_port()),))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["states"]["megatron.training"] == "installed"
    assert out["deepspeed"] == []  # the Megatron half never needed DeepSpeed
    assert out["adamc"] == [True, "output_layer", "LoggingAdamCParamScheduler", 2]  # standard overrides + exclusion
    assert out["plain"] == [False, "PlainParamScheduler"]
    # megatron-core's own groups from the overrides: the output layer alone, marked, with the plain decay; 20 samples
    # into a 40-sample cosine after a 8-sample warmup the corrected group decays by lambda * lr_t / lr_max.
    decayed = {flag: (decay, lr) for flag, mult, decay, lr in out["groups"] if mult}
    assert sorted(decayed) == [False, True] and len(out["groups"]) == 3  # plus the wd_mult 0 bias group
    (plain, _), (decay, lr) = decayed[False], decayed[True]
    assert plain == pytest.approx(0.1) and decay == pytest.approx(0.1 * lr / 1e-3, rel=1e-12) and lr < 1e-3
    graph, peak, typo = out["refused"]
    assert graph[0] == 2 and graph[1].count("\n") == 1 and "--optimizer-cuda-graph" in graph[1]
    assert peak[0] == 2 and "--lr-warmup-init 0.002 is above it" in peak[1]
    assert typo[0] == 2 and "unrecognized arguments: --adamcc" in typo[1]  # Megatron's parser still rejects typos


def test_python_dash_s_leaves_megatron_untouched() -> None:
    # -S: no site-packages processing, so no start-up file runs (only PYTHONPATH is on sys.path).
    proc = run(UNTOUCHED, "-S", path=[str(STANDIN)])
    assert json.loads(proc.stdout.splitlines()[0]) == {"patched": False, "hook": None, "states": None}
    assert proc.returncode == 2 and "unrecognized arguments: --adamc" in proc.stderr


def test_switched_off_leaves_megatron_untouched() -> None:
    proc = run(UNTOUCHED, path=[str(STANDIN)], **{autoload.ENV_VAR: "0"})
    assert json.loads(proc.stdout.splitlines()[0]) == {"patched": False, "hook": "off", "states": {}}
    assert proc.returncode == 2 and "unrecognized arguments: --adamc" in proc.stderr


def test_a_megatron_training_that_is_not_megatron_lms_is_left_alone(tmp_path: Path) -> None:
    other = tmp_path / "megatron" / "training"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("NAME = 'not Megatron-LM'\n")
    code = "import megatron.training, megatron_adamc.autoload as h, json; print(json.dumps(h.states))"
    proc = run(code, path=[str(tmp_path)])
    assert json.loads(proc.stdout) == {"megatron.training": "skipped: not Megatron-LM's megatron.training"}


# ------------------------------------------------------------------------------------------- the install's halves


def test_the_frameworks_are_extras_not_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert not names & {"deepspeed", "megatron-core"}
    extras = project["optional-dependencies"]
    assert extras["deepspeed"] == ["deepspeed>=0.16,<0.21"] and extras["megatron"] == ["megatron-core>=0.13"]
    assert extras["train"] == ["megatron-adamc[deepspeed,megatron]"]


def forget(monkeypatch: pytest.MonkeyPatch, *prefixes: str) -> None:
    """Make modules under ``prefixes`` import afresh in this test (monkeypatch restores the originals after it)."""
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            monkeypatch.delitem(sys.modules, name)


def test_each_half_without_its_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    forget(monkeypatch, "megatron_adamc.megatron.scheduler")
    with pytest.raises(MissingExtraError, match=r"needs megatron-core, which is not installed: pip install "
                       r"'megatron-adamc\[megatron\]'"):  # fmt: skip
        import megatron_adamc.megatron.scheduler  # noqa: F401

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    from megatron_adamc.deepspeed import register

    with pytest.raises(MissingExtraError, match=r"pip install 'megatron-adamc\[deepspeed\]'"):
        register()

    from megatron_adamc.cli import main

    assert main(["train", "--config", "x.yaml", "--output-dir", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "megatron-adamc train: error: megatron-adamc train (the DeepSpeed trainer) needs deepspeed, which is not "
        "installed: pip install 'megatron-adamc[train]'"
    ]
