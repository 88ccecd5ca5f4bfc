#!/usr/bin/env bash
# Install verl 0.9.1 (CPU) into its own virtual environment, with this checkout (editable) beside it.
#
#   bash scripts/setup_verl_env.sh                   # venv at $VERL_VENV, default /tmp/verl-venv
#   VERL_VENV=/opt/verl bash scripts/setup_verl_env.sh
#   "$VERL_VENV/bin/python" -m pytest -m verl tests/test_verl.py
#
# Idempotent: verl is installed once (about 85 s from scratch on this machine: torch CPU, verl's `verl-core`
# extra, which is what makes verl.experimental.agent_loop importable without vLLM/SGLang); later
# runs only check it (seconds) and re-install this package if the venv points at another checkout.
# Why a separate venv: verl 0.9.1 pins transformers < 5.11, below this project's dev venv. Our
# package needs only torch, transformers, safetensors, tokenizers, numpy and tqdm, which verl's
# install already brings at versions we accept, so it goes in with --no-deps (nothing of verl's
# is moved).
set -euo pipefail

VENV="${VERL_VENV:-/tmp/verl-venv}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VERL_SPEC="verl[verl-core]==0.9.1"
TORCH_SPEC="torch==2.13.0"
STAMP="$VENV/.verl-0.9.1-ready"

pip_quiet() {  # pip without the per-package notes about this machine's local indexes
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}

verl_ready() {
    [ -f "$STAMP" ] && "$VENV/bin/python" -c '
import importlib.metadata as m
assert m.version("verl") == "0.9.1"
import verl.experimental.agent_loop.agent_loop' 2>/dev/null
}

package_ready() {  # this checkout is the one imported, and it imports next to verl's transformers
    ROOT="$ROOT" "$VENV/bin/python" - 2>/dev/null <<'PY'
import importlib.util, os, pathlib
spec = importlib.util.find_spec("optimal_sampling")
assert pathlib.Path(spec.origin).resolve().is_relative_to(pathlib.Path(os.environ["ROOT"]).resolve())
import optimal_sampling.integrations.verl  # registers the agent loop
from optimal_sampling import OptimalSampler  # noqa: F401
PY
}

start=$(date +%s)
if ! verl_ready; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    pip_quiet install -q "$TORCH_SPEC" "$VERL_SPEC" "pytest>=8" "httpx>=0.27"
    touch "$STAMP"
fi
if ! package_ready; then
    pip_quiet install -q --no-deps -e "$ROOT"
    package_ready || {
        echo "optimal_sampling in $VENV is not $ROOT, or does not import next to verl" >&2
        exit 1
    }
fi
echo "verl venv ready: $VENV ($(( $(date +%s) - start )) s)"
