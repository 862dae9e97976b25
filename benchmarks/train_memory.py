"""Peak resident memory of ``osteo train`` against timm's own training loop (issue 20.4).

    python benchmarks/train_memory.py                       # DenseNet169 and ConvNeXtTiny at 224 px, 2 repeats
    python benchmarks/train_memory.py --before /path/to/older/checkout   # and that checkout's osteo train too

Every row is a fresh process, and the rows alternate, repeat after repeat:

- ``timm cl``: timm's own channels-last loop (``models.TimmRow``, the ``cl`` peer of
  ``models.py``: torch.optim.Adam, bf16 autocast where the device has bfloat16, as
  ``models.py``'s ``auto`` precision; batch 16), ``--steps`` steps, with osteo train's
  malloc and OpenMP settings;
- ``osteo``: ``osteo train finetune --model M --weights none --epochs 2`` on a phantom set
  (``--n`` images of 256 px, resized to ``--size``; batch 16; on PyTorch unless
  ``KERAS_BACKEND`` says otherwise, the engine and precision ``auto`` picks there), the
  whole command: audit, both phases, predictions, reports;
- ``osteo, Keras' optional imports``: the same with ``OSTEO_KERAS_OPTIONAL=1`` (Keras loads
  scikit-learn, pandas and matplotlib as it does by default; ``osteo._lean``);
- ``before`` (with ``--before PATH``): the same command run on PATH's osteo package.

Reported per row: the process's peak resident memory (``ru_maxrss`` from ``wait4``), median
and range over the repeats, and its ratio to ``timm cl``; for osteo's rows also the peak
that ``env.json`` recorded after training and the predictions, before the reports, and the
training images/sec. Peak memory is nearly deterministic; the repeats show how nearly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def timm_loop(model: str, size: int, batch: int, steps: int) -> None:
    """Child: timm's cl loop, as models.py's cl row runs it, with osteo train's settings."""
    from osteo import device

    device.keep_freed_memory()
    device.short_spin_waits()
    import models

    row = models.TimmRow({"model": model, "size": size, "batch": batch, "precision": models._precision("auto"),
                          "channels_last": True, "compile": False})  # bf16 where osteo's auto trains in it
    for _ in range(steps):
        row._step()


def run_child(argv: list[str], env: dict, cwd: str) -> tuple[int, float]:
    """(exit status, peak resident MB) of one child process. ``cwd`` outside the checkout:
    ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH. Its
    stderr goes to a file (a pipe read only at the end could fill and stop the child)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            lines = err.read().strip().splitlines()
            print(f"   failed ({proc.returncode}): {lines[-1] if lines else ''}", flush=True)
    return proc.returncode, usage.ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="densenet169,convnext_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="timm loop's steps")
    p.add_argument("--n", type=int, default=300, help="phantom images for osteo train")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--before", help="another checkout whose osteo package runs as row 'before'")
    p.add_argument("--work", default="data/bench", help="where the phantom set is kept")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--timm-loop", help=argparse.SUPPRESS)  # the child's mode
    args = p.parse_args()
    if args.timm_loop:
        timm_loop(args.timm_loop, args.size, args.batch, args.steps)
        return 0

    from input_pipeline import ensure_phantom

    data = ensure_phantom(ROOT / args.work / f"phantom-{args.n}-256", args.n, 256)
    base = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "torch")}
    base.pop("OSTEO_KERAS_OPTIONAL", None)
    rows = {"timm cl": ({}, None), "osteo": ({}, None), "osteo, Keras' optional imports": (
        {"OSTEO_KERAS_OPTIONAL": "1"}, None)}
    if args.before:
        rows["before"] = ({}, str(Path(args.before).resolve()))
    results: dict = {m: {r: [] for r in rows} for m in args.models.split(",")}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:  # each osteo row must import its own checkout's osteo
            for name, pythonpath, want in (("osteo", None, ROOT), ("before", rows["before"][1], args.before)):
                env = {**base, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
                where = subprocess.run([sys.executable, "-c", "import osteo; print(osteo.__file__)"], env=env,
                                       cwd=tmp, capture_output=True, text=True).stdout.strip()
                if not where or Path(where).resolve().parent.parent != Path(want).resolve():
                    raise SystemExit(f"row {name!r} would import osteo from {where or 'nowhere'}, not {want}")
                print(f"{name} rows run {where}", flush=True)
        for rep in range(args.repeats):
            for model in results:
                for k, (name, (extra, pythonpath)) in enumerate(rows.items()):
                    env = {**base, **extra}
                    if name == "timm cl":
                        argv = [sys.executable, __file__, "--timm-loop", model, "--size", str(args.size),
                                "--batch", str(args.batch), "--steps", str(args.steps)]
                    else:
                        runs = Path(tmp) / f"runs-{model}-{rep}-{k}"  # each run's own folder and a cold cache
                        env["OSTEO_CACHE"] = str(Path(tmp) / f"cache-{model}-{rep}-{k}")
                        if pythonpath:
                            env["PYTHONPATH"] = pythonpath
                        argv = [sys.executable, "-m", "osteo.cli", "train", "finetune", "--model", model, "--data",
                                str(data), "--image-size", str(args.size), "--weights", "none", "--epochs", "2",
                                "--batch", str(args.batch), "--runs", str(runs)]
                    code, peak = run_child(argv, env, tmp)
                    got = {"peak_rss_mb": round(peak, 1), "status": code}
                    if name != "timm cl" and code == 0:  # an osteo run: what its env.json recorded
                        found = sorted(runs.glob(f"{model}/*/env.json"))
                        if len(found) == 1:
                            env_json = json.loads(found[0].read_text())
                            got.update(train_peak_rss_mb=env_json.get("peak_rss_mb"),
                                       train_images_per_sec=env_json.get("train_images_per_sec"))
                        else:
                            got["status"] = f"{len(found)} env.json files"
                    results[model][name].append(got)
                    print(f"repeat {rep + 1} {model} {name}: {got}", flush=True)
    report = {"command": " ".join(sys.argv), "seconds": round(time.perf_counter() - t0), "size": args.size,
              "batch": args.batch, "n": args.n, "results": results}
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


def _median_range(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def print_table(report: dict) -> None:
    print(f"\npeak resident MB, median (range) of {len(next(iter(report['results'].values()))['timm cl'])} "
          f"repeats, {report['size']} px, batch {report['batch']}")
    print("| backbone | row | process peak | / timm cl | peak before the reports (env.json) | train img/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model, rows in report["results"].items():
        timm = [x["peak_rss_mb"] for x in rows["timm cl"] if x["status"] == 0]
        for name, runs in rows.items():
            ok = [x for x in runs if x["status"] == 0]
            peaks = [x["peak_rss_mb"] for x in ok]
            ratio = f"{statistics.median(peaks) / statistics.median(timm):.2f}x" if peaks and timm else "-"
            trained = [x["train_peak_rss_mb"] for x in ok if x.get("train_peak_rss_mb")]
            rates = [x["train_images_per_sec"] for x in ok if x.get("train_images_per_sec")]
            rate = f"{statistics.median(rates):.1f}" if rates else "-"
            print(f"| {model} | {name} | {_median_range(peaks)} | {ratio} | {_median_range(trained)} | {rate} |")


if __name__ == "__main__":
    sys.exit(main())
