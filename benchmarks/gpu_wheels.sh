#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh installs on the lent GPU machine (Python 3.12,
# x86-64, no package registry there): Keras at the version of this checkout's environment,
# and those of its requirements that the machine's image lacks. Into .whl/ (git-ignored).
#   bash benchmarks/gpu_wheels.sh            # download, then check that nothing is missing
#   bash benchmarks/gpu_wheels.sh --check    # only the check
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
# keras' requirements that the image lacks (the rest are in its package list, see GPU_HAS)
carried=(keras namex optree)
if [[ ${1:-} != --check ]]; then
    rm -rf .whl && mkdir -p .whl
    for name in "${carried[@]}"; do
        version=$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$name==$version"
    done
fi
# Every requirement of a carried wheel (for Python 3.12 on Linux, no extras) must be carried
# or already on the machine: the image's packages as /work/.library/device/KINDS.md lists
# them, those that keras, namex, optree and osteo's PyTorch path import.
GPU_HAS="absl-py h5py ml-dtypes numpy rich packaging typing-extensions pandas scipy scikit-learn pillow psutil
timm torch torchvision safetensors huggingface-hub matplotlib pyyaml markdown-it-py pygments"
"$py" - "$GPU_HAS" .whl/*.whl <<'EOF'
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
have = {canonicalize_name(n) for n in sys.argv[1].split()}
wheels = sys.argv[2:]
names = [canonicalize_name(parse_wheel_filename(w.rsplit("/", 1)[-1])[0]) for w in wheels]
if len(set(names)) != len(names):
    sys.exit(f"two versions of one package in .whl/ (the install would stop): {sorted(names)}")
missing = set()
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if (req.marker is None or req.marker.evaluate(env)) and canonicalize_name(req.name) not in have | set(names):
                    missing.add(f"{req} (needed by {wheel.rsplit('/', 1)[-1]})")
size = sum(__import__("os").path.getsize(w) for w in wheels) / 2**20
if missing:
    sys.exit("missing on the GPU machine, carry them too: " + "; ".join(sorted(missing)))
print(f".whl/: {len(wheels)} wheels, {size:.1f} MB, no requirement missing: {', '.join(sorted(names))}")
EOF
