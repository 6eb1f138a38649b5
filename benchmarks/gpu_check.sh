#!/usr/bin/env bash
# One prepared GPU check (about 6 minutes on one H100/H200), run from a checkout of the repository:
#
#   bash benchmarks/gpu_check.sh
#
# 1. uses .venv (or $VENV) if it has a CUDA torch; else creates one with Python 3.11 and
#    `pip install -e '.[dev]'` (torch==2.13.0 is pinned; on a GPU machine pip may resolve the CUDA
#    build of 2.13.0). The venv sees system site-packages, so a preinstalled CUDA torch 2.13.0 is used
#    as is; without network, the install falls back to `--no-deps` and PYTHONPATH.
# 2. prints nvidia-smi and the torch/CUDA versions and attention backends available;
# 3. runs the backend tests (they exercise the CUDA backends when a GPU exists);
# 4. runs the composability curve and the kernel calibration on the GPU in bf16.
#
# flash-attn cannot be pip-installed from a PyPI-only network (it ships as an sdist that needs nvcc
# and a CUDA torch to build; see docker/), so `auto` resolves to torch's own CUDA varlen kernel,
# backend `torch_varlen`. Where flash-attn is installed, `auto` picks it instead.
#
# Every step has its own timeout; a failed step is reported and the later steps still run. The log
# and everything under out/kernels/ are copied to "$OUT" when that variable is set (the device tool
# returns files written there). Exit status: 0 when every step passed, else 1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
LOG_DIR=out/gpu_check
mkdir -p "$LOG_DIR" out/kernels
LOG="$LOG_DIR/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).log"
exec > >(tee -a "$LOG") 2>&1

FAILED=()

copy_out() {
    if [[ -n "${OUT:-}" ]]; then
        mkdir -p "$OUT/kernels"
        cp -f "$LOG" "$OUT/" 2>/dev/null || true
        cp -f out/kernels/* "$OUT/kernels/" 2>/dev/null || true
        echo "copied log and out/kernels/ to $OUT"
    fi
}
trap copy_out EXIT

# step NAME SECONDS CMD...: run CMD under a timeout, record a failure and carry on.
# soft_step: the same without recording (for install attempts that have a fallback).
step() { run_step record "$@"; }
soft_step() { run_step soft "$@"; }
run_step() {
    local mode=$1 name=$2 limit=$3
    shift 3
    echo
    echo "=== [$(date -u +%H:%M:%S)] $name (timeout ${limit}s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - start))s"
    if ((rc != 0)) && [[ $mode == record ]]; then
        FAILED+=("$name (rc=$rc)")
    fi
    return 0
}

has_cuda_torch() {  # $1: python
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

echo "repo: $REPO   commit: $(git rev-parse --short HEAD 2>/dev/null || echo uncommitted)   log: $LOG"
step "nvidia-smi" 30 nvidia-smi

if [[ -x "$VENV/bin/python" ]] && has_cuda_torch "$VENV/bin/python"; then
    echo "using existing $VENV (CUDA torch)"
else
    if [[ -x "$VENV/bin/python" ]]; then
        echo "$VENV has no CUDA torch (a CPU build?); using a separate .venv-gpu"
        VENV=.venv-gpu
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        step "create venv" 60 "$PYTHON" -m venv --system-site-packages "$VENV"
    fi
    if ! "$VENV/bin/python" -c 'import distca, pytest, matplotlib' >/dev/null 2>&1; then
        # Fail fast without network: no retries, short socket timeout.
        soft_step "pip install" 300 "$VENV/bin/python" -m pip install -q --retries 0 --timeout 10 -e '.[dev]'
        if ! "$VENV/bin/python" -c 'import distca' >/dev/null 2>&1; then
            echo "full install failed (no network?); trying --no-deps and PYTHONPATH"
            soft_step "pip install --no-deps" 120 "$VENV/bin/python" -m pip install -q --no-deps \
                --no-build-isolation -e .
        fi
    fi
fi
PY="$VENV/bin/python"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

step "import check" 60 "$PY" -c 'import distca, numpy, pytest, matplotlib, torch'
step "torch info" 60 "$PY" -c '
import torch
from distca.attention import available_backends, resolve_backend
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
    print("backends bf16:", available_backends("cuda", torch.bfloat16))
    print("auto ->", resolve_backend("auto", torch.device("cuda"), torch.bfloat16).name)
else:
    raise SystemExit("no CUDA device visible to torch: the GPU steps below will fail")
'

step "backend tests" 150 "$PY" -m pytest -q tests/test_attention_backends.py
step "composability" 120 "$PY" benchmarks/kernels.py composability --device cuda --dtype bfloat16
step "calibrate" 120 "$PY" benchmarks/kernels.py calibrate --device cuda --dtype bfloat16

echo
if ((${#FAILED[@]})); then
    echo "GPU check: ${#FAILED[@]} step(s) failed: ${FAILED[*]}"
    exit 1
fi
echo "GPU check: all steps passed"
