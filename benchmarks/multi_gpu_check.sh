#!/usr/bin/env bash
# Issue 5 on a 2-GPU machine: tensor parallelism (correctness, speed, a pair too big for one card),
# then data-parallel generate throughput. Logs under $OUT.
#   bash benchmarks/multi_gpu_check.sh        (repo root; torch, transformers, triton preinstalled)
set -o pipefail
OUT=${OUT:-/tmp/multi_gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv 2>&1 | tee "$OUT/env.txt"
timeout "${TP_TIMEOUT:-330}" torchrun --nproc-per-node 2 benchmarks/tp_check.py ${TP_ARGS:-} \
    2>&1 | tee "$OUT/tp_check.log"
timeout "${DP_TIMEOUT:-300}" python3 benchmarks/bench_data_parallel.py ${DP_ARGS:-} \
    2>&1 | tee "$OUT/bench_data_parallel.log"
