#!/usr/bin/env bash
# Syntax-check CUDA sources with nvcc on a machine without a GPU or a CUDA build of torch:
#   csrc/cuda/check_compile.sh [file.cu ...]     (default: every csrc/cuda/*.cu)
# Compiles each file to an object against the installed torch's headers. A CPU-only torch wheel lacks
# c10/cuda/impl/cuda_cmake_macros.h (generated at torch's build time), so a one-line stand-in is provided.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "check_compile: nvcc not found" >&2; exit 2; }
TI=$($PY -c "import torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))")
PYI=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(csrc/cuda/*.cu)
for f in "${files[@]}"; do
  echo "nvcc: $f"
  "$NVCC" -std=c++20 --expt-relaxed-constexpr -DTORCH_EXTENSION_NAME=_C -I"$tmp/stub" $TI -I"$PYI" \
    -c "$f" -o "$tmp/$(basename "$f").o"
done
echo "check_compile: ${#files[@]} file(s) compiled"
