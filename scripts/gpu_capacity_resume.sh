#!/usr/bin/env bash
# The next LLM capacity rungs (issue 8), on a GPU from the latest committed vectors, for one lease. The issue's
# figures are reached (benchmarks/results/llm_capacity.md, Run 25: one-step 128 on passage 575, AR mean 80); these
# extend them: one-step 128 on passages 10 and 267 (127 and 107 / 128 so far) and 160 on passage 575; AR 96 on
# passages 0, 2, 3, 80 on passage 4 and 112 on passage 1. Each rung is a CE fit (lr 0.015, 300 warm-up steps) and
# then, for the texts it leaves short, the margin-loss polish (--polish-steps 400, lr 1e-4: docs/llm.md).
#
#   OUT=dir SMOLLM=file.gguf TEXT=tinyshakespeare.txt [DEADLINE=540] \
#       [OS_RESUME=benchmarks/results/llm_resume_onestep128_latest.pt] \
#       bash scripts/gpu_capacity_resume.sh
#
# Five fits run side by side, ONE process each with its texts batched, float32 with TF32 off (the vectors must also
# decode on a CPU). The fitting step is captured in a CUDA graph (FitConfig.step_mode "auto"): ~17 ms a step alone
# on an H200, 33-57 ms each with three beside each other (Run 19). Every fit saves its best vectors every 500 steps
# and is stopped at DEADLINE seconds; everything lands in ONE archive, $OUT/results.tgz (the device tool returns at
# most 8 files a call), with log.txt beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?} ; mkdir -p "$OUT"
R=/tmp/cap_results ; mkdir -p "$R"
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
OS_RESUME=${OS_RESUME:-benchmarks/results/llm_resume_onestep128_latest.pt}  # one-step 128: Runs 19 and 20
RES=benchmarks/results
T0=$(date +%s)
LOG=$R/log.txt
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
say "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>&1); torch $($PY -c 'import torch; print(torch.__version__)')"

cap() {  # name, args...
  local name=$1; shift
  OMP_NUM_THREADS=1 timeout $(( $(left) - 15 )) $PY benchmarks/llm_capacity.py \
    --model "$SMOLLM" --device cuda --dtype float32 --sections capacity --fit lr=0.015 --fit warmup_steps=300 \
    --log-every 500 --save-every 500 --json-out "$R/$name.json" --vectors-out "$R/$name.pt" "$@" > "$R/$name.log" 2>&1 &
  echo $! > "$R/$name.pid"
}
OS_IN=($RES/llm_vectors_onestep64_p10.pt $RES/llm_vectors_onestep64_p267_run17.pt)
cap os128 --modes one-step --text "$TEXT" --passage-ids 10,267 --lengths 128,160 --max-steps 6000 --warm-ladder \
  --polish-steps 400 --fit restart_patience=0 --resume "$OS_RESUME" --vectors-in "${OS_IN[@]}"
cap os160 --modes one-step --text "$TEXT" --passage-ids 575 --lengths 160,192 --max-steps 6000 --warm-ladder \
  --polish-steps 400 --fit restart_patience=0 --vectors-in $RES/llm_vectors_onestep128_p575_run25.pt
cap ar96 --modes ar --passage-ids 0,2,3 --lengths 96,112 --max-steps 6000 --warm-ladder --polish-steps 400 \
  --fit restart_patience=0 --vectors-in $RES/llm_vectors_ar80_run25.pt
cap ar80_p4 --modes ar --passage-ids 4 --lengths 80,96 --max-steps 6000 --warm-ladder --polish-steps 400 \
  --fit restart_patience=0 --vectors-in $RES/llm_vectors_ar64_p4_run25.pt
cap ar112 --modes ar --passage-ids 1 --lengths 112,128 --max-steps 6000 --warm-ladder --polish-steps 400 \
  --fit restart_patience=0 --vectors-in $RES/llm_vectors_ar96_p1_run25.pt
say "five capacity fits started"
fitpids() { for f in "$R"/*.pid; do pgrep -P "$(cat "$f")" || true; done; }
while [ "$(left)" -gt 10 ] && [ -n "$(fitpids)" ]; do sleep 5; done
for f in "$R"/*.log; do
  say "$(basename "$f"): $(grep -E '^\[(one-step|ar)\]|Error|error' "$f" | tail -3 | cut -c1-500)"; done
say "done"
rm -f "$R"/*.pid
tar czf "$OUT/results.tgz" -C "$R" .
cp "$LOG" "$OUT/log.txt"
