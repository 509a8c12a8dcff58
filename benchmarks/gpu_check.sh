#!/usr/bin/env bash
# The GPU check as one command on the device machine (docs/gpu.md), after `make gpu-wheels` here:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels without network, points MEGATRON_LM_PATH at the carried part of Megatron-LM, and runs
# benchmarks/gpu_check.py: results in $OUT (they come back: gpu_check.json, .md, .log, curves.png), scratch in
# /tmp/gpu_check_work (the corpus and the FusedAdam build stay there for a second try on the same machine).
# Arguments go to gpu_check.py, e.g. a second try: bash benchmarks/gpu_check.sh --only parity,megatron --budget-s 200
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-runs/gpu_check}
SITE=/tmp/site
mkdir -p "$OUT_DIR"
if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "gpu_check.sh: no wheels in .whl/: run 'make gpu-wheels' first and pass carry=[\".whl\"]" >&2
  exit 2
fi
if [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl ||
    exit 2
  touch "$SITE/.installed"
fi
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH
[ -d .whl/Megatron-LM ] && export MEGATRON_LM_PATH=$PWD/.whl/Megatron-LM
export PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 benchmarks/gpu_check.py --out "$OUT_DIR" --work /tmp/gpu_check_work "$@"
