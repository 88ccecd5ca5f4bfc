# Sourced by the device scripts (benchmarks/issue15_*.sh), which set DEADLINE's default first:
# the run's clock (left: seconds to DEADLINE; cap N: N or fewer if less is left), $OUT, and copies
# of src/ and benchmarks/ that differ in edits (variant, in_variant).
START=$(date +%s)
OUT=${OUT:-/tmp/issue15}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
left() { echo $((DEADLINE - ($(date +%s) - START))); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }

# variant NAME [FILE SED_EXPRESSION]...: a copy of src/ and benchmarks/ with those edits (FILE in
# engines/fast/), each of which must change its file (code renamed upstream fails loudly)
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
# dir_of NAME: where a copy runs: the working tree for "tree", else variant NAME's copy
dir_of() { if [ "$1" = tree ]; then echo "$ROOT"; else echo "$WORK/$1"; fi; }
