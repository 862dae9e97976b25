#!/usr/bin/env bash
# The GPU check of the PyTorch engine (issue 20), one run on a lent GPU machine (one H200,
# PyTorch 2.11 and timm installed, Python 3.12, no TensorFlow, no registry):
#
#   bash benchmarks/gpu_wheels.sh                  # here, first: Keras, namex, optree as wheels in .whl/
#   bash benchmarks/gpu_check.sh                   # there (the device call carries .whl), ~6 minutes
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   # here: the same code paths on the CPU, tiny, TensorFlow hidden
#
# What it measures, at 224 px, batch 128, bf16 (Keras mixed_bfloat16, timm bf16 autocast):
# - first, the host feed (benchmarks/feed.py): a uint16 cache -> float32 CUDA tensors,
#   pageable vs pinned, uint16 vs float32 across the bus, host CPU per batch;
# - per study backbone, interleaved and repeated (benchmarks/models.py): the timm engine in
#   osteo's fit (`auto`, what `osteo train` picks there) beside timm's own eager loop,
#   channels-first and channels-last, in 3 rounds of 1.5 s windows (30-70 steps: a
#   dedicated GPU repeats itself closely, and the 10% flag says where it did not); the
#   same engine without osteo's per-batch callback (`auto async`: Keras then no longer
#   syncs after every step); Keras' own layers on PyTorch (`keras-torch`) in one window,
#   for the slow-path ratio keras-torch / auto;
# - in ConvNeXtTiny's group, its timm engine compiled (torch.compile, a cold cache): the
#   compile's seconds, the compiled rate against the eager one's, when compiling pays.
# One start of each row's process (--starts 1): the device time is 15 minutes, a second start
# would pay every build, autotuning and compile twice; a second start is for shared CPUs.
# Writes <date>-gpu-check.json (every window's raw numbers) and .log (the tables) into
# $OUT, else benchmarks/results (dry run: a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
site=$(mktemp -d)
if ! ls .whl/keras-*.whl > /dev/null 2>&1; then
    echo "gpu_check: no Keras wheel in .whl/: run 'bash benchmarks/gpu_wheels.sh' here and carry .whl" >&2
    exit 2
fi
if [[ -n ${GPU_CHECK_DRY:-} ]]; then
    py=.venv/bin/python
    out=${OUT:-$(mktemp -d)}
    # the wheels: complete, and all three unpack for CPython 3.12 on x86-64 as they will there
    bash benchmarks/gpu_wheels.sh --check
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site/py312" \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --only-binary=:all: .whl/*.whl
    ls -d "$site"/py312/{keras,namex,optree}-*.dist-info > /dev/null
    # this Python is 3.11: the pure-Python wheels (Keras, namex) are imported from the unpacked
    # wheels, optree (cp312) from the project's environment
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site/py3" \
        .whl/*-py3-none-any.whl
    # no TensorFlow, as there: neither importable nor found by importlib.util.find_spec (osteo
    # asks it which backends are installed; a stub package that raises would still be found)
    mkdir -p "$site/notf"
    cat > "$site/notf/sitecustomize.py" <<'EOF'
from importlib.machinery import PathFinder

_find = PathFinder.find_spec


def _find_spec(cls, name, path=None, target=None):
    return None if name.partition(".")[0] in ("tensorflow", "tf_keras") else _find(name, path, target)


PathFinder.find_spec = classmethod(_find_spec)
EOF
    export PYTHONPATH="$site/notf:$site/py3:$PWD"
    args=(--models vgg16,convnext_tiny --sizes 64 --batch 8 --window 1 --repeats 2 --starts 1 --compile-check convnext_tiny
          --timeout 900)
else
    py=python3
    out=${OUT:-benchmarks/results}
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
    # no group starts after 330 s; a compile that takes over 240 s is recorded as such
    args=(--models vgg16,vgg19,densenet169,convnext_tiny --sizes 224 --batch 128 --window 1.5 --repeats 3 --starts 1
          --pause 0.2 --compile-check convnext_tiny --budget-s 330 --timeout 240)
fi
mkdir -p "$out"
name="$out/$(date +%F)-gpu-check${GPU_CHECK_DRY:+-dry}"
# what `osteo train` would run here: the GPU found, PyTorch built for it, the timm engine, bf16
engines=auto,keras-torch
if ! GPU_CHECK_DRY=${GPU_CHECK_DRY:-} "$py" - <<'EOF' 2>&1 | tee "$name.log"; then
import importlib.util
import os
import sys

import keras
import timm
import torch

from osteo import device
from osteo.registry import get_backbone

d = device.probe()
p = device.plan(get_backbone("convnext_tiny"), d, planned_images=50_000)
tf = "present" if importlib.util.find_spec("tensorflow") else "absent"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}, available "
      f"{torch.cuda.is_available()}), keras {keras.__version__} from {os.path.dirname(keras.__file__)}, "
      f"timm {timm.__version__}, tensorflow {tf}")
print(f"{d}\nosteo train's plan for convnext_tiny: {p.backend}, {p.impl}, {p.precision}, compile "
      f"{p.jit_compile}, runs on {p.runs_on}")
want = "cpu" if os.environ["GPU_CHECK_DRY"] else "gpu"
if tf == "present" or p.runs_on != want or p.impl != "timm":
    sys.exit(f"gpu_check: expected osteo to plan the timm engine on the {want} without TensorFlow (see above)")
EOF
    # the dry run exists to prove that plan; on the GPU the engine is still measured, by name
    [[ -z ${GPU_CHECK_DRY:-} ]] || exit 1
    engines=timm,keras-torch
fi
"$py" benchmarks/models.py "${args[@]}" --precision mixed_bfloat16 --engines "$engines" --single keras-torch \
    --peers cf,cl --async-row --feed --out "$name.json" 2>&1 | tee -a "$name.log"
