#!/usr/bin/env bash
# Issue 15: run 1 of session ten (BENCHMARKS.md), rows printed as they finish, logs under $OUT:
# 1. the cold one-off cost with GraphCache's own capture (no allocator flush per graph) against
#    torch.cuda.graph's (one_off.py --torch-graph), a fresh Triton cache each;
# 2. tests/gpu's graph and cut tests (CUDA graphs against eager, the fused cuts on CUDA);
# 3. the fused top-p step at batch 256 with the cut kernels' early return for settled rows against
#    a copy of src/ without it;
# 4. the truncating configurations through generate at batch 256 (SEARCH_BLOCK 256), in the time
#    left.
#   OUT=/tmp/out DEADLINE=560 bash benchmarks/issue15_capture.sh      (repo root)
set -o pipefail
DEADLINE=${DEADLINE:-560}
source "$(dirname "$0")/device_run.sh"

nvidia-smi --query-gpu=name --format=csv,noheader
for flag in "" "--torch-graph --no-calls"; do
    name=$([ -z "$flag" ] && echo own || echo torch_graph)
    env TRITON_CACHE_DIR="$(mktemp -d)" timeout "$(cap 100)" python3 benchmarks/one_off.py $flag \
        >"$OUT/one_off_$name.log" 2>&1
    echo "one_off $name rc=$? $(grep '^{' "$OUT/one_off_$name.log" | tail -1 | cut -c1-700)"
done
timeout "$(cap 100)" python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_fast_gpu.py \
    -k "graphs or pipelined or async or warmup or cuts or refill" \
    >"$OUT/tests_gpu.log" 2>&1
echo "tests_gpu rc=$? $(tail -1 "$OUT/tests_gpu.log")"
variant early_return
variant without triton_cut.py '/# settled: the combine reads nothing/,+1d' \
    triton_cut.py '/# nothing to copy: most rows/,+1d'
for v in early_return without; do
    in_variant $v timeout "$(cap 70)" python3 benchmarks/profile_fused.py --batches 256 --scale 0.6 \
        --configs "kl_symmetry,kl_symmetry+top_p 0.95" --sequence --label $v >"$OUT/fused_$v.log" 2>&1
    echo "$v rc=$? $(tail -1 "$OUT/fused_$v.log" | cut -c1-200)"
done
[ "$(left)" -lt 60 ] && exit 0
timeout "$(left)" python3 benchmarks/bench_api.py --no-first-call --batches 256 --max-tokens 128 --configs \
    "kl_symmetry,kl_symmetry+top_p 0.95,kl_symmetry+top_k 50+top_p 0.9,kl_symmetry+min_p 0.05,kl_symmetry+constraint top_p 0.9" 2>&1 |
    grep '^{' | tee "$OUT/bench_256.log" | cut -c1-260
echo "total $(($(date +%s) - START)) s"
