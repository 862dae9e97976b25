"""Input-pipeline throughput: osteo vs the study's ImageDataGenerator vs image_dataset_from_directory.

    python benchmarks/input_pipeline.py                      # 2,000 phantom PNGs of 512 px -> 224 px
    python benchmarks/input_pipeline.py --n 300 --large-n 40 # quick look

Same files, same output size, one process. Prints a table and writes
``benchmarks/results/input_pipeline-<date>-<host>.json``. Wall time and CPU time
(all threads of this process) are both reported: on a shared 2-core machine wall
time of identical epochs varies by up to 2x while CPU time stays put.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from osteo import CLASSES


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Timer:
    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall
        self.cpu = _cpu() - self.cpu


def ensure_phantom(root: Path, n: int, size: int, seed: int = 0) -> Path:
    from osteo.data.phantom import write_phantom

    marker = root / f".complete-{n}-{size}-{seed}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing {n} phantom images of {size} px to {root} (once) ...", flush=True)
        write_phantom(root, n=n, size=size, seed=seed)
        marker.touch()
    return root


def ensure_large_jpegs(src: Path, root: Path, n: int, size: int) -> Path:
    """Radiograph-sized JPEGs (real knee X-rays are 2,000-2,700 px) made from the phantom."""
    marker = root / f".complete-{n}-{size}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing {n} JPEGs of {size} px to {root} (once) ...", flush=True)
        files = sorted(src.rglob("*.png"))[:: max(1, len(list(src.rglob("*.png"))) // n)][:n]
        for f in files:
            out = root / f.parent.name / (f.stem + ".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(f).resize((size, size), Image.Resampling.BICUBIC).save(out, quality=92)
        marker.touch()
    return root


def bench_osteo(data: Path, size: int, batch: int, epochs: int) -> dict:
    from osteo.data.pipeline import Entry, ImageCache, make_dataset
    from osteo.data.scan import audit

    with Timer() as t_audit:
        result = audit(data)
    ok = result.ok()
    n = len(ok)
    entries = [Entry.from_row(data, r) for r in ok]
    labels = [CLASSES.index(r.label) for r in ok]
    cache_root = Path(tempfile.mkdtemp(prefix="osteo-bench-cache-"))
    try:
        cache = ImageCache(size=size, root=cache_root)
        files = [str(cache.path(e.sha256)) for e in entries]
        steps = -(-n // batch)
        with Timer() as t_first:
            cache.fill(entries)
            ds = make_dataset(files, labels, size=size, batch_size=batch, training=True, seed=0)
            it = iter(ds)
            for _ in range(steps):
                next(it)
        with Timer() as t_cached:
            for _ in range(steps * epochs):
                next(it)
        # a new run on the same data: every image from the persistent disk cache
        with Timer() as t_disk:
            for _ in make_dataset(files, labels, size=size, batch_size=batch, training=False):
                pass
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return {
        "n": n,
        "audit": _rates(n, t_audit),
        "first_epoch": _rates(n, t_first),
        "cached_epoch": _rates(n * epochs, t_cached),
        "disk_cache_epoch": _rates(n, t_disk),
    }


def bench_image_data_generator(data: Path, size: int, batch: int) -> dict:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    # The study's configuration: rescale, shear, zoom, horizontal flip.
    gen = ImageDataGenerator(rescale=1 / 255, shear_range=0.2, zoom_range=0.2, horizontal_flip=True)
    flow = gen.flow_from_directory(str(data), target_size=(size, size), batch_size=batch, class_mode="sparse", shuffle=True, seed=0)
    flow.verbose = False
    with Timer() as t:
        for _ in range(len(flow)):
            next(flow)
    return _rates(flow.n, t)


def bench_image_dataset_from_directory(data: Path, size: int, batch: int) -> dict:
    import keras

    ds = keras.utils.image_dataset_from_directory(str(data), image_size=(size, size), batch_size=batch, verbose=False)
    with Timer() as t:
        n = 0
        for x, _ in ds:
            n += int(x.shape[0])
    return _rates(n, t)


def _rates(n: int, t: Timer) -> dict:
    return {
        "images": n,
        "wall_s": round(t.wall, 3),
        "cpu_s": round(t.cpu, 3),
        "images_per_s": round(n / t.wall, 1) if t.wall > 0 else None,
        "cpu_ms_per_image": round(1000 * t.cpu / n, 3) if n else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--source-size", type=int, default=512)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="cached epochs to time")
    p.add_argument("--large-n", type=int, default=400, help="number of large JPEGs (0: skip)")
    p.add_argument("--large-size", type=int, default=2400)
    p.add_argument("--work", default="data/bench", help="where the benchmark data is kept")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    from rich.console import Console
    from rich.table import Table

    work = Path(args.work)
    data = ensure_phantom(work / f"phantom-{args.n}-{args.source_size}", args.n, args.source_size)
    results: dict = {"config": vars(args), "machine": _machine()}
    print("osteo ...", flush=True)
    results["osteo"] = bench_osteo(data, args.size, args.batch, args.epochs)
    print("ImageDataGenerator ...", flush=True)
    results["image_data_generator"] = bench_image_data_generator(data, args.size, args.batch)
    print("image_dataset_from_directory ...", flush=True)
    results["image_dataset_from_directory"] = bench_image_dataset_from_directory(data, args.size, args.batch)
    if args.large_n:
        large = ensure_large_jpegs(data, work / f"jpeg-{args.large_n}-{args.large_size}", args.large_n, args.large_size)
        print("large JPEGs ...", flush=True)
        results["large_jpeg"] = {
            "osteo": bench_osteo(large, args.size, args.batch, 1),
            "image_data_generator": bench_image_data_generator(large, args.size, args.batch),
        }

    table = Table(title=f"input pipeline, {args.n} PNGs of {args.source_size} px -> {args.size} px, batch {args.batch}")
    for col in ("pipeline", "images/s (wall)", "CPU ms/image", "vs ImageDataGenerator"):
        table.add_column(col, justify="right" if col != "pipeline" else "left")
    idg = results["image_data_generator"]["images_per_s"]
    o = results["osteo"]
    rows = [
        ("ImageDataGenerator (study)", results["image_data_generator"]),
        ("image_dataset_from_directory", results["image_dataset_from_directory"]),
        ("osteo first epoch (decode+cache)", o["first_epoch"]),
        ("osteo later epoch (memory cache)", o["cached_epoch"]),
        ("osteo new run (disk cache)", o["disk_cache_epoch"]),
        ("osteo audit", o["audit"]),
    ]
    if "large_jpeg" in results:
        lj = results["large_jpeg"]
        rows += [
            (f"ImageDataGenerator, {args.large_size} px JPEG", lj["image_data_generator"]),
            (f"osteo first epoch, {args.large_size} px JPEG", lj["osteo"]["first_epoch"]),
        ]
    for name, r in rows:
        base = lj["image_data_generator"]["images_per_s"] if "JPEG" in name else idg
        table.add_row(name, f"{r['images_per_s']:,.0f}", f"{r['cpu_ms_per_image']:.2f}", f"{r['images_per_s'] / base:,.1f}x")
    Console().print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"input_pipeline-{datetime.date.today().isoformat()}-{platform.node() or 'host'}.json"
    from osteo.files import write_json

    write_json(path, results)
    print(f"wrote {path}")
    return 0


def _machine() -> dict:
    import tensorflow as tf

    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "numpy": np.__version__}


if __name__ == "__main__":
    sys.exit(main())
