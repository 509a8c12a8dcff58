#!/usr/bin/env bash
# Creates .venv with the tested stack (constraints.txt). Idempotent: a finished set-up leaves a stamp and is skipped.
#   launch/setup.sh train   what `make train` needs: torch, DeepSpeed, megatron-core, the package (`.[train]`)
#   launch/setup.sh test    also the test clients (transformers, accelerate, Megatron-Bridge) and DeepSpeed's CPU ops,
#                           built once up front so that test ranks never race on the JIT build lock
# DeepSpeed's ops are otherwise built on first use (a one-rank CPU run needs none: megatron_adamc/train/distributed.py).
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-train}
case "$WHAT" in train | test) ;; *) echo "usage: launch/setup.sh [train|test]" >&2 && exit 2 ;; esac
PYTHON=${PYTHON:-python3}
STAMP=.venv/.setup-$WHAT
if [ -f "$STAMP" ] && [ "$STAMP" -nt constraints.txt ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt launch/setup.sh ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# The venv's tools first: its ninja builds DeepSpeed's ops, as in every later process (megatron_adamc/train/jit_locks.py).
export PATH="$PWD/.venv/bin:$PATH"
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt)
"${PIP[@]}" --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" torch   # a GPU machine: the CUDA build of the pinned torch
  else
    "${PIP[@]}" torch==2.13.0   # the CPU wheel on this kind of machine
  fi
fi
# DeepSpeed builds against the torch above; with build isolation it would pull another torch.
"${PIP[@]}" --no-build-isolation deepspeed
# The editable install goes through build_backend/ (pyproject.toml), which adds the start-up hook
# (megatron_adamc_autoload.pth/.start) to site-packages: "type": "AdamC" and --adamc then work without register().
if [ "$WHAT" = train ]; then
  "${PIP[@]}" --no-build-isolation -e ".[train]"
  touch "$STAMP"
  exit 0
fi
"${PIP[@]}" --no-build-isolation -e ".[dev,test,train]"
# Megatron-Bridge for tests/test_megatron_bridge.py: the newest release for Python 3.11 / megatron-core 0.16, without its
# GPU stack (Transformer Engine, mamba-ssm, ...: the test stands in for TE and triton only), plus what its config
# module imports at the top.
"${PIP[@]}" --no-deps megatron-bridge==0.3.1
"${PIP[@]}" hydra-core==1.3.2 omegaconf==2.3.1 six==1.17.0 datasets==5.2.0
# Build the ops DeepSpeed JIT-compiles on first use (about 100 s each on 2 cores), once, in one process.
.venv/bin/python - <<'PY'
import time
from deepspeed.accelerator import get_accelerator

acc = get_accelerator()
names = ["FusedAdamBuilder", "CPUAdamBuilder"] + (["ShareMemCommBuilder"] if acc.device_name() == "cpu" else [])
for name in names:
    start = time.time()
    builder = acc.create_op_builder(name)
    if builder is None or not builder.is_compatible():
        print(f"setup: {name} not available on {acc.device_name()}, skipped")
        continue
    builder.load(verbose=False)
    print(f"setup: DeepSpeed op {builder.name} ready ({time.time() - start:.0f} s)")
PY
touch "$STAMP" .venv/.setup-train
