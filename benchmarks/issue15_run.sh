#!/usr/bin/env bash
# One device run for issue 15, within one command's time: the fused step's CUDA checks, where the
# fused step's time goes (profile_fused.py), then the public-API matrix (bench_api.py) in the time
# left (DEADLINE seconds from the start; its rows print as they finish). Logs under $OUT.
#   bash benchmarks/issue15_run.sh            (repo root; BENCH_ARGS for bench_api, e.g. --pair 7b;
#                                              PROFILE_CONFIGS / PROFILE_ARGS for profile_fused;
#                                              SKIP_TESTS=1 / SKIP_BENCH=1 leave those out;
#                                              TEST_FILTER: a pytest -k expression for the GPU tests)
set -o pipefail
DEADLINE=${DEADLINE:-585}
source "$(dirname "$0")/device_run.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${SKIP_TESTS:-0}" = 0 ]; then
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu/test_fast_gpu.py ${TEST_FILTER:+-k "$TEST_FILTER"} 2>&1 |
        tee "$OUT/tests_gpu.log" | tail -8
    [ -z "${TEST_FILTER:-}" ] && timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fast_engine.py -k triton_kernels 2>&1 |
        tee "$OUT/tests_kernels.log" | tail -4
    echo "tests done at $(($(date +%s) - START)) s"
fi
if [ -n "${PROFILE_CONFIGS:-}" ]; then
    timeout 90 python3 benchmarks/profile_fused.py --batches 256 --configs "$PROFILE_CONFIGS" ${PROFILE_ARGS:-} 2>&1 |
        grep -v -i warn | tee "$OUT/profile.log" | tail -1
fi
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
echo "bench_api with $(left) s left"
# a fresh Triton cache, so the first sampler's warmup is the cold one a new machine pays
export TRITON_CACHE_DIR=${BENCH_TRITON_CACHE:-$(mktemp -d)}
timeout "$(left)" python3 benchmarks/bench_api.py --max-tokens 128 ${BENCH_ARGS:-} 2>&1 | grep -v -i warn |
    tee "$OUT/bench_api.log" | tail -45
