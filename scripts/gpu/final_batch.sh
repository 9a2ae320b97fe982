#!/usr/bin/env bash
# The end-of-session GPU batch (H100 host, bundle extracted): every GPU test and every benchmark except
# the GEMM sweep, each under its own time limit so one failure cannot eat the call. Results under $OUT:
#   pytest_gpu.log, gemm_h100.json, shared_expert_h100.json, scales_h100.json, attention_h100.json,
#   moe_h100.json, vllm_apply_graph.json, gpu_notebooks.tar.gz (full-size notebooks run on the GPU)
# Usage there: source /tmp/site/env.sh && NVFP4LIB_COMMIT=<sha> bash scripts/gpu/final_batch.sh [parts...]
# parts (default all but notebooks): tests gemm expert scales attention moe vllm notebooks; tests-a / tests-b: the
# suite in two halves (pytest_gpu_a.log, pytest_gpu_b.log), for calls that must stay under 10 minutes
# Env overrides: TESTS_LIMIT, ATTN_ARGS / ATTN_LIMIT, MOE_ARGS / MOE_LIMIT (extra CLI flags, time limits).
set -uo pipefail
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1  # absolute: notebook kernels run in notebooks/
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
parts=${*:-tests gemm expert scales attention moe vllm}
summary=()
# the GPU suite in two halves: the whole ran past 300 s on an H100 at ede0efe (444 tests done by then; halves not timed yet)
TESTS_A="tests/test_[a-f]*.py tests/test_gemm.py tests/test_gemm_gpu.py"
TESTS_B="tests/test_gemm_wgmma.py tests/test_[h-z]*.py"
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@"; local rc=$?
  summary+=("$(printf '%-10s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
}
for part in $parts; do
  case $part in
    tests)     step tests "${TESTS_LIMIT:-480}" bash -c "python3 -m pytest -q -rs -p no:cacheprovider tests > $OUT/pytest_gpu.log 2>&1; rc=\$?; tail -15 $OUT/pytest_gpu.log; exit \$rc" ;;
    tests-a)   step tests-a "${TESTS_LIMIT:-300}" bash -c "python3 -m pytest -q -rs -p no:cacheprovider $TESTS_A > $OUT/pytest_gpu_a.log 2>&1; rc=\$?; tail -15 $OUT/pytest_gpu_a.log; exit \$rc" ;;
    tests-b)   step tests-b "${TESTS_LIMIT:-300}" bash -c "python3 -m pytest -q -rs -p no:cacheprovider $TESTS_B > $OUT/pytest_gpu_b.log 2>&1; rc=\$?; tail -15 $OUT/pytest_gpu_b.log; exit \$rc" ;;
    gemm)      step gemm 240 python3 scripts/gpu/gemm_check.py --out "$OUT/gemm_h100.json" ;;
    expert)    step expert 120 python3 scripts/gpu/shared_expert_check.py ;;
    scales)    step scales 150 python3 scripts/gpu/scales_check.py ;;
    attention) step attention "${ATTN_LIMIT:-240}" python3 -m nvfp4lib.bench attention ${ATTN_ARGS:-} --out "$OUT/attention_h100.json" ;;
    moe)       step moe "${MOE_LIMIT:-240}" python3 -m nvfp4lib.bench moe ${MOE_ARGS:-} --out "$OUT/moe_h100.json" ;;
    vllm)      step vllm 120 python3 scripts/gpu/vllm_apply_graph.py ;;
    notebooks) step notebooks 420 bash -c "python3 scripts/run_notebooks.py --out /tmp/gpu_reports -p device cuda -p full_size True notebooks/[0-9]*.ipynb; rc=\$?; tar czf $OUT/gpu_notebooks.tar.gz -C /tmp gpu_reports; exit \$rc" ;;
    *) echo "unknown part $part" ;;
  esac
done
echo; echo "=== summary"; printf '%s\n' "${summary[@]}"
