"""Bad input, every command, in process (issue 22): each mistake is ONE line naming the field and the fix, the
documented exit code, and the run directory, data and outputs byte-identical afterwards.

One family per test, several members each: the DeepSpeed JSON below its top level (DeepSpeed's own parser), sizes
that cannot fit this machine (the planner), output paths of every command (one probe), config files, paths that
collide in a run directory, and plan / slurm submit sizes and paths. Each case goes through
``megatron_adamc.cli.main`` as the command line does; a case that passed preflight would start a process group, so
the trainer's ``init_distributed`` is replaced by an assertion.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, SMALL_TRAIN_SETS
from user_errors import no_process_group, refused, small_corpus, state_of  # noqa: F401 (fixtures)

from megatron_adamc import cli
from megatron_adamc.cli import main
from megatron_adamc.errors import CheckpointError, ResumeError
from megatron_adamc.train.checkpointer import Checkpointer
from megatron_adamc.train.resume import plan_resume

CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"


pytestmark = [pytest.mark.usefixtures("no_process_group"), pytest.mark.unit]  # every case stops in preflight


def train_argv(out: Path | str, *sets: str, config: Path = CONFIG) -> list[str]:
    argv = ["train", "--config", config, "--output-dir", out]
    for item in [*SMALL_TRAIN_SETS, "train.steps=4", *sets]:
        argv += ["--set", item]
    return argv


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An existing run directory with a metrics row (what a bad rerun must leave alone)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    return out


# -- family 1: the DeepSpeed JSON below its top level --------------------------------------------------------------


def _fp16_on_this_machine() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


DEEPSPEED_CASES = [
    ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage: 5 is not one of 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": -1}}, "zero_optimization.stage: -1 is not one of 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": "one"}}, 'zero_optimization.stage: "one" is not one of 0, 1, 2, 3'),
    ({"zero_optimization": {"stage": 1, "overlap_com": True}},
     "zero_optimization.overlap_com: unknown key (did you mean 'overlap_comm'?)"),
    ({"bf16": {"enable": True}}, "bf16.enable: unknown key (did you mean 'enabled'?)"),
    ({"bf16": True}, "bf16 must be an object"),
    ({"zero_optimization": 1}, "zero_optimization must be an object"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
     'zero_optimization.offload_optimizer.device: "gpu" is not one of none, cpu, nvme'),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"devise": "cpu"}}},
     "zero_optimization.offload_optimizer.devise: unknown key (did you mean 'device'?)"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bfloat16 and fp16 modes cannot be simultaneously"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param is a ZeRO-3 feature and stage 2 ignores it"),
    ({"fp16": {"enabled": True, "loss_scale": -1}}, "fp16.loss_scale must be >= 0"),
    ({"tensorboard": {"enabled": False, "output_pth": "x"}}, "tensorboard.output_pth: unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("ds", "message"), DEEPSPEED_CASES, ids=[m[:30] for _, m in DEEPSPEED_CASES])
def test_deepspeed_json_sections_are_one_line(capsys, tmp_path, run_dir, ds, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    refused(capsys, train_argv(run_dir, f"train.deepspeed={path}"), 2, message, watch=(run_dir, path))


def test_deepspeed_json_duplicates_device_and_plan(capsys, tmp_path, run_dir):
    dup = tmp_path / "dup.json"
    dup.write_text('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 2}}')
    refused(capsys, train_argv(run_dir, f"train.deepspeed={dup}"), 2, "key 'zero_optimization' is given twice")
    fp16 = tmp_path / "fp16.json"
    fp16.write_text('{"fp16": {"enabled": true}}')
    if not _fp16_on_this_machine():
        refused(capsys, train_argv(run_dir, f"train.deepspeed={fp16}"), 2, "fp16 is enabled, but this machine's")
    # plan reads the same JSON through the same checks
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 7}}')
    argv = ["plan", "--config", CONFIG, "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80"]
    refused(capsys, [*argv, "--set", f"train.deepspeed={bad}"], 2, "zero_optimization.stage: 7 is not one of")


# -- family 2: sizes that cannot fit this machine -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.vocab_size=100000000"], "the run cannot fit this machine's memory"),
        (["model.dim=8192", "model.n_heads=64", "model.n_kv_heads=8", "model.ffn_dim=28672", "model.n_layers=80"],
         "largest term optimizer"),
        (["train.steps=1000000000000"], "megatron-core's sample index for 2,000,000,000,004 samples"),
    ],
    ids=["vocab", "params", "steps"],
)  # fmt: skip
def test_sizes_that_cannot_fit_are_refused_by_the_planner(capsys, run_dir, sets, message):
    line = refused(
        capsys, train_argv(run_dir, *sets), 2, "the run cannot fit this machine's", message, watch=(run_dir,)
    )
    assert "fix: " in line


@pytest.mark.parametrize(
    "sets",
    [["train.seq_len=1000000000", "model.max_seq_len=1000000000"], ["train.micro_batch_size=10000000"]],
    ids=["seq_len", "micro_batch"],
)
@pytest.mark.usefixtures("small_corpus")
def test_sizes_beyond_the_data_are_refused_before_the_planner(capsys, run_dir, sets):
    """A sequence or a validation pass larger than the data: the data check speaks first (one line either way)."""
    refused(
        capsys, train_argv(run_dir, *sets), 2, "eval.batches: each rank's validation pass would read", watch=(run_dir,)
    )


# -- family 3: output paths of every command ----------------------------------------------------------------------


def test_output_paths_of_every_command(capsys, tmp_path, run_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    watch = (run_dir, a_file, a_dir)
    cases = [
        (train_argv("", "train.steps=2"), "--output-dir is empty: give a path"),
        (train_argv(a_file), f"--output-dir {a_file}: exists and is not a folder"),
        (train_argv(a_file / "run"), f"{a_file} is a file, so no folder can be created under it"),
        (["export", run_dir, "--format", "hf", "--output", "/proc/megatron-adamc-out"],
         "is on a virtual file system (proc)"),
        (["import-hf", tmp_path, "--output", "/sys/megatron-adamc-out"], "is on a virtual file system (sysfs)"),
        (["preprocess", "--input", a_file, "--tokenizer", a_file, "--output-prefix", a_dir],
         "is a folder; give a file prefix inside it"),
        (["preprocess", "--input", a_file, "--tokenizer", a_file, "--output-prefix", a_file / "data"],
         "is a file, so no folder can be created under it"),
        (["report", run_dir, "--output", a_file], f"--output {a_file}: exists and is not a folder"),
        (["experiment", "steady_state", "--output-dir", ""], "--output-dir is empty"),
        (["slurm", "submit", "--config", CONFIG, "--nodes", "1", "--output-dir", a_file / "x", "--dry-run"],
         "is a file, so no folder can be created under it"),
        (train_argv(run_dir, f"data.cache_dir={a_file}/cache"), "data.cache_dir", "is a file, so no folder"),
        (train_argv(run_dir, 'data.index_cache_dir=""'), "data.index_cache_dir is empty"),
        (train_argv(run_dir, "data.index_cache_dir=/proc/idx"), "data.index_cache_dir /proc/idx", "virtual"),
    ]  # fmt: skip
    for argv, *expected in cases:
        refused(capsys, argv, 2, *expected, watch=watch)


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A real read-only file system (a tmpfs remounted ro), which even root cannot write."""
    path = tmp_path / "ro"
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        (path / "existing_run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_file_system_is_one_line_for_each_command(capsys, tmp_path, read_only_dir):
    cases = [
        train_argv(read_only_dir / "existing_run"),
        train_argv(read_only_dir / "new" / "run"),
        ["report", tmp_path, "--output", read_only_dir / "report"],
        ["preprocess", "--input", CONFIG, "--tokenizer", CONFIG, "--output-prefix", read_only_dir / "data"],
    ]
    for argv in cases:
        refused(capsys, argv, 2, "is on a read-only file system; choose another path", watch=(read_only_dir,))


# -- family 5: config files ---------------------------------------------------------------------------------------


def test_config_files_are_one_line(capsys, tmp_path, run_dir):
    def config(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    cases = [
        (config("binary.yaml", b"\x7fELF\x02\x01\x00\x00" * 8), [], "a binary file, not YAML text"),
        (config("latin1.yaml", "seed: 1  # caf\xe9\n".encode("latin-1")), [], "not UTF-8 text (byte 0xe9 at "),
        (config("empty.yaml", b""), [], "the config is empty"),
        (config("comments.yaml", b"# only a comment\n\n"), [], "the config is empty"),
        (config("braces.yaml", b"{}\n"), [], "the config is empty"),
        (config("dup.yaml", b"train:\n  steps: 5\ntrain:\n  steps: 6\n"), [],
         "key 'train' is given twice (lines 1 and 3); keep one of them"),
        (config("dup2.yaml", b"optimizer:\n  lr: 0.1\n  lr: 0.2\n"), [], "key 'lr' is given twice (lines 2 and 3)"),
        (config("syntax.yaml", b"train: [1,\n"), [], "not valid YAML"),
        (tmp_path, [], "is a folder; pass a YAML file"),
        (CONFIG, ["train.steps=[1,"], "--set train.steps: not valid YAML"),
        (CONFIG, ["seed=-1"], "config: seed: Input should be greater than or equal to 0"),
        (CONFIG, ["seed=4294967296"], "config: seed: Input should be less than or equal to 4294967295"),
        (CONFIG, ["train.grad_clip=.inf"], "config: train.grad_clip: Input should be a finite number"),
        (CONFIG, ["train..steps=3"], "has an empty part"),
    ]  # fmt: skip
    for path, sets, message in cases:
        refused(capsys, train_argv(run_dir, *sets, config=path), 2, message, watch=(run_dir,))
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        refused(capsys, train_argv(run_dir, "logging.wandb=true"), 2, "pip install 'megatron-adamc[wandb]'")


def test_usage_mistakes_and_ctrl_c_while_importing_are_one_line(capsys, monkeypatch):
    refused(capsys, ["train"], 2, "the following arguments are required: --config, --output-dir")
    refused(capsys, ["plan", "--config", CONFIG, "--nodes", "a"], 2, "argument --nodes: invalid int value: 'a'")

    def interrupted(name: str):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    refused(capsys, ["train", "--config", CONFIG], 130, "megatron-adamc: interrupted")


# -- family 10: paths that collide in a run directory -------------------------------------------------------------


def test_run_directory_collisions_are_one_line(capsys, tmp_path, run_dir):
    refused(capsys, train_argv(run_dir, f"data.cache_dir={run_dir}"), 2,
            "--output-dir and data.cache_dir are the same folder", watch=(run_dir,))  # fmt: skip
    refused(capsys, train_argv(run_dir, f"data.index_cache_dir={run_dir}/checkpoints/idx"), 2,
            "is inside the run's checkpoints/", watch=(run_dir,))  # fmt: skip
    kinds = [
        ("metrics.jsonl", "dir", "metrics.jsonl is a folder"),
        ("run.json", "dir", "run.json is a folder"),
        ("checkpoints", "file", "checkpoints is a file where the trainer keeps its checkpoints/ folder"),
        ("run.json", b"{not json", "run.json is unreadable: not valid JSON"),
        ("run.json", b'{"invocations": 3}', "run.json is unreadable: not a run record"),
    ]
    for name, what, message in kinds:
        out = tmp_path / f"case-{name}-{len(str(what))}"
        out.mkdir()
        if name != "metrics.jsonl":
            (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
        if what == "dir":
            (out / name).mkdir()
        else:
            (out / name).write_bytes(what if isinstance(what, bytes) else b"x")
        refused(capsys, train_argv(out), 2, message, watch=(out,))


def test_deleted_checkpoints_and_saves_that_never_completed(tmp_path):
    """The resume decision on real folders: ``latest`` left but every step_N gone is exit 4 (deleted?), nothing
    changed; only incomplete saves: a reader (export) refuses, the trainer sets them aside with the old rows."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_4")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n')
    before = state_of(out)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(None, out, log=lambda _: None).find_resume()
    assert "latest names step_4, but it is gone and no step_N folder is left (deleted?)" in str(err.value)
    assert err.value.exit_code == 4 and state_of(out) == before

    (out / "checkpoints" / "latest").unlink()
    (out / "checkpoints" / "step_2").mkdir()
    (out / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    before = state_of(out)
    with pytest.raises(CheckpointError, match="no complete checkpoint .only saves that never completed: step_2"):
        Checkpointer(None, out, log=lambda _: None).find_resume(set_aside=False)
    assert state_of(out) == before
    logged: list[str] = []
    checkpointer = Checkpointer(None, out, log=logged.append)
    assert checkpointer.find_resume() is None and state_of(out) == before  # nothing renamed before the run starts
    checkpointer.start_afresh()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(names) == 1 and names[0].startswith("step_2.incomplete-"), names
    assert not (out / "metrics.jsonl").exists()
    aside = next(out.glob("metrics.set-aside-*.jsonl"))
    assert aside.read_text().count("step") == 2
    assert "skipped: no manifest.json (the save did not complete)" in logged[0]
    assert "set aside as step_2.incomplete-" in logged[1] and "held 2 rows up to step 2" in logged[2]


# -- family 11 (and 8's refusal): plan and slurm submit sizes and paths ---------------------------------------------


def test_global_batch_and_job_paths(capsys, tmp_path):
    cfg = tmp_path / "gb.yaml"
    text = CONFIG.read_text().replace("  grad_accum: 1\n", "  global_batch_size: 512\n")
    cfg.write_text(text.replace("../deepspeed/zero1.json", str(REPO / "configs" / "deepspeed" / "zero1.json")))
    plan = ["plan", "--config", cfg, "--nodes", "3", "--gpus-per-node", "7", "--gpu-memory-gb", "80"]
    refused(capsys, [*plan, "--set", "train.micro_batch_size=1"], 2,
            "train.global_batch_size=512 cannot be split over 21 rank(s) with train.micro_batch_size=1",
            "a global batch of 504 or 525")  # fmt: skip
    submit = ["slurm", "submit", "--config", cfg, "--nodes", "3", "--gpus-per-node", "7", "--dry-run"]
    refused(capsys, [*submit, "--output-dir", tmp_path / "run"], 2, "cannot be split over 21 rank(s)")
    assert main([str(a) for a in plan[:4]] + ["4", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--json"]) < 2
    assert json.loads(capsys.readouterr().out)["global_batch"] == 512  # 8 x accum 2 x 32 ranks
    both = [*plan, "--set", "train.micro_batch_size=1", "--set", "train.grad_accum=16"]
    refused(capsys, both, 2, "train.global_batch_size=512 contradicts")
    ok = ["slurm", "submit", "--config", CONFIG, "--nodes", "1", "--dry-run"]
    for name, message in (("a,b", "contains a comma"), ("50%", "contains a %")):
        refused(capsys, [*ok, "--output-dir", tmp_path / name], 2, message)
        assert not (tmp_path / name).exists()
    refused(capsys, [*ok, "--output-dir", tmp_path / "a:b", "--container-image", "img.sqsh"], 2, "contains a colon")


def test_resume_of_a_one_sample_batch_on_two_ranks_is_one_line():
    saved = {"global_batch": 1, "train.micro_batch_size": 1, "train.grad_accum": 1}
    with pytest.raises(ResumeError) as err:
        plan_resume(saved, dict(saved), saved_world=1, world=2)
    assert "cannot be split over 2 ranks" in str(err.value) and "at most 1 rank(s)" in str(err.value)


def test_the_probe_counts_the_docs_quote_are_the_probes():
    """docs/resilience.md quotes benchmarks/user_errors_probe.py's counts from its results JSON."""
    probe = json.loads((REPO / "docs" / "results" / "user_errors_probe.json").read_text())
    summary, results = probe["summary"], probe["results"]
    assert summary["cases"] == len(results) and summary["one_line"] == sum(r["one_line"] for r in results)
    text = " ".join((REPO / "docs" / "resilience.md").read_text().split())
    assert f"{summary['cases']} bad inputs and faults, {summary['one_line']} end in one line" in text
    for miss in results:
        if not miss["one_line"]:
            assert miss["case"] in text, miss["case"]
