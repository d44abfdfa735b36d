#!/usr/bin/env bash
# One GPU lease, one run (session of 2026-11-27 11:50): the CUDA tests (the fused SparseGrad step's twins and the
# CUDA-graph fitting step), the fitting step's time in its three modes, SparseGrad's GPU figures with the fused
# optimizer step, and the open LLM capacity rungs resumed with the graph-captured step.
#
#   OUT=dir SMOLLM=file.gguf MINILM=folder TEXT=tinyshakespeare.txt [DEADLINE=480] bash scripts/gpu_session.sh
#
# The extension is built beforehand in the background (`python setup.py build_ext --inplace`, log /tmp/build.log
# ending in BUILD_RC=...). Order: the step-time benchmark (GPU alone), then three capacity fits start (ONE process
# each, texts batched, step_mode "auto" = CUDA graph); the CUDA tests run once the build is done; the fits are paused
# (SIGSTOP) while the SparseGrad benchmarks have the GPU to themselves, then resumed until DEADLINE seconds after
# the start. The fits save their best vectors every 500 steps. Everything lands in $OUT/results.tgz (+ log.txt).
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
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1); torch $($PY -c 'import torch; print(torch.__version__)')"

# ---- 1. the fitting step's time: eager / static / graph (GPU alone; the LLM code needs no extension)
timeout 150 $PY benchmarks/llm_step_time.py --device cuda --model "$SMOLLM" --steps 75 \
  --json-out "$R/llm_step_time.json" > "$R/llm_step_time.log" 2>&1
say "step time: $(grep -E 'ms a step|Error|error' "$R/llm_step_time.log" | tr '\n' ';' | cut -c1-900)"

# ---- 2. the capacity fits (float32, TF32 off: the vectors must also decode on a CPU), resumed
RES=benchmarks/results
cap() {  # name, args...
  local name=$1; shift
  OMP_NUM_THREADS=1 timeout $(( $(left) - 15 )) $PY benchmarks/llm_capacity.py \
    --model "$SMOLLM" --device cuda --dtype float32 --sections capacity --fit restart_patience=0 \
    --log-every 500 --save-every 500 --json-out "$R/$name.json" --vectors-out "$R/$name.pt" "$@" > "$R/$name.log" 2>&1 &
  echo $! > "$R/$name.pid"
}
cap os128 --modes one-step --text "$TEXT" --passage-ids 10,575,267 --lengths 128,160 --max-steps 8000 \
  --fit lr=0.015 --fit warmup_steps=300 --resume $RES/gpu_h100_s13/resume_os128.pt \
  --vectors-in $RES/llm_vectors_onestep64_p10.pt $RES/llm_vectors_onestep128_p575_run17.pt $RES/llm_vectors_onestep64_p267_run17.pt
cap ar80 --modes ar --passage-ids 0,2,3,4 --lengths 80,96 --max-steps 8000 \
  --fit lr=0.015 --fit warmup_steps=300 --resume $RES/gpu_h100_s13/llm_vectors_ar80_p0234_resume.pt \
  --vectors-in $RES/llm_vectors_ar64_p0.pt $RES/llm_vectors_ar64_p2.pt $RES/llm_vectors_ar64_p3.pt $RES/gpu_h100/llm_vectors_ar32_p4.pt
cap ar96 --modes ar --passage-ids 1 --lengths 96,112 --max-steps 8000 \
  --fit lr=0.015 --fit warmup_steps=300 --resume $RES/llm_vectors_ar96_p1_run16.pt \
  --vectors-in $RES/llm_vectors_ar80_p1.pt
say "capacity fits started"
fitpids() { for f in "$R"/*.pid; do pgrep -P "$(cat "$f")" || true; done; }

# ---- 3. the extension (built in the background by the previous call) and the CUDA tests
for _ in $(seq 1 60); do grep -q BUILD_RC /tmp/build.log 2>/dev/null && break; sleep 5; done
say "build: $(grep BUILD_RC /tmp/build.log 2>&1); CUDA kernels: $($PY -c 'from scalerec.ops._lib import has_cuda_kernels; print(has_cuda_kernels())' 2>&1 | tail -1)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_llm_static.py 2>&1 | tail -4 | tee -a "$LOG"

# ---- 4. SparseGrad on the GPU alone (the fits paused)
say "pausing the fits: $(fitpids | tr '\n' ' ')"
fitpids | xargs -r kill -STOP
SG=(--device cuda --model "$MINILM" --steps 300 --batch-size 32 --max-length 64)
timeout 200 $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad --seeds 3 \
  --out "$R/sparsegrad.json" 2>&1 | grep -v Warning | tail -7 | cut -c1-400 | tee -a "$LOG"
timeout 60 $PY benchmarks/sparsegrad_optimizer_step.py --device cuda \
  > "$R/sparsegrad_optimizer_step.log" 2>&1; tail -4 "$R/sparsegrad_optimizer_step.log" | cut -c1-400 | tee -a "$LOG"
timeout 90 $PY benchmarks/sparsegrad_profile.py --device cuda --model "$MINILM" --steps 20 \
  --methods lora,sparsegrad,sparsegrad_unfused --out "$R/sparsegrad_profile.json" > "$R/sparsegrad_profile.log" 2>&1
grep -E "^==|ms  x|optimizer" "$R/sparsegrad_profile.log" | head -40 | cut -c1-160 | tee -a "$LOG"
say "resuming the fits"
fitpids | xargs -r kill -CONT

# ---- 5. the fits run on until the deadline
while [ "$(left)" -gt 10 ] && [ -n "$(fitpids)" ]; do sleep 5; done
for f in "$R"/*.log; do case $f in *profile*|*step*) continue;; esac
  say "$(basename "$f"): $(grep -E '^\[(one-step|ar)\]|Error|error|Warning' "$f" | tail -4 | cut -c1-600)"; done
say "done"
tar czf "$OUT/results.tgz" -C "$R" .
cp "$LOG" "$OUT/log.txt"
