"""What a page of memory costs the first time it is written, on this machine.

    python benchmarks/first_touch.py                # 3 rounds, 256 MiB recycled, 4 GiB after reporting

Every figure of osteo's CPU benchmarks that involves new memory (a training step whose
buffers malloc handed back to the kernel, an image cache entry written into new page-cache
pages, a split loaded into a new array) depends on this cost, and it differs from machine
to machine. Under a hypervisor that takes freed guest memory back (virtio-balloon free page
reporting), a page the guest reported is faulted in from the host on its next use; a page
the guest freed a moment ago and takes again is not. Two rows, interleaved, ``--rounds``
times, microseconds per 4 KiB page (the time of the first write less the time of a second
write of the same bytes):

- ``recycled``: 256 MiB taken, written, freed, taken again: pages the kernel has just had.
- ``after reporting``: ``--gib`` GiB written and freed, then taken again once the guest's
  ``reported_kib`` counter has grown by three quarters as much (at most ``--wait`` seconds;
  a plain ``--wait`` pause where the kernel shows no such counter). The counter is the whole
  guest's, and the kernel may hand back a mix of reported and unreported pages: the row is
  what a process meets after such a pause, not a pure count of reported pages.

Prints the guest's page-reporting settings where the kernel has them. Run it beside the
other benchmarks when their numbers are read on a new machine.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time
from pathlib import Path

import numpy as np

PAGE = 4096
REPORTING = Path("/sys/module/page_reporting/parameters")


def _first_write_us(nbytes: int) -> float:
    """us per page of the first write less the second, of ``nbytes`` of new memory, which
    is then freed."""
    # private anonymous memory, as malloc's (mmap's default, MAP_SHARED, would be shmem); not
    # madvised: 4 KiB pages unless THP is "always"
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, np.uint8)
    t0 = time.perf_counter()
    a.fill(1)
    t1 = time.perf_counter()
    a.fill(2)
    t2 = time.perf_counter()
    del a  # no view left on the mapping: it can be closed
    m.close()
    return 1e6 * ((t1 - t0) - (t2 - t1)) / (nbytes // PAGE)


def recycled(mib: int) -> float:
    _first_write_us(mib << 20)  # these pages go back to the kernel, then come again
    return _first_write_us(mib << 20)


def reported_kib() -> int | None:
    f = REPORTING / "reported_kib"
    return int(f.read_text()) if f.exists() else None


def after_reporting(gib: int, wait_s: float) -> tuple[float, float, str]:
    """(us per page, seconds waited, how the wait ended): ``gib`` GiB written and freed, then
    taken again once the guest has reported three quarters as much free memory to the host
    ("reported"), or after ``wait_s`` ("timed out"; "no counter" where the kernel shows none)."""
    _first_write_us(gib << 30)
    before = reported_kib()  # after the free: a report already made of them is missed, the wait only longer
    t0 = time.perf_counter()
    ended = "no counter"
    if before is None:
        time.sleep(wait_s)
    else:
        # the guest reports in bursts, once enough free memory waits (max_waiting_mib)
        while True:
            if reported_kib() - before >= (3 * gib << 20) // 4:
                ended = "reported"
                break
            if time.perf_counter() - t0 >= wait_s:
                ended = "timed out"
                break
            time.sleep(0.2)
    waited = time.perf_counter() - t0
    return _first_write_us(gib << 30), waited, ended


def reporting() -> dict:
    if not REPORTING.is_dir():
        return {}
    return {p.name: p.read_text().strip() for p in sorted(REPORTING.iterdir()) if p.is_file()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--recycled-mib", type=int, default=256)
    p.add_argument("--gib", type=int, default=4, help="GiB freed and taken again after reporting")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the reporting at most")
    args = p.parse_args()
    settings = reporting()
    print("free page reporting:", ", ".join(f"{k}={v}" for k, v in settings.items()) if settings
          else "none (no /sys/module/page_reporting)")
    rows: dict[str, list[float]] = {"recycled": [], "after reporting": []}
    for r in range(args.rounds):
        rows["recycled"].append(recycled(args.recycled_mib))
        us, waited, ended = after_reporting(args.gib, args.wait)
        rows["after reporting"].append(us)
        print(f"round {r + 1}: recycled {rows['recycled'][-1]:.2f}, after reporting {us:.2f} us/page "
              f"(waited {waited:.1f} s: {ended})", flush=True)
    for name, v in rows.items():
        print(f"{name:16s} {statistics.median(v):6.2f} us per 4 KiB page (median of {len(v)}; "
              f"{min(v):.2f}-{max(v):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
