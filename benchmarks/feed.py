"""The host feed at GPU rates: osteo's cached uint16 images -> float batches on the device.

    KERAS_BACKEND=torch python benchmarks/feed.py --size 224 --batch 128

What osteo's training input does for each batch (``osteo.data.pipeline.make_dataset``,
training): the split is held in memory as uint16 ``(N, size, size, 1)`` (the cache's
dtype: [0, 255] scaled by ``SCALE`` = 257); a batch is a gather of B images by a seeded
permutation, cast to float32 and divided by ``SCALE`` on the host (inside tf.data), and
Keras' data adapter makes the float32 NumPy batch a tensor on the device
(``keras.ops.convert_to_tensor``: a copy from pageable host memory). Rows:

- ``osteo tf.data`` (where TensorFlow is installed): ``make_dataset`` itself over an
  on-disk cache, each batch through ``keras.ops.convert_to_tensor``;
- ``float32 pageable``: the same gather and arithmetic in NumPy, then
  ``keras.ops.convert_to_tensor``: osteo's path without tf.data (one host thread);
- ``float32 pinned``: the float32 batch written into page-locked buffers and copied
  asynchronously (two buffers: the host fills one while the other travels);
- ``uint16 pageable`` / ``uint16 pinned``: the uint16 batch crosses the bus (half the
  bytes), cast and divided on the device.

Per row: images/sec over ``--seconds`` (the device finished), the host CPU time per batch
(this process, all threads; CUDA waits block instead of spinning, so they cost none) and
the bytes per second that crossed to the device. Without CUDA (the CPU dry run) the
pinned rows are skipped and "the device" is the CPU.

osteo.data.pipeline imports TensorFlow at module level and does its cast inside a
tf.data lambda: without TensorFlow (the GPU machine) it cannot be imported, so the NumPy
rows repeat its arithmetic; ``SCALE`` is checked against osteo's where TensorFlow is
installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SCALE = 257.0  # osteo.data.pipeline.SCALE: [0, 255] float <-> [0, 65535] uint16
TAG = "@@osteo-bench "  # as benchmarks/models.py: the line it reads back
MIN_BATCHES = 5


def _run(make_batch, batch: int, seconds: float, sync) -> dict:
    """Images/sec and host CPU ms per batch of ``make_batch`` over ``seconds`` (two warm-up batches)."""
    make_batch()
    make_batch()
    sync()
    cpu = time.process_time()
    t = time.perf_counter()
    n = 0
    while n < MIN_BATCHES or time.perf_counter() - t < seconds:
        make_batch()
        n += 1
    sync()
    wall = time.perf_counter() - t
    return {"batches": n, "seconds": round(wall, 4), "img_s": round(n * batch / wall, 1),
            "cpu_ms_per_batch": round(1000 * (time.process_time() - cpu) / n, 3)}


def _orders(n: int, batch: int, seed: int = 0):
    """Index arrays of full batches, a fresh seeded permutation each epoch (as make_dataset)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield perm[i: i + batch]


def _osteo_dataset(stack, images, size: int, batch: int):
    """osteo's own training dataset over an on-disk cache of ``images`` (TensorFlow only)."""
    import numpy as np
    import tensorflow as tf

    from osteo.data import pipeline, tfdata

    if pipeline.SCALE != SCALE:
        raise RuntimeError(f"osteo's SCALE is {pipeline.SCALE}, this benchmark's {SCALE}: update feed.py")
    tmp = stack.enter_context(tempfile.TemporaryDirectory())
    files = []
    for i, img in enumerate(images):
        path = os.path.join(tmp, f"{i}.tensor")
        Path(path).write_bytes(b" " * pipeline.HEADER_BYTES + tf.io.serialize_tensor(tf.constant(img)).numpy())
        files.append(path)
    labels = np.arange(len(files)) % 3
    return iter(tfdata.make_dataset(files, labels, size=size, batch_size=batch, training=True, seed=0))


def measure(size: int, batch: int, seconds: float, n_images: int) -> dict:
    """Every row at one size and batch; a row that fails records its error beside the others."""
    import keras
    import numpy as np
    import torch

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n_images = max(n_images, 2 * batch)
    src = np.random.default_rng(0).integers(0, 65536, (n_images, size, size, 1), dtype=np.uint16)
    shape = (batch, size, size, 1)
    rows: dict[str, dict] = {}
    notes: dict[str, dict] = {}  # rows not measured here, listed after the others

    f32_order, u16_order = _orders(n_images, batch), _orders(n_images, batch)

    def f32_pageable():
        x = np.divide(np.take(src, next(f32_order), axis=0), np.float32(SCALE), dtype=np.float32)
        return keras.ops.convert_to_tensor(x)

    def u16_pageable():
        return torch.from_numpy(np.take(src, next(u16_order), axis=0)).to(dev).float().div_(SCALE)

    def pinned(dtype):
        """Double-buffered: a buffer is refilled once its last copy has arrived."""
        bufs = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(2)]
        done = [None, None]
        order, k = _orders(n_images, batch), [0]

        def make_batch():
            i = k[0] % 2
            k[0] += 1
            if done[i] is not None:
                done[i].synchronize()
            gathered = np.take(src, next(order), axis=0)
            if dtype == torch.uint16:
                np.copyto(bufs[i].numpy(), gathered)
                x = bufs[i].to(dev, non_blocking=True).float().div_(SCALE)
            else:
                np.divide(gathered, np.float32(SCALE), out=bufs[i].numpy(), dtype=np.float32)
                x = bufs[i].to(dev, non_blocking=True)
            done[i] = torch.cuda.Event(blocking=True)
            done[i].record()
            return x

        return make_batch

    plan = [("float32 pageable", f32_pageable, 4), ("uint16 pageable", u16_pageable, 2)]
    if cuda:
        plan += [("float32 pinned", pinned(torch.float32), 4), ("uint16 pinned", pinned(torch.uint16), 2)]
    else:
        notes["float32 / uint16 pinned"] = {"skipped": "no CUDA device"}
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("tensorflow") is not None:
            try:
                it = _osteo_dataset(stack, src, size, batch)

                def osteo_tf_data():
                    images, _ = next(it)
                    return keras.ops.convert_to_tensor(images.numpy())

                plan.insert(0, ("osteo tf.data", osteo_tf_data, 4))
            except Exception as e:
                notes["osteo tf.data"] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        else:
            notes["osteo tf.data"] = {"skipped": "TensorFlow is not installed"}
        for name, make_batch, itemsize in plan:
            try:
                rows[name] = _run(make_batch, batch, seconds, sync)
                rows[name]["host_to_device_gb_s"] = round(rows[name]["img_s"] * size * size * itemsize / 1e9, 2)
            except Exception as e:
                rows[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    return {"size": size, "batch": batch, "seconds": seconds, "images": n_images, "device": str(dev),
            "device_name": torch.cuda.get_device_name() if cuda else None, "keras_backend": keras.backend.backend(),
            "cpu_count": os.cpu_count(), "rows": {**rows, **notes}}


def print_table(console, report: dict, fastest: float | None = None) -> None:
    """The feed's table; ``fastest``: the fastest training rate measured beside it (img/s)."""
    from rich.table import Table

    if "error" in report:
        console.print(f"host feed: {report['error']}")
        return
    title = (f"host feed: uint16 cache -> float32 on {report['device']} ({report['size']} px, batch "
             f"{report['batch']}, ~{report['seconds']:g} s per row)")
    t = Table(title=title + (f"; x fastest training rate ({fastest:,.0f} img/s)" if fastest else ""))
    for col in ("row", "img/s", "host CPU ms/batch", "GB/s to device", *(("x fastest",) if fastest else ()), "note"):
        t.add_column(col, justify="left" if col in ("row", "note") else "right")
    for name, r in report["rows"].items():
        if "img_s" not in r:
            t.add_row(name, "-", "-", "-", *(("-",) if fastest else ()), r.get("skipped") or r.get("error", ""))
            continue
        t.add_row(name, f"{r['img_s']:,.0f}", f"{r['cpu_ms_per_batch']:.2f}", f"{r['host_to_device_gb_s']:.1f}",
                  *((f"{r['img_s'] / fastest:.1f}",) if fastest else ()), "")
    console.print(t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seconds", type=float, default=3.0, help="per row")
    p.add_argument("--images", type=int, default=1024, help="images in the cached split (uint16)")
    p.add_argument("--reply", action="store_true", help="print the result as one tagged JSON line (models.py)")
    args = p.parse_args()
    report = measure(args.size, args.batch, args.seconds, args.images)
    if args.reply:
        print(TAG + json.dumps(report), flush=True)
        return 0
    from rich.console import Console

    print_table(Console(), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
