"""The Megatron-LM plugin: its --adamc flag, @file arguments, config files, and its one-line error without Megatron-LM.

Megatron-LM is not on the package index, so the tests that drive its real argument parser and scheduler builder
run only where ``MEGATRON_LM_PATH`` points at a checkout whose requirements are installed (the GPU image);
everything else runs on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_adamc.megatron.megatron_lm import MEGATRON_LM_PATH_ENV, MEGATRON_LM_TAG, is_checkout
from megatron_adamc.megatron.pretrain_gpt import (
    DECOUPLED_WEIGHT_DECAY_TAG,
    WEIGHT_DECAY_TAG,
    PluginError,
    add_adamc_args,
    chain_extra_args_providers,
    expand_arg_files,
    weight_decay_scalars,
    with_adamc_flag,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "megatron").glob("*.args"))
MEGATRON_LM = os.environ.get(MEGATRON_LM_PATH_ENV, "")


def megatron_style_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser.add_argument("--lr", type=float, default=None)
    return parser


def test_adamc_flag_through_extra_args_provider() -> None:
    parser = add_adamc_args(megatron_style_parser())
    assert parser.parse_args([]).adamc is False
    assert parser.parse_args(["--lr", "3e-4", "--adamc"]).adamc is True
    assert parser.parse_args(["--adamc", "--no-adamc"]).adamc is False  # a config file's --adamc, overridden
    with pytest.raises(SystemExit):  # allow_abbrev=False, as Megatron: no silent prefix matching
        parser.parse_args(["--adam"])
    # A release that passes our provider to two entry points must not break on a duplicate flag.
    assert add_adamc_args(parser).parse_args(["--adamc"]).adamc is True


def test_chained_provider_keeps_megatron_lms_own_flags() -> None:
    def modelopt_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--export-te-mcore-model", action="store_true")
        return parser

    parser = chain_extra_args_providers(modelopt_flags)(megatron_style_parser())
    args = parser.parse_args(["--export-te-mcore-model", "--adamc"])
    assert args.export_te_mcore_model and args.adamc
    assert chain_extra_args_providers(None)(megatron_style_parser()).parse_args(["--adamc"]).adamc


def test_wrapped_entry_point_gets_the_flag_however_it_is_called() -> None:
    # The shape of Megatron-LM's parse_args / pretrain: the provider is an optional keyword-or-positional argument.
    def parse_args(extra_args_provider=None, ignore_unknown_args: bool = False, argv: tuple = ()) -> argparse.Namespace:
        parser = megatron_style_parser()
        if extra_args_provider is not None:
            parser = extra_args_provider(parser)
        return parser.parse_known_args(argv)[0] if ignore_unknown_args else parser.parse_args(argv)

    wrapped = with_adamc_flag(parse_args)
    assert wrapped(argv=["--adamc"]).adamc is True
    assert wrapped(None, False, ["--adamc"]).adamc is True
    assert wrapped(extra_args_provider=None, argv=[]).adamc is False


def test_logged_weight_decay_picks_the_default_and_the_decoupled_group() -> None:
    groups = [
        {"wd_mult": 0.0, "max_lr": 1e-3, "weight_decay": 0.0},
        {"wd_mult": 1.0, "max_lr": 1e-3, "weight_decay": 0.05},
        {"wd_mult": 1.0, "max_lr": 3e-3, "weight_decay": 0.02},
        {"wd_mult": 1.0, "max_lr": 1e-3, "weight_decay": 0.07},  # a second default group: the first one is logged
    ]
    assert weight_decay_scalars(groups, 1e-3) == {WEIGHT_DECAY_TAG: 0.05, DECOUPLED_WEIGHT_DECAY_TAG: 0.02}
    assert weight_decay_scalars(groups[:2], 1e-3) == {WEIGHT_DECAY_TAG: 0.05}


def test_arg_files_expand_in_place(tmp_path: Path) -> None:
    args_file = tmp_path / "model.args"
    args_file.write_text("# a comment\n--num-layers 2  # trailing comment\n--data-path 'a b' --adamc\n")
    expanded = expand_arg_files(["--lr", "1e-3", f"@{args_file}", "--num-layers", "4"])
    assert expanded == ["--lr", "1e-3", "--num-layers", "2", "--data-path", "a b", "--adamc", "--num-layers", "4"]
    with pytest.raises(PluginError, match="does not exist"):
        expand_arg_files([f"@{tmp_path / 'missing.args'}"])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_files_ask_for_adamc_distributed_optimizer_bf16_and_fp8(config: Path) -> None:
    flags = expand_arg_files([f"@{config}"])
    for flag in ("--adamc", "--use-distributed-optimizer", "--bf16", "--fp8-format", "--transformer-impl"):
        assert flag in flags, f"{config.name} lacks {flag}"
    values = dict(zip(flags, flags[1:], strict=False))
    assert values["--transformer-impl"] == "transformer_engine"
    assert float(values["--min-lr"]) < float(values["--lr"])
    assert float(values["--weight-decay"]) > 0
    names = [flag for flag in flags if flag.startswith("--")]
    assert len(names) == len(set(names)), f"{config.name} repeats a flag"


def test_config_files_cover_the_three_models() -> None:
    assert {p.stem for p in CONFIGS} == {"llama3_8b", "llama3_70b", "llama2_7b"}


def run_plugin(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_adamc.megatron.pretrain_gpt", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def bare_env() -> dict[str, str]:
    """No Megatron-LM anywhere: only this package on the path."""
    env = {k: v for k, v in os.environ.items() if k not in (MEGATRON_LM_PATH_ENV, "PYTHONPATH")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_missing_megatron_lm_is_one_line_and_says_how_to_get_it(tmp_path: Path) -> None:
    result = run_plugin(["--num-layers", "2", "--adamc"], bare_env(), tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Megatron-LM not found" in lines[0]
    assert f"git clone --branch {MEGATRON_LM_TAG} https://github.com/NVIDIA/Megatron-LM" in lines[0]
    assert MEGATRON_LM_PATH_ENV in lines[0] and "Docker image" in lines[0]


def test_wrong_megatron_lm_path_names_the_variable(tmp_path: Path) -> None:
    env = {**bare_env(), MEGATRON_LM_PATH_ENV: str(tmp_path)}
    result = run_plugin(["--adamc"], env, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{MEGATRON_LM_PATH_ENV}={tmp_path} is not a Megatron-LM checkout" in lines[0]


def test_missing_arg_file_is_one_line(tmp_path: Path) -> None:
    result = run_plugin(["@configs/megatron/nope.args"], bare_env(), tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nope.args" in result.stderr


# ------------------------------------------------ with a real Megatron-LM checkout (MEGATRON_LM_PATH)

# One process (Megatron-LM takes ~30 s to import): its own parser, global args and TensorBoard writer, its own
# get_optimizer_param_scheduler (patched). The training loop is stood in for by its two scheduler-facing lines:
# args.curr_iteration = i; scheduler.step(global_batch_size). The plain run goes first, into the same writer.
REAL_MEGATRON_SCRIPT = r"""
import json, sys
root, out, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
import torch
from megatron_adamc.megatron.pretrain_gpt import expand_arg_files, install
install()
import megatron.training.arguments as arguments
import megatron.training.training as training
from megatron.training import global_vars

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "30", "--lr", "1e-3", "--min-lr", "1e-5", "--lr-warmup-iters", "5",
        "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--decoupled-lr", "3e-3",
        "--tensorboard-dir", out + "/tb", "--tensorboard-log-interval", "2"]

def optimizer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    return torch.optim.AdamW([
        {"params": [net[0].weight], "wd_mult": 1.0, "max_lr": 1e-3, "min_lr": 1e-5},
        {"params": [net[2].weight], "wd_mult": 1.0, "max_lr": 3e-3, "min_lr": 1e-5},
        {"params": [net[0].bias, net[1].weight, net[1].bias, net[2].bias], "wd_mult": 0.0, "max_lr": 1e-3},
    ], lr=1e-3, weight_decay=0.1)

result = {"runs": {}, "configs": {}}
for mode in ("plain", "adamc"):
    sys.argv = ["pretrain_gpt.py", *TINY, *(["--adamc"] if mode == "adamc" else [])]
    args = arguments.parse_args()  # the wrapped one: our provider is chained in
    args.start_weight_decay = args.end_weight_decay = args.weight_decay  # what validate_args does (needs CUDA)
    global_vars.set_args(args)
    if global_vars.get_tensorboard_writer() is None:
        global_vars._set_tensorboard_writer(args)
    scheduler = training.get_optimizer_param_scheduler(optimizer())
    stock = training.get_optimizer_param_scheduler.adamc_original(optimizer())
    steps = []
    for iteration in range(args.train_iters):
        args.curr_iteration = iteration
        scheduler.step(increment=args.global_batch_size)
        stock.step(increment=args.global_batch_size)
        steps.append([(a["lr"], s["lr"], a["weight_decay"], s["weight_decay"], a["max_lr"])
                      for a, s in zip(scheduler.optimizer.param_groups, stock.optimizer.param_groups)])
    result["runs"][mode] = {"mro": [c.__name__ for c in type(scheduler).__mro__], "adamc": args.adamc,
                            "state": scheduler.state_dict(), "stock_state": stock.state_dict(), "steps": steps}
global_vars.get_tensorboard_writer().close()

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
events = EventAccumulator(out + "/tb").Reload()
result["logged"] = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

for config in configs:
    sys.argv = ["pretrain_gpt.py", *expand_arg_files(["@" + config]), "--data-path", "d"]
    a = arguments.parse_args()
    result["configs"][config] = [a.adamc, a.use_distributed_optimizer, a.bf16, a.fp8]
json.dump(result, open(out + "/result.json", "w"))
"""


@pytest.fixture(scope="module")
def real_megatron(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not (MEGATRON_LM and is_checkout(Path(MEGATRON_LM))):
        pytest.skip(f"set {MEGATRON_LM_PATH_ENV} to a Megatron-LM checkout (git clone --branch {MEGATRON_LM_TAG})")
    out = tmp_path_factory.mktemp("megatron_lm")
    script = out / "drive_megatron.py"
    script.write_text(REAL_MEGATRON_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(script), MEGATRON_LM, str(out), *map(str, CONFIGS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_megatron_lm_builds_adamc_with_its_own_arguments_and_logs_lambda_t(real_megatron: dict) -> None:
    run = real_megatron["runs"]["adamc"]
    assert run["adamc"] is True and "AdamCParamScheduler" in run["mro"]
    assert run["state"].pop("adamc") is True
    assert run["state"] == run["stock_state"]  # the same arguments as Megatron-LM's own builder
    expected_log: dict[int, float] = {}
    for iteration, groups in enumerate(run["steps"], start=1):
        for lr, stock_lr, wd, stock_wd, peak in groups:
            assert lr == stock_lr
            assert wd == pytest.approx(stock_wd * stock_lr / peak, rel=1e-12, abs=0.0)
        expected_log[iteration] = groups[0][2]
    assert run["steps"][-1][0][2] < 0.02 * run["steps"][-1][0][3]  # the tail decays at lambda * min_lr / max_lr
    logged = dict(real_megatron["logged"][WEIGHT_DECAY_TAG])
    assert sorted(logged) == list(range(2, 31, 2))  # --tensorboard-log-interval 2; the plain run logged nothing
    for iteration, value in logged.items():
        assert value == pytest.approx(expected_log[iteration], rel=1e-6)  # TensorBoard stores float32
    assert len(real_megatron["logged"][DECOUPLED_WEIGHT_DECAY_TAG]) == len(logged)


def test_megatron_lm_without_the_flag_stays_plain(real_megatron: dict) -> None:
    run = real_megatron["runs"]["plain"]
    assert run["adamc"] is False and run["mro"][0] == "PlainParamScheduler"
    assert run["state"].pop("adamc") is False
    assert run["state"] == run["stock_state"]
    for groups in run["steps"]:
        for lr, stock_lr, wd, stock_wd, _ in groups:
            assert (lr, wd) == (stock_lr, stock_wd)


def test_config_files_parse_with_megatron_lms_parser(real_megatron: dict) -> None:
    assert real_megatron["configs"] == {str(config): [True, True, True, "hybrid"] for config in CONFIGS}
