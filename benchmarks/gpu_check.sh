#!/usr/bin/env bash
# The GPU check of issue #14 in one short call (< 8 minutes on an H100/H200), from the repository root:
#
#     bash benchmarks/gpu_check.sh             # on a CUDA machine
#     bash benchmarks/gpu_check.sh --dry-run   # anywhere: the same steps on the CPU at toy sizes (~2 min)
#
# 1. installs what is missing (eai-sparsify, triton, pytest; torch is pinned to the installed build);
# 2. runs the kernel tests on the device (tests/test_triton_kernels.py: the Triton kernels compiled
#    for the GPU, or in the Triton interpreter with --dry-run) and bench_train_step's gradient check;
# 3. bench_train_step.py: saecli's TopK step (Triton backend, and the pure-torch reference) against
#    sparsify's step on the same batches in the same process, float32 and bf16 autocast, with the
#    float32 and bf16 matmul rooflines sampled before every block, at two sizes:
#    4096 × 576 → 4608, k 32 (the CPU workload) and 8192 × 2048 → 65536, k 64 (a real one);
# 4. the sweep: stacked-vs-loop is moot (saecli/sweep/stacked.py was removed: one SAE implementation);
#    bench_sweep.py compares the per-member loop with sequential runs instead, if time is left.
# Targets (shared/PERFORMANCE.md): TopK ≥ 1.5× sparsify at both sizes, fp32 and bf16; ≥ 1.5 ×bf16roof at
# the real size. Everything prints to stdout; a failing step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
FAILED=()
step() {  # step NAME TIMEOUT_S COMMAND...: run, time and report one step
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(( $(date +%s) - START )) s elapsed)"
    if ! timeout "$limit" "$@"; then
        echo "!!! $name failed or ran past ${limit} s"
        FAILED+=("$name")
    fi
}

if [ $DRY = 1 ]; then
    DEVICE=cpu
    SMALL=(--batch 256 --d-model 64 --d-sae 512 --k 8)
    BIG=(--batch 512 --d-model 128 --d-sae 2048 --k 16)
    TIMING=(--reps 1 --steps 2 --warmup 1)
else
    DEVICE=cuda
    SMALL=(--batch 4096 --d-model 576 --d-sae 4608 --k 32)
    BIG=(--batch 8192 --d-model 2048 --d-sae 65536 --k 64)
    TIMING=(--reps 3 --steps 10 --warmup 3)
fi

# ------------------------------------------------------------------------------------------ 1. install
need=()
$PY -c "import sparsify" 2>/dev/null || need+=(eai-sparsify)
$PY -c "import triton" 2>/dev/null || need+=(triton)
$PY -c "import pytest" 2>/dev/null || need+=(pytest)
$PY -c "import saecli.dictionaries.sae" 2>/dev/null || need+=(".[test]")
if [ ${#need[@]} -gt 0 ]; then
    pins=$(mktemp)
    $PY -c "import torch; print(f'torch=={torch.__version__}')" > "$pins"  # never replace the GPU build
    echo "=== installing ${need[*]}"
    $PY -m pip install -q -c "$pins" "${need[@]}" || FAILED+=("install")
    rm -f "$pins"
fi
$PY - <<'EOF'
import torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, {dev}")
from saecli.dictionaries import kernels
print("sparse products:", {d: kernels.backend_for(d).name for d in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]})
EOF

# --------------------------------------------------------------------------------------- 2. kernel tests
step "kernel tests on $DEVICE" 240 $PY -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py tests/test_kernels.py
step "gradient check on $DEVICE" 60 $PY benchmarks/bench_train_step.py --device $DEVICE --check --variants topk \
    "${SMALL[@]}" --reps 1 --steps 1 --warmup 1

# ------------------------------------------------------------------------------------ 3. saecli vs sparsify
VARIANTS_SMALL=topk,topk-torch,topk-plain,sparsify
VARIANTS_BIG=topk,topk-torch,sparsify  # a dense plain step at 8192 × 65536 would only measure the allocator
for amp in "" "--amp"; do
    label=${amp:+bf16 autocast}
    label=${label:-float32}
    step "TopK step, small, $label" 120 $PY benchmarks/bench_train_step.py --device $DEVICE $amp \
        --variants $VARIANTS_SMALL "${SMALL[@]}" "${TIMING[@]}"
    step "TopK step, real size, $label" 150 $PY benchmarks/bench_train_step.py --device $DEVICE $amp \
        --variants $VARIANTS_BIG "${BIG[@]}" "${TIMING[@]}"
done

# ---------------------------------------------------------------------------------------- 4. the sweep
echo "=== sweep: stacked vs loop is moot (stacked.py removed); per-member loop vs sequential runs:"
if [ $DRY = 1 ]; then
    step "sweep loop vs sequential (tiny model, cache)" 180 $PY benchmarks/bench_sweep.py --model tiny --device cpu \
        --sources cache --tokens 1024 --batch 256 --init-batches 1
elif [ $(( $(date +%s) - START )) -lt 360 ]; then
    step "sweep loop vs sequential (SmolLM2-shaped model, cache)" $(( 470 - ($(date +%s) - START) )) \
        $PY benchmarks/bench_sweep.py --model smollm2-shape --device cuda --sources cache --reps 1
else
    echo "skipped: less than 2 minutes left of the 8"
fi

echo "=== done in $(( $(date +%s) - START )) s; failed steps: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
