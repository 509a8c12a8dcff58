"""The installed package does not assume the source tree: a wheel ships the configs and the Slurm scripts, and
`slurm submit` and the experiments find them from any directory; the checkout's paths link into the package."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from megatron_adamc import resources

PACKAGE = REPO / "megatron_adamc"
SHIPPED = ["configs", "launch/slurm"]


def shipped_files() -> list[str]:
    files = [p for d in SHIPPED for p in (PACKAGE / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(str(p.relative_to(REPO)) for p in files)


def test_checkout_paths_are_links_into_the_package(tmp_path, monkeypatch):
    for rel in SHIPPED:
        assert (REPO / rel).is_symlink() and (REPO / rel).resolve() == PACKAGE / rel
    assert resources.configs_dir() == PACKAGE / "configs" and resources.launch_dir() == PACKAGE / "launch/slurm"
    names = {p.name for p in resources.launch_dir().iterdir()}
    assert names == {"train.sbatch", "megatron.sbatch", "node.sh", "common.sh", "env.sh"}  # no test-only cluster
    monkeypatch.chdir(tmp_path)  # outside the checkout: configs/... names the shipped copy
    assert resources.find_file("configs/deepspeed/zero1.json") == PACKAGE / "configs/deepspeed/zero1.json"
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)
    (tmp_path / "configs" / "deepspeed" / "zero1.json").write_text("{}")  # a file of the user's wins
    assert resources.find_file("configs/deepspeed/zero1.json") == Path("configs/deepspeed/zero1.json")
    assert resources.find_file("configs/nope.json") == Path("configs/nope.json")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built into a wheel from a copy of the sources and installed into a bare target directory."""
    from workers.autoload_venv import project_wheel

    tmp = tmp_path_factory.mktemp("wheel")
    wheel = project_wheel("wheel", tmp_path_factory.getbasetemp())  # the one the start-up hook's tests install
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in shipped_files() if f not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert not any("local_cluster" in n or n.startswith("tests/") for n in names)
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def run_installed(target: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """Python with only the installed copy importable (before the venv's editable install), outside the repo."""
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_install_submits_and_finds_its_configs_outside_the_repo(installed, tmp_path):
    pkg = installed / "megatron_adamc"
    # The experiments' base config and the package itself come from the install, not from this checkout.
    code = (
        "import megatron_adamc; from megatron_adamc.experiments._trainer_runs import LlmConfig, base_config_path; "
        "print(megatron_adamc.__file__); print(base_config_path(LlmConfig()))"
    )
    proc = run_installed(installed, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(pkg / "__init__.py"), str(pkg / "configs/train/llama_tiny.yaml")]

    argv = ["-m", "megatron_adamc.cli", "slurm", "submit", "--dry-run", "--config", "configs/train/llama_tiny.yaml"]
    argv += ["--nodes", "2", "--nproc-per-node", "2", "--output-dir", "run"]
    proc = run_installed(installed, tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr
    line = shlex.split(proc.stdout)
    launch = pkg / "launch" / "slurm"
    assert line[line.index(str(launch / "train.sbatch")) + 1 :][:4] == [
        "--config", str(pkg / "configs/train/llama_tiny.yaml"), "--output-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    assert f"MEGATRON_ADAMC_LAUNCH_DIR={launch}" in next(a for a in line if a.startswith("--export="))
    assert all((launch / name).is_file() for name in ("train.sbatch", "common.sh", "node.sh", "env.sh"))
    assert not (tmp_path / "run").exists()

    # And it validates there too: the shipped config's DeepSpeed JSON is found, a bad value refused in one line.
    proc = run_installed(installed, tmp_path, *argv, "--set", "optimizer.type=Adam")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (
        "megatron-adamc slurm: error: config: optimizer.type: Input should be 'AdamC' or 'AdamW' (got 'Adam')"
    )
