#!/usr/bin/env bash
# One GPU lease, one run (session of 2026-11-26/27): the LLM capacity rungs that the CPU could not finish, and
# SparseGrad's GPU speed after the sync-free changes, on one machine.
#
#   OUT=dir SMOLLM=file.gguf MINILM=folder [DEADLINE=540] bash scripts/gpu_session.sh
#
# What happened (H100, 2026-11-26): the SparseGrad part ran as planned (benchmarks/results/gpu_h100/), but the
# five fitting processes shared the GPU badly (> 70 ms a step each): of their rungs only AR passage 4 at 32 tokens
# finished. They ran without --log-every, which is now passed. Next time: one process, texts batched.
#
# Timeline: the capacity fits start at once (five processes sharing the GPU); once the extension is built (scripts/gpu_checks.sh step 1, started earlier) the CUDA tests run;
# then the fits are paused (SIGSTOP) while the SparseGrad benchmarks have the GPU to themselves, and resumed
# (SIGCONT) until DEADLINE seconds after the start, when whatever rung is unfinished is stopped (each finished
# rung's JSON and vectors are already on disk). Everything lands in $OUT/results.tgz (+ log.txt).
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
say "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1); torch $($PY -c 'import torch; print(torch.__version__)')"

# ---- 1. the capacity fits (float32, TF32 off: the vectors must also decode on a CPU)
RES=benchmarks/results
cap() {  # name, args...
  local name=$1; shift
  OMP_NUM_THREADS=1 timeout $(( DEADLINE - 15 - ($(date +%s) - T0) )) $PY benchmarks/llm_capacity.py \
    --model "$SMOLLM" --device cuda --dtype float32 --sections capacity --fit restart_patience=0 --log-every 200 \
    --json-out "$R/$name.json" --vectors-out "$R/$name.pt" "$@" > "$R/$name.log" 2>&1 &
  echo $! > "$R/$name.pid"
}
cap onestep_p10_resume --modes one-step --passage-ids 10 --lengths 128,160 --max-steps 4000 \
  --fit lr=0.015 --fit warmup_steps=300 --vectors-in $RES/llm_vectors_onestep64_p10.pt --resume $RES/llm_vectors_onestep128_p10_from64.pt
cap onestep_p1_from96 --modes one-step --passage-ids 1 --lengths 128,160 --max-steps 4000 \
  --vectors-in $RES/llm_vectors_onestep96_p1.pt
cap onestep_ladder --modes one-step --passage-ids 0,2,3,4 --lengths 64,96,128 --max-steps 3000 --warm-ladder
cap ar_from64 --modes ar --passage-ids 0,1,2,3 --lengths 80,96 --max-steps 3000 \
  --vectors-in $RES/llm_vectors_ar64_p0.pt $RES/llm_vectors_ar80_p1.pt $RES/llm_vectors_ar64_p2.pt $RES/llm_vectors_ar64_p3.pt
cap ar_p4_ladder --modes ar --passage-ids 4 --lengths 32,64,80,96 --max-steps 3000 --warm-ladder
say "capacity fits started"
fitpids() { for f in "$R"/*.pid; do pgrep -P "$(cat "$f")" || true; done; }

# ---- 2. the extension (built in the background by the previous call) and the CUDA tests
for _ in $(seq 1 60); do grep -q BUILD_RC /tmp/build.log 2>/dev/null && break; sleep 5; done
say "build: $(grep BUILD_RC /tmp/build.log 2>&1); CUDA kernels: $($PY -c 'from scalerec.ops._lib import has_cuda_kernels; print(has_cuda_kernels())' 2>&1 | tail -1)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py 2>&1 | tail -6 | tee -a "$LOG"

# ---- 3. SparseGrad on the GPU alone (the fits paused)
say "pausing the fits: $(fitpids | tr '\n' ' ')"
fitpids | xargs -r kill -STOP
SG=(--device cuda --model "$MINILM" --steps 300 --batch-size 32 --max-length 64)
timeout 200 $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad --seeds 3 \
  --out "$R/sparsegrad.json" 2>&1 | grep -v Warning | tail -7 | cut -c1-400 | tee -a "$LOG"
timeout 80 $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad --seeds 1 --sparse-state compact \
  --out "$R/sparsegrad_compact.json" 2>&1 | grep -v Warning | tail -3 | cut -c1-300 | tee -a "$LOG"
timeout 90 $PY benchmarks/sparsegrad_profile.py --device cuda --model "$MINILM" --steps 20 \
  --out "$R/sparsegrad_profile.json" > "$R/sparsegrad_profile.log" 2>&1
grep -E "^==|ms  x" "$R/sparsegrad_profile.log" | head -40 | cut -c1-160 | tee -a "$LOG"
say "resuming the fits"
fitpids | xargs -r kill -CONT

# ---- 4. the fits run on until the deadline
while [ $(( $(date +%s) - T0 )) -lt $(( DEADLINE - 10 )) ] && [ -n "$(fitpids)" ]; do sleep 5; done
for f in "$R"/*.log; do case $f in *profile*) continue;; esac
  say "$(basename "$f"): $(grep -E '^\[(one-step|ar)\]|Error|error' "$f" | tail -4 | cut -c1-600)"; done
say "done"
tar czf "$OUT/results.tgz" -C "$R" .
cp "$LOG" "$OUT/log.txt"
