"""How long PyTorch's OpenMP threads should spin: libgomp's default against osteo's setting
(:func:`osteo.device.short_spin_waits`), alone and beside a second training.

    python benchmarks/spin_waits.py                      # convnext_tiny at 64 px, 3 repeats, ~9 minutes
    python benchmarks/spin_waits.py --models convnext_tiny,densenet169 --repeats 5

Every measurement is a fresh process running timm's own training loop (batch 16, bfloat16
autocast on a CPU with it, Adam, channels-last): 3 untimed steps, then ``--window``
seconds of steps, img/s. The two settings alternate, measurement by measurement, in three
conditions:

- ``alone``: nothing else runs (what the setting costs a training that has the machine);
- ``beside same``: a second training (the same loop on DenseNet121, endless) runs beside
  it with the same setting, as two ``osteo train`` runs on one machine would;
- ``beside default``: the second training keeps libgomp's default spin, as another
  tool's training would.

The neighbour is started first and warmed before the measured process starts; the
median of its own windows (of ``--window`` / 2 s, over its whole life, so not only those
beside the measurement) is reported too. Reports the median img/s and its min-max per
setting and condition, and its ratio to libgomp's default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("default", "osteo")  # libgomp's, osteo's; --settings may add spin counts (e.g. 30000)
CONDITIONS = ("alone", "beside same", "beside default")
NEIGHBOUR = "densenet121"


def _env(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OSTEO_SPIN"] = setting
    return env


def worker(model: str, px: int, window: float, endless: bool) -> None:
    """One training loop; prints one JSON line per window (endless: until stdin closes)."""
    sys.path.insert(0, str(ROOT))
    from osteo.device import cpu_class, short_spin_waits  # torch-free: before torch loads

    setting = os.environ.get("OSTEO_SPIN", "default")
    if setting == "osteo":
        short_spin_waits()
    elif setting != "default":  # a spin count of one's own, to compare with
        os.environ["GOMP_SPINCOUNT"] = setting
    import threading

    import timm
    import torch

    m = timm.create_model(model, pretrained=False, num_classes=3).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), 1e-4)
    x = torch.randn(16, 3, px, px).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (16,))
    bf16 = cpu_class() == "avx512_bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    done = threading.Event()
    if endless:  # the parent closes stdin to stop it
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < window and not done.is_set():
            step()
            n += 1
        print(json.dumps({"img_s": 16 * n / (time.perf_counter() - t0), "steps": n}), flush=True)
        if not endless or done.is_set():
            return


def _start(setting: str, model: str, px: int, window: float, endless: bool) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", model, "--px", str(px), "--window", str(window)]
    proc = subprocess.Popen(cmd + (["--endless"] if endless else []), env=_env(setting), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        raise SystemExit(f"the {model} worker ({setting}) did not start")
    return proc


def measure(setting: str, condition: str, model: str, px: int, window: float) -> dict:
    neighbour = None
    if condition != "alone":
        other = setting if condition == "beside same" else "default"
        neighbour = _start(other, NEIGHBOUR, px, window / 2, endless=True)
    try:
        proc = _start(setting, model, px, window, endless=False)
        out, _ = proc.communicate(timeout=600)
        got = json.loads(out.strip().splitlines()[-1])
    finally:
        if neighbour is not None:
            tail, _ = neighbour.communicate("", timeout=600)
            rates = [json.loads(x)["img_s"] for x in tail.strip().splitlines() if x.startswith("{")]
    if neighbour is not None:
        got["neighbour_img_s"] = statistics.median(rates) if rates else None
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="convnext_tiny")
    p.add_argument("--px", type=int, default=64)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settings", default=",".join(SETTINGS), help="default, osteo, or GOMP_SPINCOUNT values")
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--out", default="", help="a JSON file for every measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--endless", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.px, args.window, args.endless)
    settings, conditions = args.settings.split(","), args.conditions.split(",")
    rows = []
    for model in args.models.split(","):
        for condition in conditions:
            for r in range(args.repeats):
                order = settings[r % len(settings):] + settings[:r % len(settings)]  # who goes first rotates
                for setting in order:
                    got = measure(setting, condition, model, args.px, args.window)
                    rows.append({"model": model, "condition": condition, "setting": setting, "repeat": r, **got})
                    nb = got.get("neighbour_img_s")
                    print(f"{model} {args.px}px {condition:14s} {setting:8s} {got['img_s']:7.1f} img/s"
                          + (f"   neighbour {nb:6.1f}" if nb is not None else ""), flush=True)
    print(f"\nimg/s: median (min-max) over {args.repeats} repeats, and its ratio to libgomp's default; "
          f"window {args.window:g} s; neighbour: timm's {NEIGHBOUR} loop (its median window)")
    print(f"{'model':14s} {'condition':15s} {'setting':8s} {'img/s':>22s} {'/ default':>10s} {'neighbour':>10s}")
    for model in args.models.split(","):
        for condition in conditions:
            def pick(setting, key, model=model, condition=condition):
                return [x[key] for x in rows if x["model"] == model and x["condition"] == condition
                        and x["setting"] == setting and x.get(key) is not None]

            base = statistics.median(pick("default", "img_s")) if "default" in settings else None
            for setting in settings:
                v, n = pick(setting, "img_s"), pick(setting, "neighbour_img_s")
                med = statistics.median(v)
                print(f"{model:14s} {condition:15s} {setting:8s} "
                      f"{f'{med:.1f} ({min(v):.1f}-{max(v):.1f})':>22s} "
                      f"{f'{med / base:.2f}' if base else '-':>10s} "
                      f"{f'{statistics.median(n):.1f}' if n else '-':>10s}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
