"""Megatron-LM with AdamC: its flags and the start-up checks, @file arguments, config files, the wrapper's one-line
errors, and, against real Megatron-LM checkouts, unmodified scripts through the start-up hook.

Megatron-LM is not on the package index, so the tests that drive its real scripts and parser run only where
``MEGATRON_LM_PATH`` points at a checkout whose requirements are installed (here: core_v0.16.1 with ``triton`` and
``six``; the GPU image); everything else runs on any machine (the hook itself: tests/test_megatron_hook.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_adamc.core.decay import AdamCError
from megatron_adamc.megatron.flags import add_adamc_args, validate
from megatron_adamc.megatron.groups import canonical_name, parse_exclude, pattern_matches
from megatron_adamc.megatron.megatron_lm import MEGATRON_LM_PATH_ENV, MEGATRON_LM_TAG, PluginError, is_checkout
from megatron_adamc.megatron.plugin import DECOUPLED_WEIGHT_DECAY_TAG, WEIGHT_DECAY_TAG, weight_decay_scalars
from megatron_adamc.megatron.pretrain_gpt import expand_arg_files

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "megatron").glob("*.args"))
MEGATRON_LM = os.environ.get(MEGATRON_LM_PATH_ENV, "")


def megatron_style_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser.add_argument("--lr", type=float, default=None)
    return parser


def test_adamc_flags_in_megatrons_parser() -> None:
    parser = add_adamc_args(megatron_style_parser())
    defaults = parser.parse_args([])
    assert (defaults.adamc, defaults.adamc_exclude, defaults.adamc_track_interval) == (False, "output_layer", 0)
    assert parser.parse_args(["--lr", "3e-4", "--adamc"]).adamc is True
    assert parser.parse_args(["--adamc", "--no-adamc"]).adamc is False  # a config file's --adamc, overridden
    with pytest.raises(SystemExit):  # allow_abbrev=False, as Megatron: no silent prefix matching
        parser.parse_args(["--adam"])
    assert add_adamc_args(parser) is parser  # a second call (two entry points) adds nothing and does not break


def megatron_args(**changes) -> SimpleNamespace:
    args = dict(
        adamc=True, adamc_exclude="output_layer", adamc_track_interval=0, weight_decay=0.1, lr=1e-3, min_lr=1e-5,
        lr_warmup_init=0.0, lr_warmup_iters=10, lr_warmup_samples=0, lr_warmup_fraction=None,
        lr_decay_style="cosine", decoupled_lr=None, decoupled_min_lr=None,
    )  # fmt: skip
    args.update(changes)
    return SimpleNamespace(**args)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"optimizer_cuda_graph": True}, "--adamc with --optimizer-cuda-graph"),
        ({"lr_warmup_init": 2e-3}, "--lr 0.001 is the peak of its param groups but --lr-warmup-init 0.002"),
        ({"decoupled_lr": 1e-4, "lr_warmup_init": 5e-4}, "--decoupled-lr 0.0001 is .* --lr-warmup-init 0.0005"),
        ({"decoupled_lr": 3e-3, "decoupled_min_lr": 4e-3}, "--decoupled-lr 0.003 is the peak .* its min lr 0.004"),
        ({"min_lr": 2e-3, "lr_warmup_iters": 0}, "--lr 0.001 is the peak .* its min lr 0.002"),
        ({"adamc_exclude": "output_layer,.x"}, "--adamc-exclude '.x' is not a module path or glob"),
        ({"adamc_track_interval": -1}, "--adamc-track-interval must be >= 0"),
    ],
)
def test_what_would_be_silently_wrong_is_refused_after_parsing(changes: dict, message: str) -> None:
    with pytest.raises(AdamCError, match=message):
        validate(megatron_args(**changes))


def test_fine_settings_pass_and_plain_runs_are_not_checked() -> None:
    args = megatron_args(adamc_exclude=" output_layer , embedding ", decoupled_lr=3e-3, lr_warmup_init=1e-4)
    validate(args)
    assert args.adamc_exclude == "output_layer,embedding"
    validate(megatron_args(adamc=False, optimizer_cuda_graph=True, lr_warmup_init=1.0))  # not AdamC's business
    validate(megatron_args(lr_decay_style="constant", min_lr=2e-3, lr_warmup_iters=0))  # never reaches min_lr


def test_exclusion_patterns() -> None:
    assert parse_exclude("output_layer,embedding") == ("output_layer", "embedding")
    assert parse_exclude(["output_layer", "embedding,output_layer"]) == ("output_layer", "embedding")
    assert parse_exclude("none") == parse_exclude("") == parse_exclude([]) == ()
    assert parse_exclude(None) == ("output_layer",)
    assert pattern_matches("output_layer", "output_layer.weight")
    assert pattern_matches("embedding", "embedding.word_embeddings.weight")
    assert not pattern_matches("embedding", "decoder.layers.0.self_attention.linear_qkv.weight")
    assert not pattern_matches("output", "output_layer.weight")  # whole module names, not prefixes
    assert pattern_matches("layers.1", "decoder.layers.1.mlp.linear_fc1.weight")
    assert not pattern_matches("layers.1", "decoder.layers.11.mlp.linear_fc1.weight")
    assert pattern_matches("*.linear_fc2.weight", "decoder.layers.3.mlp.linear_fc2.weight")
    tied = SimpleNamespace(shared_embedding=True)  # the last pipeline stage's copy of a tied embedding
    assert canonical_name("module.module.output_layer.weight", tied) == "embedding.word_embeddings.weight"
    assert canonical_name("module.output_layer.weight") == "output_layer.weight"


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

needs_megatron_lm = pytest.mark.skipif(
    not (MEGATRON_LM and is_checkout(Path(MEGATRON_LM))),
    reason=f"set {MEGATRON_LM_PATH_ENV} to a Megatron-LM checkout (git clone --branch {MEGATRON_LM_TAG})",
)

# One process (Megatron-LM takes ~20 s to import): its own parser, global args and TensorBoard writer, its own
# get_optimizer_param_scheduler, all patched by the start-up hook on the first import of megatron.training (no
# megatron-adamc import before it). The training loop is stood in for by its two scheduler-facing lines:
# args.curr_iteration = i; scheduler.step(global_batch_size). The plain run goes first, into the same writer.
REAL_MEGATRON_SCRIPT = r"""
import json, sys
root, out, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
import torch
import megatron.training.arguments as arguments  # the hook fires here
import megatron.training.training as training
from megatron.training import global_vars
from megatron_adamc.megatron.pretrain_gpt import expand_arg_files
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
    sys.argv = ["pretrain_gpt.py", *TINY, *(["--adamc", "--adamc-exclude", "none"] if mode == "adamc" else [])]
    args = arguments.parse_args()  # Megatron-LM's own, unchanged: the hook patched add_megatron_arguments
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
    assert run["state"].pop("adamc_history") == [["adamc", 0]]
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
    assert run["state"].pop("adamc_history") == [["plain", 0]]
    assert run["state"] == run["stock_state"]
    for groups in run["steps"]:
        for lr, stock_lr, wd, stock_wd, _ in groups:
            assert (lr, wd) == (stock_lr, stock_wd)


def test_config_files_parse_with_megatron_lms_parser(real_megatron: dict) -> None:
    assert real_megatron["configs"] == {str(config): [True, True, True, "hybrid"] for config in CONFIGS}


# Unmodified Megatron-LM scripts, run as a user runs them (python pretrain_gpt.py ...), in this environment whose
# installed megatron-adamc carries the start-up hook. core_v0.16.1's initialize_megatron asserts CUDA before it
# parses: the launcher below fakes that one check, so the run parses and validates Megatron's arguments (printing
# them) and stops later, at the real CUDA/NCCL work.
FAKE_FIRST_CUDA_CHECK = """
import runpy, sys, torch
torch.cuda.is_available = lambda: True
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TINY_FLAGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 30 --lr 1e-3 --min-lr 1e-5 --lr-warmup-iters 5 "
    "--lr-decay-style cosine --weight-decay 0.1 --mock-data --tokenizer-type NullTokenizer --vocab-size 128"
).split()
UNTOUCHED = """
import json, sys
import megatron.training.arguments as arguments
hook = sys.modules.get("megatron_adamc.autoload")
print(json.dumps({"patched": hasattr(arguments.add_megatron_arguments, "adamc_original"),
                  "hook": getattr(hook, "state", None)}))
sys.argv = ["pretrain_gpt.py", "--adamc"]
arguments.parse_args()
"""


@pytest.fixture(scope="module")
def real_scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    if not (MEGATRON_LM and is_checkout(Path(MEGATRON_LM))):
        pytest.skip(f"set {MEGATRON_LM_PATH_ENV} to a Megatron-LM checkout (git clone --branch {MEGATRON_LM_TAG})")
    out = tmp_path_factory.mktemp("megatron_scripts")
    launcher = out / "fake_first_cuda_check.py"
    launcher.write_text(FAKE_FIRST_CUDA_CHECK)
    root = Path(MEGATRON_LM)
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEGATRON_ADAMC_AUTOLOAD")}
    env.update(PYTHONPATH=str(root), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    python, gpt, mamba = sys.executable, str(root / "pretrain_gpt.py"), str(root / "pretrain_mamba.py")
    runs = {
        "gpt": ([python, str(launcher), gpt, *TINY_FLAGS, "--adamc", "--adamc-exclude", "output_layer,embedding"], {}),
        "gpt_typo": ([python, str(launcher), gpt, *TINY_FLAGS, "--adamcc"], {}),
        "mamba": ([python, str(launcher), mamba, *TINY_FLAGS, "--adamc"], {}),
        "dash_S": ([python, "-S", "-c", UNTOUCHED], {"PYTHONPATH": os.pathsep.join([*site, str(root)])}),
        "off": ([python, "-c", UNTOUCHED], {"MEGATRON_ADAMC_AUTOLOAD": "0"}),
    }
    procs = {
        name: subprocess.Popen(cmd, cwd=out, env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        for name, (cmd, extra) in runs.items()
    }  # fmt: skip
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return results


def printed_args(stdout: str) -> dict[str, str]:
    """Megatron-LM's own listing of its parsed arguments (validate_args prints it on rank 0)."""
    out = {}
    for line in stdout.splitlines():
        name, dots, value = line.strip().partition(" ...")
        if dots:
            out[name] = value.lstrip(". ")
    return out


def test_unmodified_pretrain_gpt_accepts_adamc_through_megatrons_parser(real_scripts: dict) -> None:
    run = real_scripts["gpt"]
    args = printed_args(run.stdout)
    assert args["adamc"] == "True" and args["adamc_exclude"] == "output_layer,embedding", run.stderr[-2000:]
    assert run.returncode != 0 and "NCCL" in run.stderr  # stopped at the real distributed/CUDA work, not at parsing


def test_unmodified_pretrain_mamba_accepts_adamc(real_scripts: dict) -> None:
    run = real_scripts["mamba"]
    assert printed_args(run.stdout)["adamc"] == "True", run.stderr[-2000:]


def test_a_misspelled_flag_is_still_rejected_by_megatrons_parser(real_scripts: dict) -> None:
    run = real_scripts["gpt_typo"]
    assert run.returncode == 2 and "pretrain_gpt.py: error: unrecognized arguments: --adamcc" in run.stderr


@pytest.mark.parametrize("mode, hook", [("dash_S", None), ("off", "off")])
def test_python_dash_s_and_switched_off_leave_megatron_lm_untouched(real_scripts: dict, mode: str, hook) -> None:
    run = real_scripts[mode]
    assert json.loads(run.stdout.strip().splitlines()[0]) == {"patched": False, "hook": hook}, run.stderr[-2000:]
    assert run.returncode == 2 and "unrecognized arguments: --adamc" in run.stderr
