#!/usr/bin/env bash
# One GPU lease, one run: SparseGrad's GPU speed and memory after the sync-free optimizer changes, and the LLM
# capacity rungs still open, resumed from the CPU runs' best vectors (session of 2026-11-27 08:30).
#
#   OUT=dir SMOLLM=file.gguf MINILM=folder TEXT=tinyshakespeare.txt RESUME_DIR=dir [DEADLINE=480] \
#       bash scripts/gpu_session.sh
#
# The extension is built beforehand in the background (`python setup.py build_ext --inplace`, log /tmp/build.log
# ending in BUILD_RC=...). Timeline: two capacity fits start at once, ONE process each with its texts batched
# (earlier leases: five processes sharing an H100 ran > 70 ms a step each); the CUDA tests run once the build is
# done; the fits are paused (SIGSTOP) while the SparseGrad benchmarks have the GPU to themselves, then resumed until
# DEADLINE seconds after the start. Each finished rung's JSON and vectors are on disk as soon as it ends.
# Everything lands in $OUT/results.tgz (+ log.txt).
#
# RESUME_DIR holds two --resume files made from benchmarks/results/ (the not-yet-exact vectors of the rung each fit
# starts at): resume_os128.pt {one-step: {128: {10: run14b, 575: run17, 267: run17b}}} and resume_ar80.pt
# {ar: {80: {0: p0_lr01, 2: run17, 3: run17, 4: the 63/64 vector of run 14 as a start}}}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?} ; mkdir -p "$OUT"
R=/tmp/gpu_results ; mkdir -p "$R"
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-480}
T0=$(date +%s)
LOG=$R/log.txt
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
say "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1); torch $($PY -c 'import torch; print(torch.__version__)')"

# ---- 1. the capacity fits (float32, TF32 off: the vectors must also decode on a CPU)
RES=benchmarks/results
cap() {  # name, args...
  local name=$1; shift
  OMP_NUM_THREADS=1 timeout $(( DEADLINE - 15 - ($(date +%s) - T0) )) $PY benchmarks/llm_capacity.py \
    --model "$SMOLLM" --device cuda --dtype float32 --sections capacity --fit restart_patience=0 --log-every 250 --save-every 250 \
    --json-out "$R/$name.json" --vectors-out "$R/$name.pt" "$@" > "$R/$name.log" 2>&1 &
  echo $! > "$R/$name.pid"
}
cap os128 --modes one-step --text "$TEXT" --passage-ids 10,575,267 --lengths 128,160 --max-steps 4000 \
  --fit lr=0.015 --fit warmup_steps=300 --resume "$RESUME_DIR/resume_os128.pt" \
  --vectors-in $RES/llm_vectors_onestep64_p10.pt $RES/llm_vectors_onestep128_p575_run17.pt $RES/llm_vectors_onestep64_p267_run17.pt
cap ar80 --modes ar --passage-ids 0,2,3,4 --lengths 80,96 --max-steps 3000 \
  --fit lr=0.015 --fit warmup_steps=300 --resume "$RESUME_DIR/resume_ar80.pt" \
  --vectors-in $RES/llm_vectors_ar64_p0.pt $RES/llm_vectors_ar64_p2.pt $RES/llm_vectors_ar64_p3.pt $RES/gpu_h100/llm_vectors_ar32_p4.pt
say "capacity fits started"
fitpids() { for f in "$R"/*.pid; do pgrep -P "$(cat "$f")" || true; done; }

# ---- 2. the extension (built in the background by the previous call) and the CUDA tests
for _ in $(seq 1 60); do grep -q BUILD_RC /tmp/build.log 2>/dev/null && break; sleep 5; done
say "build: $(grep BUILD_RC /tmp/build.log 2>&1); CUDA kernels: $($PY -c 'from scalerec.ops._lib import has_cuda_kernels; print(has_cuda_kernels())' 2>&1 | tail -1)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py 2>&1 | tail -3 | tee -a "$LOG"

# ---- 3. SparseGrad on the GPU alone (the fits paused)
say "pausing the fits: $(fitpids | tr '\n' ' ')"
fitpids | xargs -r kill -STOP
SG=(--device cuda --model "$MINILM" --steps 300 --batch-size 32 --max-length 64)
timeout 200 $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad --seeds 3 \
  --out "$R/sparsegrad.json" 2>&1 | grep -v Warning | tail -7 | cut -c1-400 | tee -a "$LOG"
timeout 80 $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad --seeds 1 --grad-dtype float32 \
  --out "$R/sparsegrad_f32.json" 2>&1 | grep -v Warning | tail -3 | cut -c1-300 | tee -a "$LOG"
timeout 60 $PY benchmarks/sparsegrad_profile.py --device cuda --model "$MINILM" --steps 20 \
  --out "$R/sparsegrad_profile.json" > "$R/sparsegrad_profile.log" 2>&1
grep -E "^==|ms  x" "$R/sparsegrad_profile.log" | head -40 | cut -c1-160 | tee -a "$LOG"
say "resuming the fits"
fitpids | xargs -r kill -CONT

# ---- 4. the fits run on until the deadline
while [ $(( $(date +%s) - T0 )) -lt $(( DEADLINE - 10 )) ] && [ -n "$(fitpids)" ]; do sleep 5; done
for f in "$R"/*.log; do case $f in *profile*) continue;; esac
  say "$(basename "$f"): $(grep -E '^\[(one-step|ar)\]|Error|error' "$f" | tail -5 | cut -c1-600)"; done
say "done"
tar czf "$OUT/results.tgz" -C "$R" .
cp "$LOG" "$OUT/log.txt"
