#!/usr/bin/env bash
# One GPU lease, one run (written 2026-11-27 15:30 for the next lease): the CUDA tests (now with the sync-free
# compact-merge kernels), SparseGrad's GPU figures with the compact lazy-Adam state and float32 weight-gradient
# GEMMs (the new defaults) against LoRA, one seed with the dense state for comparison, the optimizer-step host cost,
# the profile; then the open LLM capacity rungs resumed for the rest of the lease (scripts/gpu_capacity_resume.sh).
#
#   OUT=dir SMOLLM=file.gguf MINILM=folder TEXT=tinyshakespeare.txt [DEADLINE=540] bash scripts/gpu_session.sh
#
# The extension is built beforehand in the background (`python setup.py build_ext --inplace`, log /tmp/build.log
# ending in BUILD_RC=...). Everything lands in $OUT/results.tgz (+ log.txt); the capacity fits in $OUT/cap/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?} ; mkdir -p "$OUT"
R=/tmp/gpu_results ; mkdir -p "$R"
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
T0=$(date +%s)
LOG=$R/log.txt
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1); torch $($PY -c 'import torch; print(torch.__version__)')"

# ---- 1. the extension (built in the background by the previous call) and the CUDA tests
for _ in $(seq 1 60); do grep -q BUILD_RC /tmp/build.log 2>/dev/null && break; sleep 5; done
say "build: $(grep BUILD_RC /tmp/build.log 2>&1); CUDA kernels: $($PY -c 'from scalerec.ops._lib import has_cuda_kernels; print(has_cuda_kernels())' 2>&1 | tail -1)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_llm_static.py 2>&1 | tail -4 | tee -a "$LOG"

# ---- 2. SparseGrad on the GPU
SG=(--device cuda --model "$MINILM" --steps 300 --batch-size 32 --max-length 64)
timeout 200 $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad --seeds 3 \
  --out "$R/sparsegrad.json" 2>&1 | grep -v Warning | tail -7 | cut -c1-400 | tee -a "$LOG"
timeout 60 $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad --seeds 1 --sparse-state dense \
  --out "$R/sparsegrad_dense.json" 2>&1 | grep -v Warning | tail -4 | cut -c1-400 | tee -a "$LOG"
timeout 60 $PY benchmarks/sparsegrad_optimizer_step.py --device cuda \
  > "$R/sparsegrad_optimizer_step.log" 2>&1; tail -4 "$R/sparsegrad_optimizer_step.log" | cut -c1-400 | tee -a "$LOG"
timeout 90 $PY benchmarks/sparsegrad_profile.py --device cuda --model "$MINILM" --steps 20 \
  --methods lora,sparsegrad,sparsegrad_unfused --out "$R/sparsegrad_profile.json" > "$R/sparsegrad_profile.log" 2>&1
grep -E "^==|ms  x|optimizer" "$R/sparsegrad_profile.log" | head -40 | cut -c1-160 | tee -a "$LOG"
tar czf "$OUT/results.tgz" -C "$R" .
cp "$LOG" "$OUT/log.txt"

# ---- 3. the capacity fits for the rest of the lease
OUT="$OUT/cap" DEADLINE=$(( $(left) - 10 )) bash scripts/gpu_capacity_resume.sh
say "done"
cp "$LOG" "$OUT/log.txt"
