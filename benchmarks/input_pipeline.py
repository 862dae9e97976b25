"""Input-pipeline throughput: a new dataset's audit + first epoch vs Keras' loaders.

    python benchmarks/input_pipeline.py                       # 2,000 phantom PNGs of 512 px -> 224 px, 5 rounds
    python benchmarks/input_pipeline.py --n 1000 --large-n 100 --rounds 5
    python benchmarks/input_pipeline.py --stages              # CPU ms per image by stage, one thread

Same files, same output size, one process. The rows that are compared run interleaved,
round after round (ImageDataGenerator, image_dataset_from_directory, osteo, ...), so a
machine shared with other work slows them alike; the table gives each row's median over
the rounds and its spread (lowest-highest images/s). Wall time and CPU time (all threads
of this process) are both reported: on a shared 2-core machine wall time of identical
epochs varies by up to 2x while CPU time stays put.

In each round a compared row (osteo's first epoch and Keras' two loaders) repeats its whole
first epoch, each pass from scratch, until its passes add up to ``--min-seconds`` (10 s) of
wall time, and its rate pools them. The ratios to Keras' loaders are taken round by round (a
row over its set's peer in the same round), as ``models.py`` takes its ratios: the table
gives their median and spread, and a ratio whose rounds spread by more than
``models.FLAG_SPREAD`` (10%) is FLAGGED rather than reported. Each pass also records the
share of the machine's CPU that other processes took meanwhile (``others``, as
``models.py`` measures it): a ratio whose row or peer ran with a median share above
``models.BUSY_SHARE`` (5%) is BUSY, not reported, since loaders that bring different
numbers of threads lose different shares to a neighbour (beside a second training,
ImageDataGenerator lost 4-8%, osteo 36%, ``image_dataset_from_directory`` 45-50%).
``benchmarks/agree.py`` compares two runs' osteo rows.

- ``osteo audit + first epoch``: what ``osteo train`` does with a new dataset (a fresh
  image cache each pass): the audit, filling the cache from its own decodes, the cache
  check, and one training epoch, against ``image_dataset_from_directory``'s first epoch
  (decode + resize) and ``ImageDataGenerator``'s (the study's, with its augmentation).
- ``osteo later epoch``: from the split held in memory; ``osteo new run``: a second run
  on the same data as ``osteo train`` starts it: the audit with its records recalled
  (unchanged files are not read), every cache entry checked, one pass from the on-disk
  cache; ``every file read again``: the same with an audit that decodes every file (as
  ``osteo data audit`` does, and every run did before the audit remembered its records).
  Before 2026-12-05 the new-run row timed the pass alone, without the audit and the check
  that every run pays first.
- 16-bit PNGs and DICOM (the phantom's pixels, ``--formats``) have no Keras peer.
- ``--malloc kept`` (the default): the process keeps its freed memory from the start, as
  ``osteo train`` does from its audit on, and osteo's row hands what the audit left free
  back after it, as ``osteo train`` does. Rows share the process, so Keras' loaders run
  with the same setting (they measured the same either way, ``benchmarks/README.md``);
  ``--malloc default`` for glibc's own.

``--stages`` times each step of the audit + cache path on one thread (CPU ms per image):
where a new dataset's time goes. Writes ``benchmarks/results/input_pipeline-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from osteo import CLASSES

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # the flag's margin and spread, shared with the model benchmark

OSTEO_FIRST = "osteo audit + first epoch"  # the row the targets are read from
# A compared row's time per round: one first epoch of 1,000 PNGs is 1-3 s (Keras' tf.data
# loader, osteo) to 6 s (ImageDataGenerator), and rounds that short spread by 10-19% on a
# quiet machine (the eighth session's quiet run, ratios taken round by round). Issue 20 asks
# at least 10 s of each timed row; the passes of a round are pooled.
MIN_SECONDS = 10.0
PEERS = ("ImageDataGenerator (the study)", "image_dataset_from_directory")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    """Wall time, this process's CPU time (all threads) and the machine's (every process)."""

    def __enter__(self):
        self.wall, self.cpu, self.machine = time.perf_counter(), _cpu(), models.machine_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = _cpu() - self.cpu
        self.others = models.others_share(self.machine, self.cpu, self.wall)


# --------------------------------------------------------------------------- data


def ensure_phantom(root: Path, n: int, size: int, seed: int = 0, bit_depth: int = 8) -> Path:
    from osteo.data.phantom import write_phantom

    marker = root / f".complete-{n}-{size}-{seed}-{bit_depth}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing {n} phantom images of {size} px ({bit_depth}-bit) to {root} (once) ...", flush=True)
        write_phantom(root, n=n, size=size, seed=seed, bit_depth=bit_depth)
        marker.touch()
    return root


def _sources(src: Path, n: int) -> list[Path]:
    files = sorted(src.rglob("*.png"))
    return files[:: max(1, len(files) // n)][:n]


def ensure_large_jpegs(src: Path, root: Path, n: int, size: int) -> Path:
    """Radiograph-sized JPEGs (real knee X-rays are 2,000-2,700 px) made from the phantom."""
    marker = root / f".complete-{n}-{size}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing {n} JPEGs of {size} px to {root} (once) ...", flush=True)
        for f in _sources(src, n):
            out = root / f.parent.name / (f.stem + ".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(f).resize((size, size), Image.Resampling.BICUBIC).save(out, quality=92)
        marker.touch()
    return root


def ensure_dicoms(src: Path, root: Path, n: int) -> Path:
    """The phantom's PNGs as 16-bit MONOCHROME2 DICOM files (explicit VR little endian)."""
    from osteo.data.phantom import dicom_bytes

    marker = root / f".complete-{n}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing {n} DICOM files to {root} (once) ...", flush=True)
        for i, f in enumerate(_sources(src, n)):
            px = (np.asarray(Image.open(f), dtype=np.uint16) * 16).astype(np.uint16)
            out = root / f.parent.name / (f.stem + ".dcm")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(dicom_bytes(px, PatientID=f"P{i // 2:04d}"))
        marker.touch()
    return root


# --------------------------------------------------------------------------- rows


class OsteoRun:
    """One new dataset through osteo: audit (filling a fresh cache) + cache check + first
    epoch, as often as asked, each time into a fresh cache (all removed by :meth:`close`);
    then later epochs and a new run from the last one's disk cache."""

    def __init__(self, data: Path, size: int, batch: int, allocator: str = ""):
        self.data, self.size, self.batch, self.allocator = data, size, batch, allocator
        self.cache_roots: list[Path] = []

    def first_epoch(self) -> dict:
        from osteo.data.pipeline import Entry, ImageCache
        from osteo.data.scan import audit
        from osteo.data.tfdata import make_dataset
        from osteo.device import release_freed_memory

        self.it = None  # the last repeat's stream (and its threads) ends before the clock starts
        self.cache_roots.append(Path(tempfile.mkdtemp(prefix="osteo-bench-cache-")))
        with Timer() as t:
            cache = ImageCache(self.size, root=self.cache_roots[-1])
            ok = audit(self.data, cache=cache, memo=cache.root).ok()
            entries = [Entry.from_row(self.data, r) for r in ok]
            assert cache.fill(entries) == []
            release_freed_memory(self.allocator)  # as osteo train does after its audit
            self.files = [str(cache.path(e.sha256)) for e in entries]
            self.labels = [CLASSES.index(r.label) for r in ok]
            self.steps = -(-len(ok) // self.batch)
            self.it = iter(make_dataset(self.files, self.labels, self.size, self.batch, training=True, seed=0))
            for _ in range(self.steps):
                next(self.it)
        return _rates(len(ok), t)

    def later_epochs(self, epochs: int) -> dict:
        with Timer() as t:
            for _ in range(self.steps * epochs):
                next(self.it)
        return _rates(len(self.files) * epochs, t)

    def new_run(self, recall: bool = True) -> dict:
        """A second run on the same data, as ``osteo train`` starts it: the audit (its records
        recalled, or with ``recall=False`` every file read and decoded again, as before
        2026-12-05), the check of every cache entry, one pass from the disk cache."""
        from osteo.data.pipeline import Entry, ImageCache
        from osteo.data.scan import audit
        from osteo.data.tfdata import make_dataset

        with Timer() as t:
            cache = ImageCache(self.size, root=self.cache_roots[-1])
            ok = audit(self.data, cache=cache, memo=cache.root if recall else None).ok()
            assert cache.fill([Entry.from_row(self.data, r) for r in ok]) == []
            for _ in make_dataset(self.files, self.labels, self.size, self.batch, training=False):
                pass
        return _rates(len(self.files), t)

    def audit_alone(self) -> dict:
        from osteo.data.scan import audit

        with Timer() as t:
            n = len(audit(self.data).ok())
        return _rates(n, t)

    def close(self) -> None:
        self.it = None
        for root in self.cache_roots:
            shutil.rmtree(root, ignore_errors=True)


def image_data_generator(data: Path, size: int, batch: int) -> dict:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    # The study's configuration: rescale, shear, zoom, horizontal flip.
    gen = ImageDataGenerator(rescale=1 / 255, shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
    flow = gen.flow_from_directory(str(data), target_size=(size, size), batch_size=batch, class_mode="sparse",
                                   shuffle=True, seed=0)
    flow.verbose = False
    with Timer() as t:
        for _ in range(len(flow)):
            next(flow)
    return _rates(flow.n, t)


def image_dataset_from_directory(data: Path, size: int, batch: int) -> dict:
    import keras

    ds = keras.utils.image_dataset_from_directory(str(data), image_size=(size, size), batch_size=batch, verbose=False)
    with Timer() as t:
        n = 0
        for x, _ in ds:
            n += int(x.shape[0])
    return _rates(n, t)


def repeated(min_seconds: float, fn, *args) -> dict:
    """``fn(*args)`` (one timed pass, a :func:`_rates` dict) again until its passes add up to
    ``min_seconds`` of wall time: their images and seconds pooled, and how many passes."""
    passes = [fn(*args)]
    while sum(p["wall_s"] for p in passes) < min_seconds:
        passes.append(fn(*args))
    wall = sum(p["wall_s"] for p in passes)
    shares = [p.get("others") for p in passes]
    others = None if None in shares or wall <= 0 else sum(x * p["wall_s"] for x, p in zip(shares, passes)) / wall
    pooled = _pooled_rates(sum(p["images"] for p in passes), wall, sum(p["cpu_s"] for p in passes), others)
    return {**pooled, "passes": len(passes)}


def _rates(n: int, t: Timer) -> dict:
    return _pooled_rates(n, t.wall, t.cpu, t.others)


def _pooled_rates(n: int, wall: float, cpu: float, others: float | None = None) -> dict:
    """One timed pass's (or pooled passes') rates; ``others``: the share of the machine's CPU
    other processes took meanwhile (see ``models.others_share``)."""
    return {"images": n, "wall_s": round(wall, 4), "cpu_s": round(cpu, 4),
            "images_per_s": round(n / wall, 1) if wall > 0 else None,
            "cpu_ms_per_image": round(1000 * cpu / n, 3) if n else None,
            "others": None if others is None else round(others, 4)}


def round_ratios(rows: dict[str, dict]) -> dict[str, dict]:
    """osteo's first epoch and each Keras loader over each Keras loader of its set, round by
    round: per-round ratios, their median, min-max and spread (``models.ratio_summary``), and
    a status as ``models.summarize`` gives (``models.ratio_status``: ``BUSY`` where the row or
    its peer ran with other processes' median share of the CPU above ``models.BUSY_SHARE``,
    ``1 round`` with one, ``FLAGGED`` where the rounds spread by more than
    ``models.FLAG_SPREAD``, else ``ok``). ``rows``: the results' ``rows``
    ("<set>: <row>" -> its summary, whose ``samples`` carry their ``round``; without it, list
    order is the round). Keyed "<set>: <row> / <peer>"."""
    def by_round(samples: list[dict]) -> dict[int, float]:
        return {x.get("round", i): x["images_per_s"] for i, x in enumerate(samples) if x.get("images_per_s")}

    out = {}
    for key, row in rows.items():
        name, _, label = key.partition(": ")
        if label not in (OSTEO_FIRST, *PEERS):  # later epochs, new runs: no target compares them to a first epoch
            continue
        own = by_round(row.get("samples", ()))
        for peer in PEERS:
            other = rows.get(f"{name}: {peer}")
            if other is None or label == peer:
                continue
            theirs = by_round(other.get("samples", ()))
            r = [own[k] / theirs[k] for k in sorted(own) if k in theirs]
            s = {"set": name, "row": label, "peer": peer, **models.ratio_summary(r)}
            s["others"] = models.busiest(row.get("samples", ()), other.get("samples", ()))
            s["status"] = models.ratio_status(s, s["others"], "1 round") if r else "no rounds"
            out[f"{key} / {peer}"] = s
    return out


def _ratio_cell(s: dict | None) -> str:
    if s is None or "ratio" not in s:
        return ""
    if s["status"] == "FLAGGED":
        return f"FLAGGED ({s['ratio']:.2f}x, {s['ratio_spread']:.0%})"
    if s["status"] == "BUSY":
        return f"BUSY ({s['ratio']:.2f}x, others {s['others']:.0%})"
    spread = f" ({s['ratio_spread']:.0%})" if s.get("ratio_spread") is not None else " (1 round)"
    return f"{s['ratio']:.2f}x{spread}"


def _summary(samples: list[dict]) -> dict:
    rates = [s["images_per_s"] for s in samples]
    return {"images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
            "cpu_ms_per_image": statistics.median(s["cpu_ms_per_image"] for s in samples), "samples": samples}


# --------------------------------------------------------------------------- stages


def stages(data: Path, size: int, limit: int) -> dict:
    """CPU ms per image of each step of the audit + cache path, on one thread, and of the
    duplicate search (once per dataset, after every decode)."""
    from threadpoolctl import threadpool_limits

    from osteo.data import scan
    from osteo.data.decode import decode_gray
    from osteo.data.pipeline import ImageCache, jpeg_ratio, resize_gray, to_levels

    files = [data / p for p, _ in scan._list(data).candidates][:limit]
    cache = ImageCache(size, root=tempfile.mkdtemp(prefix="osteo-bench-cache-"))
    steps = ("read", "sha256 of the bytes", "decode", "pixel hash", "features", "cache resize", "cache write")
    cpu = dict.fromkeys(steps, 0.0)

    def timed(step, fn, *args):
        t = time.process_time()
        out = fn(*args)
        cpu[step] += time.process_time() - t
        return out

    with threadpool_limits(1, user_api="blas"):
        records = []
        for f in files:
            data_ = timed("read", f.read_bytes)
            sha = timed("sha256 of the bytes", lambda d: hashlib.sha256(d).hexdigest(), data_)
            gray = timed("decode", decode_gray, data_, scan.audit_scale)
            info = gray.info
            if info.format == "jpeg" and gray.scale != jpeg_ratio(info.width, info.height, size):
                raise SystemExit("--stages assumes the audit's JPEG decode serves the cache")
            timed("pixel hash", scan._pixel_hash, gray)
            features = timed("features", scan._gray_features, gray)
            levels = timed("cache resize", lambda g: to_levels(resize_gray(g, size)), gray)
            timed("cache write", cache._write, sha, levels)
            records.append(scan.Record(path=str(f), label="normal", sha256=sha, pixel_sha256=sha, features=features))
        t = time.process_time()
        scan._find_duplicates(records)
        dup = time.process_time() - t
    shutil.rmtree(cache.dir.parent, ignore_errors=True)
    out = {s: round(1000 * v / len(files), 3) for s, v in cpu.items()}
    out["duplicate search"] = round(1000 * dup / len(files), 3)
    out["total"] = round(sum(out.values()), 3)
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    from osteo import _quiet

    _quiet.install()  # TensorFlow's start-up notices, filtered as the osteo CLI does
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--source-size", type=int, default=512)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="cached epochs to time")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of every row")
    p.add_argument("--min-seconds", type=float, default=MIN_SECONDS,
                   help="a compared row's passes (each a new dataset's first epoch) within a round add up to "
                        "at least this much wall time")
    p.add_argument("--large-n", type=int, default=400, help="number of large JPEGs (0: skip)")
    p.add_argument("--large-size", type=int, default=2400)
    p.add_argument("--formats", default="png16,dicom", help="other sets, osteo only: png16, dicom ('' for none)")
    p.add_argument("--malloc", choices=("kept", "default"), default="kept",
                   help="the process keeps its freed memory as osteo train does (kept), or glibc's defaults")
    p.add_argument("--stages", action="store_true", help="CPU ms per image by stage instead (one thread)")
    p.add_argument("--work", default="data/bench", help="where the benchmark data is kept")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="a folder, or a .json file (--stages adds -stages before .json)")
    args = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    work = Path(args.work)
    data = ensure_phantom(work / f"phantom-{args.n}-{args.source_size}", args.n, args.source_size)
    sets = {"PNG": data}
    if args.large_n:
        sets[f"{args.large_size} px JPEG"] = ensure_large_jpegs(
            data, work / f"jpeg-{args.large_n}-{args.large_size}", args.large_n, args.large_size)
    formats = [f for f in args.formats.split(",") if f]
    if "png16" in formats:
        sets["16-bit PNG"] = ensure_phantom(work / f"phantom16-{args.n}-{args.source_size}", args.n,
                                            args.source_size, bit_depth=16)
    if "dicom" in formats:
        sets["DICOM"] = ensure_dicoms(data, work / f"dicom-{args.n}-{args.source_size}", args.n)
    results: dict = {"config": vars(args), "machine": _machine()}
    allocator = ""
    if args.malloc == "kept":
        from osteo.device import keep_freed_memory

        allocator = keep_freed_memory()
    results["allocator"] = allocator or "glibc's defaults"

    if args.stages:
        results["stages"] = {name: stages(folder, args.size, 300) for name, folder in sets.items()}
        table = Table(title=f"CPU ms per image by stage, one thread, -> {args.size} px (first 300 files of each set)")
        table.add_column("stage")
        for name in sets:
            table.add_column(name, justify="right")
        for step in next(iter(results["stages"].values())):
            table.add_row(step, *(f"{results['stages'][name][step]:.2f}" for name in sets))
        Console().print(table)
        _write(results, args.out, "-stages")
        return 0

    samples: dict[str, list[dict]] = {}

    def add(key, value):
        samples.setdefault(key, []).append({**value, "round": r})

    least = args.min_seconds
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds} ...", flush=True)
        for name, folder in sets.items():
            keras_peer = name == "PNG" or "JPEG" in name
            if keras_peer:
                add((name, PEERS[0]), repeated(least, image_data_generator, folder, args.size, args.batch))
                add((name, PEERS[1]), repeated(least, image_dataset_from_directory, folder, args.size, args.batch))
            run = OsteoRun(folder, args.size, args.batch, allocator)
            try:
                add((name, OSTEO_FIRST), repeated(least, run.first_epoch))
                if name == "PNG":
                    add((name, "osteo later epoch (memory)"), run.later_epochs(args.epochs))
                    add((name, "osteo new run (audit recalled, disk cache)"), run.new_run())
                    add((name, "osteo new run, every file read again"), run.new_run(recall=False))
                    add((name, "osteo audit alone"), run.audit_alone())
            finally:
                run.close()

    summary = {f"{k[0]}: {k[1]}": _summary(v) for k, v in samples.items()}
    results["rows"] = summary
    results["ratios"] = ratios = round_ratios(summary)
    results["flag_spread"], results["busy_share"] = models.FLAG_SPREAD, models.BUSY_SHARE
    table = Table(title=f"input pipeline -> {args.size} px, batch {args.batch}: median of {args.rounds} interleaved "
                        f"rounds ({args.n} PNGs of {args.source_size} px; malloc: {args.malloc}); ratios: median of "
                        f"the rounds' ratios (their spread); FLAGGED: spread > {models.FLAG_SPREAD:.0%}; BUSY: "
                        f"other processes took > {models.BUSY_SHARE:.0%} of the CPU")
    for col in ("set", "pipeline", "images/s", "spread", "CPU ms/image", "vs ImageDataGenerator",
                "vs image_dataset_from_directory"):
        table.add_column(col, justify="left" if col in ("set", "pipeline") else "right")
    for name, row in samples:
        s = summary[f"{name}: {row}"]
        cells = [_ratio_cell(ratios.get(f"{name}: {row} / {peer}")) for peer in PEERS]
        table.add_row(name, row, f"{s['images_per_s']:,.0f}", f"{s['min']:,.0f}-{s['max']:,.0f}",
                      f"{s['cpu_ms_per_image']:.2f}", *cells)
    Console().print(table)
    _write(results, args.out, "")
    return 0


def _write(results: dict, out: str, suffix: str) -> None:
    from osteo.files import write_json

    path = Path(out)
    if path.suffix == ".json":  # as models.py takes it
        path = path.with_name(f"{path.stem}{suffix}.json")
    else:
        path = path / f"input_pipeline-{datetime.date.today().isoformat()}-{platform.node() or 'host'}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, results)
    print(f"wrote {path}")


def _machine() -> dict:
    import tensorflow as tf

    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "numpy": np.__version__,
            "cpu_class": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other",
            "avx512_bf16": "avx512_bf16" in flags}


if __name__ == "__main__":
    sys.exit(main())
