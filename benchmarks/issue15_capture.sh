#!/usr/bin/env bash
# Issue 15's second device call of session nine, rows printed as they finish, logs under $OUT:
# 1. the cold one-off cost with GraphCache's own capture (no allocator flush per graph) against
#    torch.cuda.graph's (one_off.py --torch-graph), a fresh Triton cache each;
# 2. the fused step against the torch step on CUDA (tests/gpu), for the capture change;
# 3. every configuration through generate at batch 256 (SEARCH_BLOCK 256), in the time left.
#   OUT=/tmp/out DEADLINE=560 bash benchmarks/issue15_capture.sh      (repo root)
set -o pipefail
START=$(date +%s)
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/issue15}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
left() { echo $((DEADLINE - ($(date +%s) - START))); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }

nvidia-smi --query-gpu=name --format=csv,noheader
for flag in "" --torch-graph; do
    name=${flag:-own}
    env TRITON_CACHE_DIR="$(mktemp -d)" timeout "$(cap 100)" python3 benchmarks/one_off.py $flag \
        >"$OUT/one_off_${name#--}.log" 2>&1
    echo "one_off $name rc=$? $(grep '^{' "$OUT/one_off_${name#--}.log" | tail -1 | cut -c1-700)"
done
timeout "$(cap 170)" python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu/test_fast_gpu.py \
    >"$OUT/tests_gpu.log" 2>&1
echo "tests_gpu rc=$? $(tail -1 "$OUT/tests_gpu.log")"
[ "$(left)" -lt 60 ] && exit 0
timeout "$(left)" python3 benchmarks/bench_api.py --no-first-call --batches 256 --max-tokens 128 2>&1 |
    grep '^{' | tee "$OUT/bench_256.log" | cut -c1-260
echo "total $(($(date +%s) - START)) s"
