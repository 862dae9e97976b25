#!/usr/bin/env bash
# The GPU check of the PyTorch engine, as one script for a lent GPU machine (PyTorch and
# timm installed there, no TensorFlow): the four study backbones at 224 px, batch 128,
# bf16 -- osteo auto, Keras' layers on PyTorch, timm's module inside Keras (eager and
# compiled) beside timm's own loop (channels-first, channels-last, compiled).
# Usage: bash benchmarks/gpu_check.sh [KERAS_WHEEL] ; results land in $OUT (or benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import keras" 2>/dev/null; then
    python3 -m pip install -q --no-deps "${1:-$(ls shared/*.whl .whl/keras-*.whl 2>/dev/null | head -1)}"
fi
python3 -m pip install -q --no-deps -e . 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
KERAS_BACKEND=torch timeout 540 python3 benchmarks/models.py --models convnext_tiny,densenet169,vgg16,vgg19 \
    --sizes 224 --batch 128 --steps 20 --precision mixed_bfloat16 --no-pipeline --timeout 150 \
    --engines auto,keras-torch,timm,timm-compiled --peers cf,cl,cl-compiled \
    --out "${OUT:-benchmarks/results}"
