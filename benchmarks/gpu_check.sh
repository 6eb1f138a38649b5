#!/usr/bin/env bash
# One prepared GPU check (about 5-7 minutes on one H100/H200, capped at DISTCA_GPU_DEADLINE_S, under 8), run
# from a checkout of the repository:
#
#   bash benchmarks/gpu_check.sh
#
# Python: on a machine whose system python3 already has a CUDA torch (a GPU box without network),
# that python3 is used directly with PYTHONPATH=<repo> — no venv is created. The same with
# DISTCA_GPU_NO_VENV=1 anywhere. Otherwise .venv (or $VENV) when it has a CUDA torch, else a venv is
# created with `pip install -e '.[dev]'` (falling back to python3 + PYTHONPATH when pip cannot install).
# If a folder .whl/ holds wheels and zmq, deepspeed or pydantic does not import, they are installed with
# `pip install --no-index --no-deps --target /tmp/site` and /tmp/site goes on PYTHONPATH: what
# `import distca.train.trainer` and a training run need beyond the GPU image (which has torch, numpy, msgpack,
# pyyaml, psutil, py-cpuinfo, ninja, einops, tqdm and tensorboard). Build the folder (about 6 MB: deepspeed
# 2.2, pydantic-core 2.3, pyzmq 0.9, the rest small) where pip reaches PyPI, for the machine's Python 3.12:
#
#   mkdir -p .whl && echo /.whl/ >> .git/info/exclude
#   DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8  # pure Python
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl pyzmq==27.3.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0
#
# (`pip wheel --no-deps` builds deepspeed's sdist into one py3-none-any wheel without compiling any op; the
# others are binary or pinned wheels for 3.12, so `pip download` fetches them). Keep one version of each.
#
# Steps, in priority order, each under its own timeout (a failed step is reported and the later steps
# still run; steps that would start past the deadline are skipped, so the whole script ends within
# DISTCA_GPU_DEADLINE_S seconds, default 470):
#   1. nvidia-smi; torch/CUDA versions, attention backends, and a backend check (tiny GQA case, full
#      causal and windowed, against fp64 reference; the private varlen op schemas) -> probe.json
#   2. kernel calibration, bf16:  benchmarks/kernels.py calibrate     -> kernels/calibration-*.json
#   3. one training step of the Llama-3-8B shape (2 layers, 32K tokens), local vs CAD attention with the
#      attention server on the same GPU, plus linear/attention/matmul calibration numbers
#      (benchmarks/gpu_step.py, given the table of step 2)          -> gpu_step.json
#   4. training on one GPU through the trainer (no Ray): `distca.train.torchrun` in a world of 1 with
#      configs/llama3-8b-1gpu.yaml (8 layers of the 8B shape, 64K tokens per step, bf16), core attention
#      `local` and `cad` on the in-place data plane; tokens/s, MFU, peak GPU memory of both and the
#      CAD/local tokens/s ratio (benchmarks/gpu_train.py)         -> gpu_train.json
#   5. the composability curve (paper Fig. 5), bf16                 -> kernels/composability-*.{json,png}
#   6. the device tests: pytest --noconftest tests/test_cad_device.py tests/test_train_cuda.py (the CAD path
#      on CUDA; NCCL training of a tiny model, fused AdamW, fp32 master weights; DISTCA_GPU_TESTS=0 skips them)
#   7. only with DISTCA_GPU_BACKEND_TESTS=1: tests/test_attention_backends.py (needs hypothesis)
# Kernel steps run through `benchmarks/gpu_step.py kernels ...`, which checks the attention backend first
# (the library's own backend: torch's varlen kernel is called by argument name, so its private op's
# changing argument lists need no patch; the op schemas are recorded in the log and in probe.json).
#
# flash-attn cannot be pip-installed from a PyPI-only network (it ships as an sdist that needs nvcc
# and a CUDA torch to build; see docker/), so `auto` resolves to torch's own CUDA varlen kernel,
# backend `torch_varlen`. Where flash-attn is installed, `auto` picks it instead.
#
# Results go to out/gpu_check/ and, when $OUT is set, are copied there after every step (at most 8
# files: the log, probe.json, gpu_step.json, gpu_train.json and kernels/ with 4 files).
#
# DISTCA_GPU_CHECK_CPU=1: a dry run of the same plumbing on the CPU with tiny sizes (any machine; step 4
# trains a tiny model of the same config on the CPU).
#
# Exit status: 0 when every step passed, else 1.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
CPU_MODE=${DISTCA_GPU_CHECK_CPU:-0}
DEADLINE=${DISTCA_GPU_DEADLINE_S:-470}
VENV=${VENV:-.venv}
RESULTS=out/gpu_check
KDIR=$RESULTS/kernels
TDIR=$RESULTS/train
rm -rf "$KDIR" "$TDIR" "$RESULTS/probe.json" "$RESULTS/gpu_step.json"
mkdir -p "$KDIR"
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

if [[ $CPU_MODE == 1 ]]; then DEV=cpu; DT=float32; else DEV=cuda; DT=bfloat16; fi

FAILED=()
SKIPPED=()

copy_out() {
    [[ -n "${OUT:-}" ]] || return 0
    mkdir -p "$OUT/kernels"
    cp -f "$LOG" "$OUT/gpu_check.log" 2>/dev/null || true
    cp -f "$RESULTS/probe.json" "$OUT/" 2>/dev/null || true
    cp -f "$RESULTS/gpu_step.json" "$OUT/" 2>/dev/null || true
    cp -f "$TDIR/gpu_train.json" "$OUT/" 2>/dev/null || true
    local f
    for f in "$KDIR"/calibration-"$DEV"-"$DT".json "$KDIR"/calibration-"$DEV"-"$DT".run.json \
             "$KDIR"/composability-*-"$DEV"-"$DT".json "$KDIR"/composability-*-"$DEV"-"$DT".png; do
        [[ -f $f ]] && cp -f "$f" "$OUT/kernels/"
    done
    return 0
}
trap copy_out EXIT
trap 'echo "=== interrupted"; exit 143' TERM INT

# step NAME SECONDS CMD...: run CMD under a timeout (cut to what is left before the deadline), record a
# failure and carry on. soft_step: the same without recording (install attempts that have a fallback).
step() { run_step record "$@"; }
soft_step() { run_step soft "$@"; }
run_step() {
    local mode=$1 name=$2 limit=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    echo
    if ((left < 15)); then
        echo "=== [$(date -u +%H:%M:%S)] $name: skipped, ${SECONDS}s of the ${DEADLINE}s deadline used"
        [[ $mode == record ]] && SKIPPED+=("$name")
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "=== [$(date -u +%H:%M:%S)] $name (timeout ${limit}s, at ${SECONDS}s): $*"
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - start))s"
    if ((rc != 0)) && [[ $mode == record ]]; then
        FAILED+=("$name (rc=$rc)")
    fi
    copy_out
    return 0
}

has_cuda_torch() {  # $1: python
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

echo "repo: $REPO   commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)   mode: $DEV/$DT" \
     "  deadline: ${DEADLINE}s   log: $LOG"

# -- python --------------------------------------------------------------------------------------
if [[ $CPU_MODE == 1 ]]; then
    if [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"; else PY=python3; fi
elif [[ ${DISTCA_GPU_NO_VENV:-0} == 1 ]]; then
    PY=python3
elif [[ -x "$VENV/bin/python" ]] && has_cuda_torch "$VENV/bin/python"; then
    PY="$VENV/bin/python"
elif has_cuda_torch python3; then
    echo "system python3 has a CUDA torch: using it directly (no venv)"
    PY=python3
else
    PYTHON=${PYTHON:-python3.11}
    command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
    if [[ -x "$VENV/bin/python" ]]; then
        echo "$VENV has no CUDA torch (a CPU build?); using a separate .venv-gpu"
        VENV=.venv-gpu
    fi
    [[ -x "$VENV/bin/python" ]] || soft_step "create venv" 60 "$PYTHON" -m venv --system-site-packages "$VENV"
    if [[ -x "$VENV/bin/python" ]]; then
        PY="$VENV/bin/python"
        if ! "$PY" -c 'import distca, zmq, pytest, matplotlib' >/dev/null 2>&1; then
            # Fail fast without network: no retries, short socket timeout.
            soft_step "pip install" 300 "$PY" -m pip install -q --retries 0 --timeout 10 -e '.[dev]'
        fi
        if ! has_cuda_torch "$PY"; then
            echo "the venv has no CUDA torch; using python3 + PYTHONPATH"
            PY=python3
        fi
    else
        PY=python3
    fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null \
        && ! "$PY" -c 'import zmq, deepspeed, pydantic' >/dev/null 2>&1; then
    soft_step "install wheels" 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))   PYTHONPATH=$PYTHONPATH"

# -- 1. device and backend -------------------------------------------------------------------------
[[ $CPU_MODE == 1 ]] || step "nvidia-smi" 20 nvidia-smi
step "torch info" 45 "$PY" -c '
import sys, torch, zmq, numpy, msgpack
from distca.attention import available_backends, resolve_backend
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "numpy", numpy.__version__, "pyzmq", zmq.__version__)
dev = torch.device(sys.argv[1]); dt = getattr(torch, sys.argv[2])
if dev.type == "cuda":
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch: the GPU steps below will fail")
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("backends", sys.argv[2], available_backends(dev, dt))
print("auto ->", resolve_backend("auto", dev, dt).name)
' "$DEV" "$DT"
step "backend check" 60 bash -c "\"\$0\" benchmarks/gpu_step.py probe $DEV > $RESULTS/probe.json; rc=\$?; cat $RESULTS/probe.json; exit \$rc" "$PY"

# -- 2. calibration ------------------------------------------------------------------------------
CAL="$KDIR/calibration-$DEV-$DT.json"
if [[ $CPU_MODE == 1 ]]; then
    TINY=(--heads 4 --kv-heads 2 --head-dim 32 --warmup 1 --reps 2 --threads 2)
    step "calibrate" 120 "$PY" benchmarks/gpu_step.py kernels calibrate --device cpu --dtype float32 "${TINY[@]}" \
        --q-lens 64,128,256 --prefixes 0,256 --windows 64 --window-q-lens 128 --out "$CAL"
else
    step "calibrate" 150 "$PY" benchmarks/gpu_step.py kernels calibrate --device cuda --dtype bfloat16 \
        --warmup 2 --reps 5 --out "$CAL"
fi

# -- 3. the training step ----------------------------------------------------------------------
CAL_ARG=()
[[ -f $CAL ]] && CAL_ARG=(--calibration "$CAL")
STEP_OUT="$RESULTS/gpu_step.json"
TRAIN_RESERVE=200  # what step 4 (two training runs) gets
LEFT=$((DEADLINE - SECONDS - TRAIN_RESERVE))
STEP_BUDGET=$((LEFT - 60 < 150 ? LEFT - 60 : 150))
((STEP_BUDGET < 30)) && STEP_BUDGET=30
if [[ $CPU_MODE == 1 ]]; then
    step "gpu step" 180 "$PY" benchmarks/gpu_step.py --device cpu --dtype float32 --small --tokens 1024 --threads 2 \
        --budget-s "$STEP_BUDGET" "${CAL_ARG[@]}" --out "$STEP_OUT"
else
    step "gpu step" 220 "$PY" benchmarks/gpu_step.py --device cuda --dtype bfloat16 --layers 2 --tokens 32768 \
        --budget-s "$STEP_BUDGET" "${CAL_ARG[@]}" --out "$STEP_OUT"
fi

# -- 4. training on one GPU --------------------------------------------------------------------
TRAIN_BUDGET=$((DEADLINE - SECONDS - 15 < TRAIN_RESERVE ? DEADLINE - SECONDS - 15 : TRAIN_RESERVE))
if [[ $CPU_MODE == 1 ]]; then
    step "train 1gpu" 150 "$PY" benchmarks/gpu_train.py --cpu --out "$TDIR" --budget-s 140
else
    step "train 1gpu" $((TRAIN_BUDGET + 10)) "$PY" benchmarks/gpu_train.py --out "$TDIR" --budget-s "$TRAIN_BUDGET"
fi

# -- 5. composability --------------------------------------------------------------------------
if [[ $CPU_MODE == 1 ]]; then
    step "composability" 90 "$PY" benchmarks/gpu_step.py kernels composability --device cpu --dtype float32 \
        "${TINY[@]}" --total-tokens 1024 --min-shard 128 --max-shard 512 --out-dir "$KDIR"
else
    step "composability" 100 "$PY" benchmarks/gpu_step.py kernels composability --device cuda --dtype bfloat16 \
        --min-shard 64 --warmup 2 --reps 5 --out-dir "$KDIR"
fi

# -- 6./7. tests -------------------------------------------------------------------------------
if [[ ${DISTCA_GPU_TESTS:-1} == 1 ]]; then
    # On a GPU the CPU end-to-end run of gpu_step.py is left out: step 3 ran the real one.
    SEL=()
    [[ $CPU_MODE == 1 ]] || SEL=(-k "not end_to_end_on_the_cpu")
    step "device tests" 150 "$PY" -m pytest -q -rs --noconftest -p no:cacheprovider -o addopts="" "${SEL[@]}" \
        tests/test_cad_device.py tests/test_train_cuda.py
fi
if [[ ${DISTCA_GPU_BACKEND_TESTS:-0} == 1 ]]; then
    step "backend tests" 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_backends.py
fi

echo
echo "results: $RESULTS${OUT:+ (copied to $OUT)}   total ${SECONDS}s"
((${#SKIPPED[@]})) && echo "GPU check: ${#SKIPPED[@]} step(s) skipped at the deadline: ${SKIPPED[*]}"
if ((${#FAILED[@]})); then
    echo "GPU check: ${#FAILED[@]} step(s) failed: ${FAILED[*]}"
    exit 1
fi
echo "GPU check: all steps passed"
