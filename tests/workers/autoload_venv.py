"""Throwaway virtual environments with megatron-adamc installed for real, to test the start-up hook where it lives.

``installed_venv(root, "wheel")`` builds the wheel with pip (``pip wheel --no-build-isolation``, through the project's
own PEP 517 backend) and installs it with pip into a fresh ``python -m venv --without-pip``; ``"editable"`` calls the
backend's ``build_editable`` (what ``pip install -e`` calls) and installs that wheel the same way. Only then does a
last ``.pth`` *path* line make the running interpreter's site-packages (torch, DeepSpeed, transformers) importable:
path lines do not run that directory's own ``.pth`` files, so nothing of the environment running the tests (the
shared venv's editable megatron-adamc, or a start-up hook installed there) leaks into the one under test. The
environment is built once per directory and reused (a stamp file marks it complete).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STARTUP_FILES = ("megatron_adamc_autoload.pth", "megatron_adamc_autoload.start")
DEPS_PTH = "zz_megatron_adamc_test_deps.pth"  # sorts after megatron_adamc_autoload.pth, as any package might
_SOURCE_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "docs", "tests"
)


def _run(cmd: list[str], **kwargs) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def build(kind: str, source: Path, out: Path) -> Path:
    """The wheel (``kind="wheel"``) or editable wheel (``"editable"``) of ``source``, built by its own backend."""
    out.mkdir(parents=True, exist_ok=True)
    if kind == "wheel":
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, source])
    else:  # pip's front end for -e calls exactly this hook, with backend-path on sys.path
        code = "import sys, megatron_adamc_backend as b; b.build_editable(sys.argv[1])"
        env = {**os.environ, "PYTHONPATH": str(source / "build_backend")}
        _run([sys.executable, "-c", code, str(out)], cwd=source, env=env)
    (wheel,) = out.glob("*.whl")
    return wheel


_built: dict[str, Path] = {}  # kind -> its wheel, built once per test process


def project_wheel(kind: str, scratch: Path) -> Path:
    """The wheel (or editable wheel) of a copy of this checkout's sources, built once per test process."""
    if kind not in _built or not _built[kind].is_file():
        root = scratch / f"project-{kind}"
        shutil.rmtree(root, ignore_errors=True)
        source = root / "source"
        shutil.copytree(REPO, source, ignore=_SOURCE_IGNORE)
        _built[kind] = build(kind, source, root / "dist")
    return _built[kind]


def installed_venv(root: Path, kind: str, scratch: Path | None = None) -> Path:
    """A venv under ``root`` with megatron-adamc installed as ``kind`` ("wheel" or "editable"); built once. The
    wheel is shared by every venv of the process (built under ``scratch``, default ``root``)."""
    venv = root / f"venv-{kind}"
    if (venv / ".complete").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    wheel = project_wheel(kind, scratch or root)
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    _run(
        [sys.executable, "-m", "pip", "--python", venv_python(venv), "install", "-q", "--no-deps", "--no-index", wheel]
    )
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (site_packages(venv) / DEPS_PTH).write_text("".join(f"{p}\n" for p in deps))
    (venv / ".complete").touch()
    return venv


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH (the venv's own megatron-adamc must be the one imported)."""
    drop = ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MEGATRON_ADAMC_")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}
