"""What reading a timm weights file into Keras' layers costs, before and after osteo keeps it.

A run on Keras' layers (the keras engine) started from a timm state dict (``--weights x.pth``)
reads the file in a PyTorch child process first (``osteo.backbones.keras_apps.timm_module_state``).
This times that read for each backbone, cold (an empty ``$OSTEO_CACHE``: the child runs and its
state is kept) then warm (the kept state, as the next run, fold, trial or resume reads it), the
file hashed again each time as a new process would. The rows are interleaved (each round: every
backbone, cold then warm) and the medians printed with their range.

    python benchmarks/ported_weights.py --models vgg16,vgg19,densenet169,convnext_tiny --rounds 3

The weights files are timm's modules at their random initialisation, saved with torch.save
(written once into ``--work``, by a PyTorch child). Results: one JSON, ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_MAKE = """
import sys, torch
from osteo.backbones.timm_torch import create_module
from osteo.registry import get_backbone
torch.save(create_module(get_backbone(sys.argv[1]).timm_name).state_dict(), sys.argv[2])
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg16,vgg19,densenet169,convnext_tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="/tmp/osteo-bench-ported", help="a folder for the files and the cache")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ported_weights.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["OSTEO_CACHE"] = str(work / "cache")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    names = args.models.split(",")
    for name in names:  # in a PyTorch child: torch beside TensorFlow may crash on import
        if not (work / f"{name}.pth").exists():
            subprocess.run([sys.executable, "-c", _MAKE, name, str(work / f"{name}.pth")], check=True, cwd=ROOT,
                           env={**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)})
    sys.path.insert(0, str(ROOT))
    from osteo import files
    from osteo.backbones import keras_apps
    from osteo.registry import get_backbone

    seconds: dict[str, dict[str, list[float]]] = {n: {"cold": [], "warm": []} for n in names}
    for r in range(args.rounds):
        for name in names:
            shutil.rmtree(work / "cache", ignore_errors=True)
            for kind in ("cold", "warm"):
                files._HASHED.clear()  # as a new process: the file is hashed again
                t = time.perf_counter()
                keras_apps.timm_module_state(work / f"{name}.pth", get_backbone(name))
                seconds[name][kind].append(time.perf_counter() - t)
            print(f"round {r + 1}: {name} cold {seconds[name]['cold'][-1]:.2f} s, warm {seconds[name]['warm'][-1]:.2f} s",
                  flush=True)
    print("| backbone | file | cold: the child, s | warm: kept, s |")
    print("| --- | ---: | ---: | ---: |")
    for name in names:
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in seconds[name].values()]
        print(f"| {name} | {(work / f'{name}.pth').stat().st_size / 1e6:.0f} MB | {cells[0]} | {cells[1]} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"seconds": seconds, "rounds": args.rounds}, indent=1))
    shutil.rmtree(work / "cache", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
