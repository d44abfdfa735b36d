#!/usr/bin/env bash
# One GPU lease for issue 6 (written 2026-11-28 for the next lease): build, the CUDA tests (now with the radix-select
# top-k, the grouped lazy-Adam update), then SparseGrad's GPU figures against LoRA: the profile (ms and kernel launches
# per step, by region and operator) with the new paths and with the old ones (SCALEREC_SPARSEGRAD_SELECT=torch,
# SCALEREC_SPARSEGRAD_LAZY_ADAM=generic) in the same lease, and the 3-seed benchmark (steps/s, GPU peak memory, dev
# accuracy). A new path whose CUDA tests fail is replaced by the old one for the measurements.
#
#   here:    .venv/bin/python scripts/gpu_stage.py                    # .stage/minilm (float16 weights, 44 MiB)
#   one call (carry .stage):  OUT=$OUT [DEADLINE=560] bash scripts/gpu_session.sh
#            (builds the extension in the foreground, unpacks the model, then runs the stages while time is left)
#   or two:  call 1 (carry .stage): MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1;
#            echo BUILD_RC=$? >> /tmp/build.log; python3 scripts/gpu_stage.py --unpack /tmp/minilm
#            call 2, within the 30 s the machine stays warm (carry .stage again, in case it is a fresh machine):
#            OUT=$OUT MINILM=/tmp/minilm [DEADLINE=540] bash scripts/gpu_session.sh
#   (Not `nohup ... &` in call 1: the device kills what a call leaves running when it returns, unless setsid.)
#
# Everything lands in $OUT: log.txt and results.tgz (the JSON and logs), written again after each stage.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?} ; mkdir -p "$OUT"
R=/tmp/gpu_results ; mkdir -p "$R"
PY=${PYTHON:-python3}
MINILM=${MINILM:-/tmp/minilm}
DEADLINE=${DEADLINE:-540}
T0=$(date +%s)
LOG=$R/log.txt
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
finish() { tar czf "$OUT/results.tgz" -C "$R" . ; cp "$LOG" "$OUT/log.txt"; }
trap finish EXIT
say "gpu: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1); torch $($PY -c 'import torch; print(torch.__version__)')"
# the extension: built here unless an earlier call finished a build (a log without BUILD_RC is a killed build)
grep -q BUILD_RC /tmp/build.log 2>/dev/null || { MAX_JOBS=16 $PY setup.py build_ext --inplace > /tmp/build.log 2>&1; echo "BUILD_RC=$?" >> /tmp/build.log; }
[ -f "$MINILM/model.safetensors" ] || $PY scripts/gpu_stage.py --unpack "$MINILM" 2>&1 | tail -1 | tee -a "$LOG"

# ---- 1. the extension and the CUDA tests: each new path in a pytest process of its own, so that a crash or a
# device-side assert (which poisons the CUDA context for every later test) is pinned on its path; a path whose
# tests fail or die is replaced by the old one for the measurements
say "build: $(grep BUILD_RC /tmp/build.log 2>&1); CUDA kernels: $($PY -c 'from scalerec.ops._lib import has_cuda_kernels; print(has_cuda_kernels())' 2>&1 | tail -1)"
grep -iE "error" /tmp/build.log | head -5 | tee -a "$LOG"
cuda_tests() {  # name, pytest -k expression: "ok", or why not
  timeout 100 $PY -m pytest -q -p no:cacheprovider -rf tests/test_cuda_ops.py -k "$2" > "$R/cuda_tests_$1.log" 2>&1
  local rc=$?
  grep -E "^FAILED|[0-9]+ (passed|failed|skipped)" "$R/cuda_tests_$1.log" | cut -c1-200 | sed "s/^/[$1] /" | tee -a "$LOG" >&2
  if ! grep -qE "[0-9]+ (passed|failed|skipped)" "$R/cuda_tests_$1.log"; then
    echo "died (rc $rc): $(grep -m1 -E "Fatal Python error|Segmentation|File .*test_cuda_ops" "$R/cuda_tests_$1.log" | cut -c1-120)"
  elif [ $rc -ne 0 ]; then echo "failed"
  elif ! grep -qE "[0-9]+ passed" "$R/cuda_tests_$1.log"; then echo "skipped (no CUDA kernels?)"
  else echo "ok"; fi
}
# the new paths' own cases only: the generic-loop case of the grouped test and the radix-vs-torch switch test
# compare against an old path, so their failure alone says nothing against the new one
SELECT=$(cuda_tests radix "radix_select")
LAZY=$(cuda_tests grouped "grouped_lazy_adam and not generic")
COMPACT=$(cuda_tests compact "compact")
REST=$(cuda_tests rest "not radix_select and not grouped_lazy_adam and not compact")
say "CUDA tests: radix select $SELECT; grouped lazy Adam $LAZY; compact state $COMPACT; the others $REST"
[ "$SELECT" = ok ] || { export SCALEREC_SPARSEGRAD_SELECT=torch; say "radix select not ok: at::topk used"; }
[ "$LAZY" = ok ] || { export SCALEREC_SPARSEGRAD_LAZY_ADAM=generic; say "grouped lazy Adam not ok: generic loop used"; }
STATE=auto  # the compact lazy-Adam state (bitmap merge, csrc/cuda/sparsegrad_compact_merge.cu); dense if not ok
[ "$COMPACT" = ok ] || { STATE=dense; say "compact state not ok: dense lazy-Adam state used"; }
finish

# ---- 2. where the step goes: the new paths (radix select, grouped lazy Adam) against the old ones, same lease
P=(benchmarks/sparsegrad_profile.py --device cuda --model "$MINILM" --steps 20 --sparse-state $STATE)
if [ "$(left)" -ge 330 ]; then  # (the benchmark below needs ~240 s)
  timeout 90 $PY "${P[@]}" --methods lora,sparsegrad --out "$R/profile_radix.json" > "$R/profile_radix.log" 2>&1
  SCALEREC_SPARSEGRAD_SELECT=torch SCALEREC_SPARSEGRAD_LAZY_ADAM=generic timeout 60 $PY "${P[@]}" --methods sparsegrad \
    --out "$R/profile_torch_topk.json" > "$R/profile_torch_topk.log" 2>&1
  for f in radix torch_topk; do say "profile ($f):"; grep -E "^==|ms  x" "$R/profile_$f.log" | head -18 | cut -c1-160 | tee -a "$LOG"; done
else
  say "profile skipped: $(left) s left"
fi
finish

# ---- 3. the benchmark: 3 seeds, 300 steps, batch 32 x 64 (steps/s, GPU peak memory, dev accuracy)
SG=(--device cuda --model "$MINILM" --steps 300 --batch-size 32 --max-length 64 --sparse-state $STATE)
B=$(left)
if [ "$B" -ge 60 ]; then
  timeout $(( B > 240 ? 240 : B - 10 )) $PY benchmarks/sparsegrad_sst2.py "${SG[@]}" --methods lora,sparsegrad \
    --seeds 3 --out "$R/sparsegrad.json" 2>&1 | grep -v Warning | tail -7 | cut -c1-400 | tee -a "$LOG"
else
  say "benchmark skipped: $B s left"
fi
say "done"
