#!/usr/bin/env bash
# Session eleven's device run for issue 15: pass 1 of the cut search summing relative to a fixed
# reference (FIXED_REF) against the running-max pass it replaces (variant "online"), in one
# command: the cut tests on CUDA, the fused step's GPU time for both (profile_fused.py), then the
# public API at batch 256 for both. Logs under $OUT.
#   OUT=$OUT bash benchmarks/issue15_fixed_ref.sh
set -o pipefail
DEADLINE=${DEADLINE:-580}
source "$(dirname "$0")/device_run.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
variant online cut_search.py 's/FIXED_REF=fixed_ref and p == 0/FIXED_REF=False/'
timeout 150 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu/test_fast_gpu.py \
    -k "cuts or decode_and_sample" 2>&1 | tee "$OUT/tests_gpu.log" | tail -4
echo "tests done at $(($(date +%s) - START)) s"
CONFIGS="kl_symmetry,kl_symmetry+top_p 0.95,kl_symmetry+top_k 50+top_p 0.9,kl_symmetry+min_p 0.05,kl_symmetry+constraint top_p 0.9"
for v in tree online; do
    (cd "$(dir_of $v)" && timeout "$(cap 70)" python3 benchmarks/profile_fused.py --batches 64,256 --scale 0.6 --no-profile \
        --configs "$CONFIGS" --label "$v") 2>&1 | grep -v -i warn | tee "$OUT/profile_$v.log" | tail -1
done
timeout "$(cap 40)" python3 benchmarks/profile_fused.py --batches 256 --scale 0.6 --sequence \
    --configs "kl_symmetry+top_p 0.95" --label sequence 2>&1 | grep -v -i warn > "$OUT/sequence.log"
echo "profiles done at $(($(date +%s) - START)) s"
API="kl_symmetry,kl_symmetry+top_p 0.95,kl_symmetry+top_k 50+top_p 0.9,kl_symmetry+constraint top_p 0.9"
for v in tree online; do
    echo "bench_api $v with $(left) s left"
    (cd "$(dir_of $v)" && timeout "$(cap 150)" python3 benchmarks/bench_api.py --no-first-call --batches 256 \
        --max-tokens 128 --configs "$API") 2>&1 | grep -v -i warn | tee "$OUT/bench_api_$v.log" | tail -8
done
