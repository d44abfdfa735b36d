#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU, a CUDA build of torch and nvcc:
#   1. build the extension with its CUDA kernels (csrc/cuda) — skipped when scalerec/_C*.so exists (REBUILD=1 forces it);
#   2. the CUDA kernels against the pure-PyTorch references (tests/test_cuda_ops.py) and the CUDA-graph fitting step
#      against the uncaptured one (tests/test_llm_static.py);
#   3. SparseGrad vs LoRA on the GPU: MiniLM-L6 on SST-2 (benchmarks/sparsegrad_sst2.py --device cuda);
#   4. the LLM capacity ladders on the GPU (benchmarks/llm_capacity.py): one-step, AR and shared m, as three
#      processes sharing the GPU (per-text seconds are therefore those of a shared GPU), after the fitting step's
#      time in its three modes (benchmarks/llm_step_time.py). The eager step was launch-bound (0.1 s a step alone on
#      an H100); the default step mode on CUDA captures it in a CUDA graph (16-18 ms a step for 3-4 texts of 80-128
#      tokens on an H200; three processes side by side 33-57 ms each). The logs show s a step (--log-every).
#
#   OUT=gpu_out [MINILM=model_folder] [SMOLLM=file.gguf] [SKIP="sparsegrad llm"] [LLM_WARM=1] bash scripts/gpu_checks.sh
#
# LLM_WARM=1 starts each capacity rung from the rung below's vectors (llm_capacity.py --warm-ladder).
#
# Everything lands in $OUT: log.txt, sparsegrad.json, llm_step_time.json, cap_{one,ar,shared}.{json,log} (the build log: $BUILD_LOG).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$OUT/log.txt
SKIP=${SKIP:-}
MINILM=${MINILM:-minilm}
SMOLLM=${SMOLLM:-smollm2}
LLM_TIMEOUT=${LLM_TIMEOUT:-300}
LLM_STEPS=${LLM_STEPS:-3000}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
say "torch: $($PY -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)' 2>&1)"

# 1. build (in place; TORCH_CUDA_ARCH_LIST defaults to the visible GPU's architecture)
if ! ls scalerec/_C*.so >/dev/null 2>&1 || [ -n "${REBUILD:-}" ]; then
  say "building the extension with CUDA"
  t0=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace >"${BUILD_LOG:=/tmp/scalerec_build.log}" 2>&1 || { say "BUILD FAILED"; tail -40 "$BUILD_LOG" | tee -a "$LOG"; }
  say "build: $(( $(date +%s) - t0 )) s"
fi
say "CUDA kernels registered: $($PY -c 'from scalerec.ops._lib import has_cuda_kernels; print(has_cuda_kernels())' 2>&1)"

# 2. CUDA tests
say "pytest tests/test_cuda_ops.py tests/test_llm_static.py"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_ops.py tests/test_llm_static.py 2>&1 | tail -25 | tee -a "$LOG"

# 3. SparseGrad vs LoRA on the GPU (3 seeds; MeProp and full FT at seed 0)
if [[ " $SKIP " != *" sparsegrad "* ]]; then
  say "sparsegrad_sst2 on cuda"
  timeout ${SG_TIMEOUT:-200} $PY benchmarks/sparsegrad_sst2.py --device cuda --model "$MINILM" --methods lora,sparsegrad \
    --seeds ${SG_SEEDS:-3} --steps ${SG_STEPS:-300} --batch-size 32 --max-length 64 --out "$OUT/sparsegrad.json" \
    2>&1 | grep -v Warning | tail -8 | tee -a "$LOG"
  # the optimizer step's host cost, fused vs its Python reference, and where the step goes (2026-11-27 addition)
  timeout 120 $PY benchmarks/sparsegrad_optimizer_step.py --device cuda 2>&1 | grep -v Warning | tail -5 | tee -a "$LOG"
  timeout 150 $PY benchmarks/sparsegrad_profile.py --device cuda --model "$MINILM" --steps 20 \
    --methods lora,sparsegrad,sparsegrad_unfused --out "$OUT/sparsegrad_profile.json" 2>&1 | grep "^==" | tee -a "$LOG"
fi

# 4. LLM capacity ladders (restarts off: they re-initialise long fits before they converge; docs/llm.md)
if [[ " $SKIP " != *" llm "* ]]; then
  timeout 200 $PY benchmarks/llm_step_time.py --device cuda --model "$SMOLLM" --steps 75 \
    --json-out "$OUT/llm_step_time.json" 2>&1 | grep "ms a step" | tee -a "$LOG"
  say "llm_capacity: one-step, ar, shared-m in parallel (timeout ${LLM_TIMEOUT}s each)"
  common=(--model "$SMOLLM" --device cuda --dtype float32 --tf32 --sections capacity --passages 5
          --max-steps "$LLM_STEPS" --fit restart_patience=0 --log-every 200)
  [ -n "${LLM_WARM:-}" ] && common+=(--warm-ladder)
  timeout "$LLM_TIMEOUT" $PY benchmarks/llm_capacity.py "${common[@]}" --modes one-step --lengths ${ONE_LENGTHS:-64,128,192,256} \
    --json-out "$OUT/cap_one.json" >"$OUT/cap_one.log" 2>&1 &
  timeout "$LLM_TIMEOUT" $PY benchmarks/llm_capacity.py "${common[@]}" --modes ar --lengths ${AR_LENGTHS:-32,64,80,96,128} \
    --json-out "$OUT/cap_ar.json" >"$OUT/cap_ar.log" 2>&1 &
  timeout "$LLM_TIMEOUT" $PY benchmarks/llm_capacity.py "${common[@]}" --modes shared-m --lengths ${SHARED_LENGTHS:-16,32,45,64} \
    --shared-corpus ${SHARED_CORPUS:-64} --shared-tokens ${SHARED_TOKENS:-32} --shared-batch 64 \
    --shared-steps ${SHARED_STEPS:-2000} --json-out "$OUT/cap_shared.json" >"$OUT/cap_shared.log" 2>&1 &
  wait
  for f in one ar shared; do say "cap_$f: $(grep -E '^\[|Error|error' "$OUT/cap_$f.log" | tail -8)"; done
fi
say "done"
