#!/usr/bin/env bash
# Session eleven's device runs for issue 15: the cut kernels' variants side by side in one command
# (the fused step's GPU time and each kernel of a top-p step, profile_fused.py --sequence), after
# the cut tests on CUDA for the working tree. VARIANT_FILES: a directory of whole triton_cut.py
# versions (NAME.py each); SED_VARIANTS: "NAME=BASE:SED_EXPRESSION" entries, ';'-separated, each a
# copy of BASE's src/ (tree: the working tree) with the expression applied to triton_cut.py and
# cut_search.py.
#   OUT=$OUT VARIANT_FILES=benchmarks/_tmp_variants bash benchmarks/issue15_variants.sh
set -o pipefail
DEADLINE=${DEADLINE:-580}
source "$(dirname "$0")/device_run.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
CUT=src/optimal_sampling/engines/fast/triton_cut.py SEARCH=src/optimal_sampling/engines/fast/cut_search.py
names=(tree)
for f in "${VARIANT_FILES:-/nonexistent}"/*.py; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .py)
    variant "$name" && cp "$f" "$WORK/$name/$CUT" && names+=("$name")
done
IFS=';' read -ra seds <<< "${SED_VARIANTS:-}"
for entry in "${seds[@]}"; do
    name=${entry%%=*} rest=${entry#*=}
    from=${rest%%:*} expr=${rest#*:}
    fromdir=$(dir_of "$from")
    variant "$name" && cp -r "$fromdir/src/." "$WORK/$name/src/" && sed -i "$expr" "$WORK/$name/$CUT" "$WORK/$name/$SEARCH" &&
        ! diff -rq "$fromdir/src" "$WORK/$name/src" > /dev/null && names+=("$name") || echo "variant $name: no change"
done
if [ "${SKIP_TESTS:-0}" = 0 ]; then
    timeout 150 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/gpu/test_fast_gpu.py -k "cuts" 2>&1 |
        tee "$OUT/tests_gpu.log" | tail -3
    echo "tests done at $(($(date +%s) - START)) s"
fi
CONFIGS=${PROFILE_CONFIGS:-"kl_symmetry,kl_symmetry+top_p 0.95,kl_symmetry+top_k 50+top_p 0.9,kl_symmetry+constraint top_p 0.9"}
for v in "${names[@]}"; do
    (cd "$(dir_of "$v")" && timeout "$(cap 80)" python3 benchmarks/profile_fused.py --batches 256 --scale 0.6 --sequence \
        --configs "$CONFIGS" --label "$v") 2>&1 | grep -v -i warn > "$OUT/profile_$v.log"
    tail -1 "$OUT/profile_$v.log" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['label'], d['ms'])"
done
echo "done at $(($(date +%s) - START)) s"
