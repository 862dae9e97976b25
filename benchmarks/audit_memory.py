"""A new dataset's audit with glibc's malloc defaults against ``osteo train``'s setting.

    python benchmarks/audit_memory.py                      # 1,000 phantom PNGs, 8 pairs
    python benchmarks/audit_memory.py --data DIR --pairs 8

What ``osteo train`` does with a new folder before the model: the audit filling a fresh
image cache, the cache check, and the training split loaded as the PyTorch feed loads it
(``load_split``). Each run is a fresh process; the two settings alternate (default, kept,
default, kept, ...), so a machine shared with other work slows both alike:

- ``default``: glibc's malloc as it comes;
- ``kept``: ``osteo.device.keep_freed_memory()`` before the audit and
  ``release_freed_memory()`` after it, as ``osteo train`` does.

Prints each pair's ratio (kept / default images/s), then the medians of images/s, kernel
CPU ms and page faults per image, resident memory right after the audit and after the
release, and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_ONE_RUN = r"""
import json, resource, shutil, sys, tempfile, time
from pathlib import Path
from osteo.data.pipeline import Entry, ImageCache, load_split
from osteo.data.scan import audit
from osteo import device

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) >> 10 for l in f if l.startswith("VmRSS"))

data, how, size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
kept = device.keep_freed_memory() if how == "kept" else ""
root = Path(tempfile.mkdtemp(prefix="osteo-audit-memory-"))
try:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cache = ImageCache(size, root=root)
    ok = audit(data, cache=cache).ok()
    entries = [Entry.from_row(data, r) for r in ok]
    assert cache.fill(entries) == []
    after_audit = resident_mb()
    device.release_freed_memory(kept)
    after_release = resident_mb()
    load_split([str(cache.path(e.sha256)) for e in entries], size)
    wall, r1, n = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF), len(ok)
finally:
    shutil.rmtree(root, ignore_errors=True)
print(json.dumps({"images_per_s": n / wall, "kernel_ms": 1000 * (r1.ru_stime - r0.ru_stime) / n,
                  "faults": (r1.ru_minflt - r0.ru_minflt) / n, "after_audit_mb": after_audit,
                  "after_release_mb": after_release, "peak_mb": r1.ru_maxrss >> 10, "allocator": kept}))
"""


def one_run(data: Path, how: str, size: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _ONE_RUN, str(data), how, str(size)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"audit_memory: a {how} run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an image folder (class subfolders); default: the phantom PNGs of input_pipeline.py")
    p.add_argument("--n", type=int, default=1000, help="phantom images when --data is not given")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--pairs", type=int, default=8)
    args = p.parse_args()
    if args.data:
        data = Path(args.data)
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from input_pipeline import ensure_phantom

        data = ensure_phantom(Path("data/bench") / f"phantom-{args.n}-512", args.n, 512)
    runs: dict[str, list[dict]] = {"default": [], "kept": []}
    for i in range(args.pairs):
        for how in runs:
            runs[how].append(one_run(data, how, args.size))
        ratio = runs["kept"][-1]["images_per_s"] / runs["default"][-1]["images_per_s"]
        print(f"pair {i + 1}: default {runs['default'][-1]['images_per_s']:.0f}, "
              f"kept {runs['kept'][-1]['images_per_s']:.0f} img/s, ratio {ratio:.3f}", flush=True)
    ratios = [k["images_per_s"] / d["images_per_s"] for d, k in zip(runs["default"], runs["kept"])]
    print(f"kept / default: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
          f"{sum(r > 1 for r in ratios)} of {len(ratios)} pairs above 1")
    for how, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "allocator"}
        rates = [r["images_per_s"] for r in rs]
        print(f"{how:8s} {med['images_per_s']:5.0f} img/s ({min(rates):.0f}-{max(rates):.0f}), "
              f"kernel {med['kernel_ms']:.2f} ms/image, {med['faults']:.0f} faults/image, resident after the audit "
              f"{med['after_audit_mb']:.0f} MB, after the release {med['after_release_mb']:.0f} MB, "
              f"peak {med['peak_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
