#!/usr/bin/env bash
# The GPU part of issue 6 in one command (not yet run: no GPU was available when it was written).
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU, from anywhere
#
# 1. installs this checkout without dependencies or network (the machine's python3 must already have
#    torch with CUDA, triton, transformers, safetensors, huggingface_hub, peft, accelerate),
# 2. kernel parity on the real GPU: tests/step/test_kernels_cuda.py (compiled kernels vs the torch reference,
#    all shapes and dtypes, 20 steps; large shapes; the check path; dispatch) -> $OUT/gpu_parity.txt,
# 3. the GPU benchmark: fused kernels and the torch path vs AdamW(fused=True), 1M … 1B parameters, one big
#    matrix and a transformer's tensors -> $OUT/step_speed_cuda.md (and stdout).
# Budget: install < 1 min, parity ≈ 2–3 min (first compiles included), benchmark ≈ 3–4 min; well under 10.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name())"

echo "== install optbundle (editable, no deps, offline)"
if ! $PY -c "import optbundle.kernels.learned_step" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || {
        echo "pip install failed; falling back to a path shim"
        SHIM=$(mktemp -d)
        mkdir -p "$SHIM/optbundle"
        for f in bundle/*; do ln -s "$PWD/$f" "$SHIM/optbundle/$(basename "$f")"; done
        ln -s "$PWD/kernels" "$SHIM/optbundle/kernels"
        ln -s "$PWD/recipes" "$SHIM/optbundle/recipes"
        export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    }
fi
$PY -c "import optbundle.kernels.learned_step as k; assert not k.interpreter_active(); print('kernels compiled mode')" || exit 1

status=0
echo "== kernel parity on the GPU"
timeout 420 $PY -m pytest -q -p no:cacheprovider tests/step/test_kernels_cuda.py 2>&1 | tee "$OUT/gpu_parity.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== step speed on the GPU"
timeout 360 $PY benchmarks/step_speed.py --device cuda --repeats 10 --warmup 3 --out "$OUT/step_speed_cuda.md" || status=1
exit $status
