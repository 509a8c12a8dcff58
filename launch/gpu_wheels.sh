#!/usr/bin/env bash
# What the GPU check (benchmarks/gpu_check.sh) needs that the device machine's image lacks, into the ignored .whl/:
# wheels for its CPython 3.12 (installed there with --no-index: it has no network) and the part of Megatron-LM that
# pretrain_gpt imports (megatron-core's wheel supplies megatron/core, with its compiled dataset helpers).
#   make gpu-wheels        (or: PYTHON=/path/to/venv/bin/python bash launch/gpu_wheels.sh)
# Versions are this venv's (constraints.txt: the tested set). DeepSpeed publishes only an sdist: its wheel is built
# here, pure Python, with no op prebuilt (FusedAdam JIT-builds on the GPU with its nvcc).
# Megatron-LM comes from $MEGATRON_LM_SRC (a clone, or a bare git directory, holding the tag) or a shallow clone of
# its public repository; it is never committed (.whl/ is ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=.whl
LIMIT_MIB=48 # the device tool carries 64 MiB in all, the repository included
MEGATRON_LM_URL=https://github.com/NVIDIA/Megatron-LM
MEGATRON_LM_PARTS=(megatron/training megatron/legacy megatron/rl megatron/post_training
  pretrain_gpt.py gpt_builders.py model_provider.py LICENSE)

version() { "$PYTHON" -c "from importlib.metadata import version; print(version('$1'))"; }
TAG=$(PYTHONPATH=$PWD "$PYTHON" -c "from megatron_adamc.megatron.megatron_lm import MEGATRON_LM_TAG as t; print(t)")

rm -rf "$OUT"
mkdir -p "$OUT"
echo "gpu-wheels: deepspeed $(version deepspeed), built from its sdist without ops"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "deepspeed==$(version deepspeed)"

PACKAGES=()
for name in megatron-core pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
  PACKAGES+=("$name==$(version "$name")")
done
echo "gpu-wheels: ${PACKAGES[*]} for CPython 3.12 manylinux x86-64"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$OUT" "${PACKAGES[@]}"

echo "gpu-wheels: Megatron-LM $TAG (${MEGATRON_LM_PARTS[*]})"
SRC=${MEGATRON_LM_SRC:-}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ -z "$SRC" ]; then
  git clone -q --depth 1 --branch "$TAG" "$MEGATRON_LM_URL" "$TMP/Megatron-LM"
  SRC=$TMP/Megatron-LM
fi
GIT_DIR_OF_SRC=$SRC
[ -d "$SRC/.git" ] && GIT_DIR_OF_SRC=$SRC/.git
mkdir -p "$OUT/Megatron-LM"
git --git-dir="$GIT_DIR_OF_SRC" archive "$TAG" "${MEGATRON_LM_PARTS[@]}" | tar -x -C "$OUT/Megatron-LM"
COMMIT=$(git --git-dir="$GIT_DIR_OF_SRC" rev-parse "$TAG^{commit}")
printf '%s\n' "Megatron-LM $TAG ($COMMIT) from $MEGATRON_LM_URL, parts: ${MEGATRON_LM_PARTS[*]}" \
  "License: LICENSE beside this file. Fetched by launch/gpu_wheels.sh; never committed." >"$OUT/Megatron-LM/SOURCE"

ls -l "$OUT"
WHEELS_KIB=$(du -sk "$OUT" | cut -f1)
REPO_KIB=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "gpu-wheels: .whl/ $((WHEELS_KIB / 1024)) MiB + tracked files $((REPO_KIB / 1024)) MiB (the device tool carries 64 MiB)"
if [ $((WHEELS_KIB / 1024)) -gt "$LIMIT_MIB" ]; then
  echo "gpu-wheels: error: .whl/ is over $LIMIT_MIB MiB; drop a wheel or carry less" >&2
  exit 1
fi
