#!/usr/bin/env bash
# Fast engine on the GPU machine: correctness first, then the decode benchmark. Logs under $OUT.
#   bash benchmarks/gpu_check.sh            (repo root; torch, transformers, triton preinstalled)
# Carries its own pytest wheels in .whl/ when the machine has no pytest.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
if ! python3 -c "import pytest" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=src:/tmp/site
fi
{
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu/test_fast_gpu.py \
    2>&1 | tee "$OUT/tests_gpu.log" | tail -25
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_fast_engine.py -k triton_kernels \
    2>&1 | tee "$OUT/tests_kernels.log" | tail -15
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_decode.py --partial "$OUT/bench_partial.json" ${BENCH_ARGS:-} \
    2>&1 | tee "$OUT/bench.log"
