"""Loading the audit memo of a folder: its detail tiles memory-mapped (what osteo does) against
read whole (what it did), interleaved, 9 rounds. Writes the memo first where there is none or it is outdated.

    python benchmarks/memo_load.py [--data data/bench/phantom-1000-512] [--memo /tmp/memo-bench]
"""

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from osteo.data import scan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/bench/phantom-1000-512")
    ap.add_argument("--memo", default="/tmp/memo-bench")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    root, memo = Path(args.data), Path(args.memo)
    scan.audit(root, memo=memo)  # writes the memo where there is none or it is outdated
    (path,) = (memo / f"audit-v{scan.MEMO_VERSION}").iterdir()
    mapped = scan._mapped

    def whole(path, name):
        with np.load(path) as z:
            return z[name], (lambda: True)

    times = {"mapped": [], "whole": []}
    for r in range(args.rounds):
        order = (("mapped", mapped), ("whole", whole)) if r % 2 else (("whole", whole), ("mapped", mapped))
        for name, fn in order:
            scan._mapped = fn
            t = time.perf_counter()
            loaded = scan._Memo(memo, root).load()
            times[name].append(time.perf_counter() - t)
            assert loaded.records, "no memo loaded"
    scan._mapped = mapped
    print(f"memo {path} ({path.stat().st_size / 1e6:.1f} MB, {len(loaded.records)} records)")
    for name, v in times.items():
        print(f"{name:>6}: median {statistics.median(v) * 1e3:.1f} ms (range {min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
