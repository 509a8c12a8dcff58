"""Slurm launch, tested on a real two-node Slurm cluster on this machine (tests/slurm/local_cluster.py).

The mechanics (two nodes, rendezvous, signals through the batch shell, srun and torchrun, checkpoint, requeue,
resume, crash requeue) are proven with tests/slurm/standin_train.py, a real gloo job with the trainer's command
line and files; the end-to-end tests run `megatron-adamc train` itself.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import cli
from conftest import SMALL_TRAIN_SETS

from megatron_adamc.metrics_file import MetricsFile

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "megatron_adamc" / "launch" / "slurm"  # shipped in the package; the checkout's launch/slurm links here
STANDIN = REPO / "tests" / "slurm" / "standin_train.py"
TINY_CONFIG = REPO / "configs" / "train" / "llama_tiny.yaml"
# The real trainer on the tests' small model and corpus (see conftest), short enough for CI.
TRAIN_SETS = ["train.steps=60", *SMALL_TRAIN_SETS, "eval.interval=30"]

_spec = importlib.util.spec_from_file_location("local_cluster", REPO / "tests" / "slurm" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cluster)

CLI = "import sys; from megatron_adamc.cli import main; sys.exit(main(sys.argv[1:]))"


def job_env(**extra: str) -> dict[str, str]:
    """What a job needs from the submitting shell: this venv's torchrun and python, this checkout's package."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, **extra}


def cli_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter, for what reaches a real cluster (sbatch reads the environment)."""
    return subprocess.run(
        [sys.executable, "-c", CLI, *argv], env=env or job_env(), cwd=REPO, capture_output=True, text=True
    )


# -- slurm submit --dry-run (no cluster needed) -------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "my config.yaml"
    cfg.write_text("train:\n  steps: 10\n")
    return cfg


def test_dry_run_renders_the_sbatch_line_the_script_expects(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run dir"
    sets = ["optimizer.lr=3e-4", "data.cache_dir=/data/my corpus", "logging.wandb_project=it's $HOME"]
    proc = cli(
        "slurm", "submit", "--config", str(config), "--nodes", "4", "--gpus-per-node", "8", "--time", "2-00:00:00",
        "--partition", "gpu", "--output-dir", str(out), *[a for kv in sets for a in ("--set", kv)], "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    argv = shlex.split(proc.stdout)
    script = argv.index(str(LAUNCH / "train.sbatch"))
    opts, script_args = argv[1:script], argv[script + 1 :]
    assert argv[0] == "sbatch"
    assert {"--nodes=4", "--gpus-per-node=8", "--time=2-00:00:00", "--partition=gpu"} <= set(opts)
    assert f"--output={out}/slurm/%x-%j.out" in opts
    export = next(o for o in opts if o.startswith("--export="))
    assert export == f"--export=ALL,NPROC_PER_NODE=8,MEGATRON_ADAMC_LAUNCH_DIR={LAUNCH}"
    assert script_args == ["--config", str(config), "--output-dir", str(out)] + [
        a for kv in sets for a in ("--set", kv)
    ]
    assert not out.exists()  # a dry run creates nothing

    # The batch script's own parsing of those arguments (common.sh) gives back the same directory and overrides.
    shell = f'source "{LAUNCH}/common.sh"; adamc_parse_output_dir "$@"; '
    shell += 'printf "%s\\n" "$OUTPUT_DIR" "${REST_ARGS[@]}"'
    parsed = subprocess.run(
        ["bash", "-c", shell, "bash", *script_args],
        env={**os.environ, "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert parsed.returncode == 0, parsed.stderr
    lines = parsed.stdout.splitlines()
    assert lines[0] == str(out)
    assert lines[1:] == ["--config", str(config)] + [a for kv in sets for a in ("--set", kv)]


def test_dry_run_on_cpu_nodes_and_default_output_dir(config: Path) -> None:
    proc = cli("slurm", "submit", "--config", str(config), "--nodes", "2", "--cpus-per-node", "3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert "--export=ALL,NPROC_PER_NODE=3," in next(a for a in argv if a.startswith("--export=")) + ","
    assert not any(a.startswith("--gpus-per-node") for a in argv)
    out = Path(argv[argv.index("--output-dir") + 1])
    assert out.is_absolute() and out.parent == REPO / "runs" and out.name.startswith("my config-")


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "2", "--gpus-per-node", "-1"], "--gpus-per-node"),
        (["--nodes", "2", "--gpus-per-node", "8", "--nproc-per-node", "4"], "--nproc-per-node"),
        (["--nodes", "2", "--time", "4h"], "--time"),
        (["--nodes", "2", "--set", "no_equals_sign"], "--set"),
        (["--nodes", "2", "--set", "=5"], "--set"),
        (["--nodes", "2", "--config", "/no/such/config.yaml"], "--config"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(config: Path, tmp_path: Path, args: list[str], names: str) -> None:
    out = tmp_path / "never"
    base = [] if "--config" in args else ["--config", str(config)]
    proc = cli("slurm", "submit", *base, *args, "--output-dir", str(out))  # not a dry run: nothing may happen
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["unknown_key", "empty_dataset"])
def test_dry_run_refuses_an_invalid_config_with_the_line_train_prints(config: Path, tmp_path: Path, kind: str) -> None:
    if kind == "unknown_key":
        sets, message = ["train.stepz=3"], "config: train.stepz: unknown key"
    else:
        prefix = tmp_path / "corpus"
        prefix.with_suffix(".bin").write_bytes(b"")
        prefix.with_suffix(".idx").write_bytes(b"")
        sets = ["data.default_corpus=false", f"data.train={prefix}", f"data.tokenizer={tmp_path / 'tok.model'}"]
        message = f"data.train: {prefix}.idx is empty (0 bytes)"
    out = tmp_path / "never"
    argv = ["--config", str(config), "--output-dir", str(out), *[a for kv in sets for a in ("--set", kv)]]
    submitted = cli("slurm", "submit", "--nodes", "2", "--nproc-per-node", "2", "--dry-run", *argv)
    trained = cli("train", *argv)
    assert submitted.returncode == trained.returncode == 2 and submitted.stdout == ""
    lines = [p.stderr.strip().splitlines() for p in (submitted, trained)]
    assert all(len(lns) == 1 for lns in lines), lines
    assert lines[0][0].startswith("megatron-adamc slurm: error: ") and message in lines[0][0]
    assert lines[0][0].split(": error: ", 1)[1] == lines[1][0].split(": error: ", 1)[1]  # the very line train prints
    assert not out.exists()


def test_dry_run_checks_the_config_at_the_jobs_world_size(config: Path, tmp_path: Path, capsys) -> None:
    from megatron_adamc.cli import main

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 1}}))
    argv = ["slurm", "submit", "--config", str(config), "--nodes", "2", "--dry-run"]
    argv += ["--set", f"train.deepspeed={ds}", "--set", "train.micro_batch_size=2", "--set", "train.grad_accum=1"]
    assert main([*argv, "--nproc-per-node", "4"]) == 0  # 2 nodes x 4 processes x 2 = 16
    assert capsys.readouterr().out.startswith("sbatch ")
    assert main([*argv, "--nproc-per-node", "2"]) == 2
    assert "train_batch_size=16 contradicts micro_batch_size x grad_accum x world size = 8" in capsys.readouterr().err


@pytest.mark.parametrize(("rc", "requeued"), [(2, False), (3, False), (4, False), (5, False), (1, True), (137, True)])
def test_failure_requeue_skips_the_exit_codes_a_rerun_repeats(tmp_path: Path, rc: int, requeued: bool) -> None:
    """With MAX_FAILURE_REQUEUES set, a crash (1, a signal) is requeued; bad input (2), divergence (3), no loadable
    checkpoint (4) and a held run directory (5) are not: the requeued job would fail the same way, forever."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    (bin_dir / "sleep").write_text("#!/bin/sh\n")  # adamc_finish waits for the requeue to end it
    for tool in ("scontrol", "sleep"):
        (bin_dir / tool).chmod(0o755)
    shell = f'source "{LAUNCH}/common.sh"; OUTPUT_DIR={tmp_path}/run; STEP_RC={rc}; adamc_finish'
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "MAX_FAILURE_REQUEUES": "3",
           "MEGATRON_ADAMC_REQUEUE_FILE": str(tmp_path / "none")}  # fmt: skip
    proc = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True)
    calls = (tmp_path / "scontrol.calls").read_text() if (tmp_path / "scontrol.calls").exists() else ""
    assert (calls == "requeue 7\n") == requeued, (calls, proc.stderr)
    assert proc.returncode == (0 if requeued else rc), proc.stderr
    if not requeued:
        assert f"step failed with exit {rc}: not requeued" in proc.stderr


def test_shell_scripts_parse_and_pass_shellcheck() -> None:
    scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"train.sbatch", "megatron.sbatch", "node.sh", "common.sh", "env.sh"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    proc = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# -- the real cluster ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (apt-get, slurmd as root); CI (.ci/run) runs as root")
    c = local_cluster.LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except local_cluster.ClusterUnavailable as err:
        pytest.skip(f"no local Slurm cluster: {err}")
    try:
        yield c
    finally:
        c.stop()  # by pid; runs also when a test failed


def submit(cluster, config: Path, out: Path, sets: list[str], **env: str) -> int:
    """Submit through `megatron-adamc slurm submit` (not a dry run) on 2 nodes x 1 CPU process."""
    argv = ["slurm", "submit", "--config", str(config), "--nodes", "2", "--nproc-per-node", "1"]
    argv += ["--output-dir", str(out), *[a for kv in sets for a in ("--set", kv)]]
    proc = cli_process(*argv, env={**job_env(**env), **{"SLURM_CONF": str(cluster.conf)}})
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"Submitted batch job (\d+)", proc.stdout)
    assert match, proc.stdout
    return int(match.group(1))


TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait_for(predicate, timeout: float, what: str, cluster=None, job: int | None = None) -> None:
    """Poll predicate; fail at once if the job ended meanwhile (no waiting out the timeout on a dead job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if cluster is not None and (state := cluster.job(job).get("JobState")) in TERMINAL:
            raise AssertionError(f"job {job} ended ({state}) while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def metrics(out: Path) -> list[dict]:
    """The trainer's rows (events aside), while it may still be writing."""
    return MetricsFile(out).read().rows


def runs(out: Path) -> list[dict]:
    path = out / "runs.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def slurm_log(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))


def finish(cluster, job: int, out: Path, timeout: float = 300) -> dict[str, str]:
    try:
        info = cluster.wait_job(job, TERMINAL, timeout)
    except TimeoutError:
        subprocess.run(["scancel", str(job)], env=cluster.env)
        raise
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", slurm_log(out)
    return info


def scancel(cluster, *args: str) -> None:
    subprocess.run(["scancel", *args], env=cluster.env, check=True)


STANDIN_SETS = ["train.steps=30", "checkpoint.interval=5"]  # valid trainer keys: `slurm submit` checks them
STANDIN_ENV = {"MEGATRON_ADAMC_ENTRY": str(STANDIN), "STANDIN_STEP_SECONDS": "0.3"}


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = tmp / "config.yaml"
    config.write_text("train: {}\n")
    out = tmp / "run"
    job = submit(cluster, config, out, STANDIN_SETS, **STANDIN_ENV)
    return out, finish(cluster, job, out)


def test_two_node_job_completes(uninterrupted: tuple[Path, dict[str, str]]) -> None:
    out, info = uninterrupted
    assert info["NumNodes"] == "2" and info["Restarts"] == "0"
    run = json.loads((out / "run.json").read_text())  # the stand-in's own record
    assert run["world_size"] == 2 and run["num_nodes"] == 2 and run["nodes"] == ["n1", "n2"]
    assert run["master_addr"] == "127.0.0.1"  # the first node's NodeAddr from scontrol, not a guess
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(30))
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0]
    assert (out / "checkpoints" / "latest").read_text() == "step30"


def test_preempted_twice_requeues_resumes_and_matches(cluster, uninterrupted, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = submit(cluster, config, out, STANDIN_SETS, **STANDIN_ENV)
    try:
        # 1st preemption: signal the job's steps (what Slurm does for --signal=USR1@T without B:).
        wait_for(lambda: len(metrics(out)) >= 5, 180, "5 steps", cluster, job)
        scancel(cluster, "--signal=USR1", str(job))
        wait_for(lambda: len(runs(out)) == 2, 300, "the requeued job to start", cluster, job)
        # 2nd preemption: signal only the batch shell (what --signal=B:USR1@T does, our sbatch default).
        first_resume = runs(out)[1]["resumed_from_step"]
        wait_for(lambda: len(metrics(out)) >= first_resume + 5, 180, "5 steps after the resume", cluster, job)
        scancel(cluster, "--batch", "--signal=USR1", str(job))
        info = finish(cluster, job, out, timeout=400)
    finally:
        subprocess.run(["scancel", str(job)], env=cluster.env)
    assert info["Restarts"] == "2"
    started = runs(out)
    assert [r["restart_count"] for r in started] == [0, 1, 2]
    resumed = [r["resumed_from_step"] for r in started]
    assert resumed[0] is None and 5 <= resumed[1] < resumed[2] < 30
    assert all(r["world_size"] == 2 and r["num_nodes"] == 2 for r in started)
    # Nothing lost: same steps, bit-identical losses as the uninterrupted run.
    assert metrics(out) == metrics(uninterrupted[0])
    log = slurm_log(out)
    assert log.count("preempted: checkpoint saved, requeueing") == 2
    assert "batch shell got SIGUSR1" in log


def test_dead_rank_takes_the_job_down_and_the_requeue_resumes(cluster, uninterrupted, config, tmp_path) -> None:
    out = tmp_path / "run"
    crash = {"STANDIN_CRASH_RANK": "1", "STANDIN_CRASH_AT": "12", "MAX_FAILURE_REQUEUES": "1"}
    job = submit(cluster, config, out, STANDIN_SETS, **STANDIN_ENV, **crash)
    try:
        info = finish(cluster, job, out, timeout=400)
    finally:
        subprocess.run(["scancel", str(job)], env=cluster.env)
    assert (out / "crashed-once").read_text() == "12"
    assert info["Restarts"] == "1"
    assert [r["resumed_from_step"] for r in runs(out)] == [None, 10]  # the last checkpoint before the crash
    assert metrics(out) == metrics(uninterrupted[0])
    assert "step failed (exit" in slurm_log(out)


def test_requeue_of_an_unknown_job_is_refused_by_real_slurm(cluster, tmp_path: Path) -> None:
    env = {**cluster.env, "SLURM_JOB_ID": "999999", "PYTHONPATH": str(REPO)}
    env.pop("MEGATRON_ADAMC_REQUEUE_FILE", None)
    code = "from megatron_adamc.train.preemption import PreemptionHandler as H; print(H().requeue())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False"
    assert "scontrol requeue 999999 failed" in proc.stderr


# -- the real trainer, end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_uninterrupted(cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    job = submit(cluster, TINY_CONFIG, out, TRAIN_SETS)
    finish(cluster, job, out, timeout=600)
    return out


@pytest.mark.slow
def test_train_sbatch_runs_the_trainer_on_two_nodes(trainer_uninterrupted: Path) -> None:
    out = trainer_uninterrupted
    (invocation,) = json.loads((out / "run.json").read_text())["invocations"]
    assert invocation["world_size"] == 2 and invocation["num_nodes"] == 2 and invocation["slurm_job_id"]
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == int(TRAIN_SETS[0].split("=")[1])
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.slow
def test_train_preempted_resumes_with_the_same_losses(cluster, trainer_uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = submit(cluster, TINY_CONFIG, out, TRAIN_SETS)
    try:
        wait_for(lambda: len(metrics(out)) >= 5, 400, "5 trainer steps", cluster, job)
        scancel(cluster, "--signal=USR1", str(job))
        info = finish(cluster, job, out, timeout=600)
    finally:
        subprocess.run(["scancel", str(job)], env=cluster.env)
    assert info["Restarts"] == "1"
    invocations = json.loads((out / "run.json").read_text())["invocations"]
    assert len(invocations) == 2 and invocations[1]["start_step"] >= 5  # one entry per invocation, the requeue
    resumed, base = metrics(out), metrics(trainer_uninterrupted)
    assert [r["step"] for r in resumed] == [r["step"] for r in base]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in base], rel=1e-6, abs=1e-7)
