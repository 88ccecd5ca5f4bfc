#!/usr/bin/env bash
# The device call issue 15 still needs (BENCHMARKS.md, session eight), in the order that decides
# most, rows printed as they finish, logs under $OUT:
# 1. the fused top-p step at batch 256 (profile_fused.py) for copies of src/ that differ in one
#    cut-kernel tuning constant each, then generate's kl_symmetry against top-p 0.95 on the best;
# 2. the cold one-off cost with the draw kernels specializing on the batch size (as before
#    d824405) against without (the tree as it is), a fresh Triton cache each;
# 3. the 1.5B + 7B pair at batches 64 and 256, every configuration, in the time left.
#   OUT=/tmp/out DEADLINE=580 bash benchmarks/issue15_next.sh      (repo root; DRY=1: only build
#   the variant trees and list them)
set -o pipefail
START=$(date +%s)
DEADLINE=${DEADLINE:-580}
OUT=${OUT:-/tmp/issue15}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
left() { echo $((DEADLINE - ($(date +%s) - START))); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }

# variant NAME [FILE SED_EXPRESSION]...: a copy of src/ and benchmarks/ with those edits, each
# of which must change its file (a tuning constant renamed upstream fails loudly, not silently)
variant() {
    local name=$1 dir="$WORK/$1"
    shift
    mkdir -p "$dir" && cp -r "$ROOT/src" "$ROOT/benchmarks" "$dir/"
    while [ $# -ge 2 ]; do
        local file="$dir/src/optimal_sampling/engines/fast/$1"
        cp "$file" "$file.orig" && sed -i "$2" "$file"
        if cmp -s "$file" "$file.orig"; then echo "variant $name: '$2' changed nothing in $1" >&2; exit 2; fi
        rm "$file.orig"
        shift 2
    done
}
in_variant() { local name=$1; shift; (cd "$WORK/$name" && PYTHONPATH=src "$@"); }

variant base
variant collect2048 triton_cut.py 's/^COLLECT_BLOCK = 1024/COLLECT_BLOCK = 2048/'
variant collect4096 triton_cut.py 's/^COLLECT_BLOCK = 1024/COLLECT_BLOCK = 4096/'
variant search256 triton_cut.py 's/^SEARCH_BLOCK = 128/SEARCH_BLOCK = 256/'
variant search256w8 triton_cut.py 's/^SEARCH_BLOCK = 128/SEARCH_BLOCK = 256/' \
    cut_search.py '/FIRST=p == 0, \*\*flags/s/num_warps=4/num_warps=8/'
variant draw_specialized triton_draw.py 's/^@triton.jit(do_not_specialize=\["B"\]).*/@triton.jit/'
if [ "${DRY:-0}" = 1 ]; then
    ls "$WORK"
    exit 0
fi

nvidia-smi --query-gpu=name --format=csv,noheader
for v in base collect2048 collect4096 search256 search256w8; do
    [ "$(left)" -lt 30 ] && break
    in_variant $v timeout "$(cap 90)" python3 benchmarks/profile_fused.py --batches 256 --scale 0.6 \
        --configs "kl_symmetry,kl_symmetry+top_p 0.95" --sequence --label $v >"$OUT/fused_$v.log" 2>&1
    echo "$v rc=$? $(tail -1 "$OUT/fused_$v.log" | cut -c1-240)"
done
best=$(python3 - "$OUT" <<'PY'
import glob, json, sys
times = {}
for path in glob.glob(f"{sys.argv[1]}/fused_*.log"):
    try:
        last = json.loads(open(path).read().strip().splitlines()[-1])
        times[last["label"]] = last["ms"]["kl_symmetry+top_p 0.95|256"]
    except (ValueError, KeyError, IndexError):
        continue
print(min(times, key=times.get) if times else "base")
PY
)
echo "fastest top-p step: $best"
in_variant "$best" timeout "$(cap 150)" python3 benchmarks/bench_api.py --no-first-call --batches 256 \
    --max-tokens 128 --configs "kl_symmetry,kl_symmetry+top_p 0.95" 2>&1 | grep '^{' | tee "$OUT/api_$best.log" |
    cut -c1-300

for v in draw_specialized base; do
    [ "$(left)" -lt 60 ] && break
    in_variant $v env TRITON_CACHE_DIR="$(mktemp -d)" timeout "$(cap 90)" python3 benchmarks/one_off.py \
        --no-calls >"$OUT/one_off_$v.log" 2>&1
    echo "one_off $v rc=$? $(tail -1 "$OUT/one_off_$v.log" | cut -c1-400)"
done

[ "$(left)" -lt 120 ] && exit 0
in_variant base timeout "$(left)" python3 benchmarks/weight_floor.py --pair 7b 2>&1 | tail -1
in_variant base timeout "$(left)" python3 benchmarks/bench_api.py --pair 7b --no-first-call --batches 64,256 \
    --max-tokens 128 2>&1 | grep '^{' | tee "$OUT/bench_7b.log" | cut -c1-300
echo "total $(($(date +%s) - START)) s"
