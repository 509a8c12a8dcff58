"""Megatron-LM on Slurm: ``megatron-adamc slurm submit --megatron`` parses the arguments with Megatron-LM's own parser
(AdamC's flags added by the start-up hook) before anything is queued, and ``megatron.sbatch`` runs the unmodified
script with ``--adamc`` as a normal flag (so ``--no-adamc`` is a baseline) and ``--args-file`` split like ``@file``.

Megatron-LM comes from MEGATRON_LM_PATH where set (a real checkout: its pretrain_gpt.py stops at "Megatron requires
CUDA." on these CPU nodes), else from the stand-in (tests/workers/megatron_lm_standin), whose pretrain_gpt.py reports
the arguments it parsed and stops at the same assertion. The jobs run on the local two-node Slurm cluster
(tests/slurm/local_cluster.py), 2 nodes x 1 process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_slurm import cluster  # noqa: F401 - the local two-node Slurm cluster (started by this module for itself)

from megatron_adamc.megatron.megatron_lm import MEGATRON_LM_PATH_ENV, is_checkout

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "workers" / "megatron_lm_standin"
REAL = os.environ.get(MEGATRON_LM_PATH_ENV, "")
MEGATRON_LM = Path(REAL) if REAL and is_checkout(Path(REAL)) else STANDIN
CLI = "import sys; from megatron_adamc.cli import main; sys.exit(main(sys.argv[1:]))"
ARGS = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine"]


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    drop = ("PYTHONPATH", "MEGATRON_ADAMC_AUTOLOAD")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "PATH": path, MEGATRON_LM_PATH_ENV: str(MEGATRON_LM), "OMP_NUM_THREADS": "1", **extra}


def submit(*argv: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CLI, "slurm", "submit", "--megatron", *argv],
        env=env(**extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def dry_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path):
    """``megatron-adamc slurm submit --megatron --dry-run ...`` in this process: (exit code, stdout, stderr lines)."""
    from megatron_adamc.cli import main

    monkeypatch.setenv(MEGATRON_LM_PATH_ENV, str(MEGATRON_LM))
    monkeypatch.delenv("MEGATRON_ADAMC_AUTOLOAD", raising=False)

    def run(*argv: str) -> tuple[int, str, list[str]]:
        code = main(["slurm", "submit", "--megatron", "--output-dir", str(tmp_path / "run"), "--dry-run", *argv])
        out, err = capsys.readouterr()
        return code, out, err.strip().splitlines()

    return run


@pytest.fixture
def args_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.args"
    path.write_text("# a Megatron-LM argument file\n--weight-decay 0.1  # comment\n--data-path 'corpus with spaces'\n")
    return path


def test_dry_run_renders_the_unmodified_script_and_the_arguments(dry_run, args_file: Path) -> None:
    code, out, err = dry_run("--config", str(args_file), "--nodes", "2", "--gpus-per-node", "8", "--", *ARGS, "--adamc")
    assert code == 0, err
    assert "/launch/slurm/megatron.sbatch --output-dir" in out
    assert f"--script {MEGATRON_LM / 'pretrain_gpt.py'} --args-file {args_file}" in out
    assert out.strip().endswith("--lr-decay-style cosine --adamc")  # nothing appended: --no-adamc is a baseline


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adamcc"], "unrecognized arguments: --adamcc"),
        (["--adamc", "--lr-warmup-init", "2e-3"], "--lr-warmup-init 0.002 is above it"),
    ],
)
def test_arguments_megatron_would_refuse_are_refused_before_queueing(dry_run, extra: list[str], message: str) -> None:
    code, out, err = dry_run("--nodes", "1", "--", *ARGS, *extra)
    assert code == 2 and out == "" and len(err) == 1
    assert err[0].startswith("megatron-adamc slurm: error: Megatron-LM's parser refused") and message in err[0]


def test_a_missing_argument_file_is_one_line(dry_run, tmp_path: Path) -> None:
    code, _, err = dry_run("--config", str(tmp_path / "nope.args"), "--nodes", "1")
    assert code == 2 and err == [f"megatron-adamc slurm: error: --config {tmp_path / 'nope.args'}: no such file"]


# -- the real cluster ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(cluster, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("megatron_jobs")
    args_file = tmp / "model.args"
    args_file.write_text("--weight-decay 0.1\n--data-path 'corpus with spaces'  # quoted, as @file reads it\n")
    # The baseline: the old script appended --adamc to whatever was given; now the flag is the user's.
    out = tmp / "run"
    argv = ["--config", str(args_file), "--nodes", "2", "--nproc-per-node", "1", "--output-dir", str(out)]
    proc = submit(*argv, "--", *ARGS, "--no-adamc", SLURM_CONF=str(cluster.conf))
    assert proc.returncode == 0, proc.stderr
    job = int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))
    info = cluster.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 300)
    return info, "\n".join(p.read_text() for p in sorted((out / "slurm").glob("*.out")))


def reported(log: str) -> list[dict]:
    return [json.loads(line.split("STANDIN_ARGS ", 1)[1]) for line in log.splitlines() if "STANDIN_ARGS " in line]


def test_both_nodes_run_the_unmodified_script_and_stop_at_cuda(job: tuple) -> None:
    info, log = job
    assert info["JobState"] == "FAILED", log[-3000:]
    assert "Megatron requires CUDA." in log  # the script ran on the nodes and stopped at the real CUDA work
    assert "megatron_adamc.megatron.pretrain_gpt" not in log  # no wrapper between Megatron-LM and torchrun


@pytest.mark.skipif(MEGATRON_LM != STANDIN, reason="the real pretrain_gpt.py asserts CUDA before it parses")
def test_adamc_is_a_normal_flag_and_the_args_file_splits_like_at_file(job: tuple) -> None:
    reports = reported(job[1])
    assert len(reports) == 2  # one rank per node
    for report in reports:
        assert report["hook"] and report["adamc"] is False  # the baseline: no --adamc added behind the user's back
        assert report["data_path"] == "corpus with spaces" and report["save"].endswith("/checkpoints")
