"""timm's own loop channels-first against channels-last, in one process (the timm engine's
layout decision, ``osteo.device.choose_layout``, on a CPU).

``models.py`` runs each row in its own process, and on the 2-core VM a process's speed moves
20-40% between starts: a layout decision read across processes can follow the starts rather
than the layout. Here both loops (``models.TimmRow``, the same model, optimizer and batch)
live in one process and alternate windows, A B then B A; each round's ratio is
channels-last over channels-first, and the median with its range is printed per backbone.

    KERAS_BACKEND=torch python benchmarks/layout.py --models vgg16,vgg19 --size 64 --window 12 --rounds 8

``--infer``: inference instead of training, as ``osteo predict`` and ``osteo eval`` run it: the
run's classifier rebuilt as :func:`osteo.predict.load_best` builds it (weights none, the timm
engine in each layout), ``model.predict`` on ``--images`` images at ``--batch`` (predict's
default batch, 32), in float32 as predict (``--precision`` is not read), in ``osteo``'s process
settings (Keras' optional imports left out; glibc's malloc and libgomp's spin waits as they are,
which only ``osteo train`` changes).

Results: one JSON, ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


class PredictRow:
    """``osteo predict``'s model in one layout: the classifier load_best builds, its ``model.predict``."""

    def __init__(self, name: str, size: int, batch: int, images: int, channels_last: bool):
        import numpy as np

        from osteo.classifier import Classifier

        self.model = Classifier(name, image_size=size, weights="none", impl="timm",
                                channels_last=channels_last).build()
        self.x = np.random.default_rng(0).uniform(0, 255, (images, size, size, 1)).astype("float32")
        self.batch = batch

    def warm(self) -> None:
        self.model.predict(self.x, batch_size=self.batch, verbose=0)

    def window(self, seconds: float, _memory: str = "") -> dict:
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds:
            self.model.predict(self.x, batch_size=self.batch, verbose=0)
            n += len(self.x)
        return {"img_s": n / (time.perf_counter() - start)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="vgg16,vgg19")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", choices=("float32", "mixed_bfloat16"), default="float32")
    p.add_argument("--window", type=float, default=12.0, help="seconds of training per timed window")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default=str(HERE / "results"), help="a folder, or a .json file")
    p.add_argument("--infer", action="store_true", help="osteo predict's model.predict, not timm's training loop")
    p.add_argument("--images", type=int, default=64, help="--infer: images per model.predict call")
    args = p.parse_args()
    if args.infer and args.batch == p.get_default("batch"):
        args.batch = 32  # osteo predict's
    out = Path(args.out)
    if out.suffix != ".json":
        what = "layout-infer" if args.infer else "layout"
        out = out / f"{datetime.date.today().isoformat()}-{platform.node() or 'host'}-{what}-{args.size}.json"
    import models  # torch-free

    from osteo import _lean, device

    settings = {"imports": _lean.install()} if args.infer else models.as_osteo_train()
    report = {"size": args.size, "batch": args.batch, "window_s": args.window,
              "precision": "float32" if args.infer else args.precision,  # predict's, whatever --precision says
              **({"images": args.images} if args.infer else {}),
              "mode": "infer: model.predict, as osteo predict" if args.infer else "train: timm's own loop",
              **settings, "models": {}, "cpu_class": device.probe().cpu_class}
    for name in args.models.split(","):
        rows = {layout: (PredictRow(name, args.size, args.batch, args.images, layout == "cl") if args.infer else
                         models.TimmRow({"model": name, "size": args.size, "batch": args.batch, "compile": False,
                                         "precision": args.precision, "channels_last": layout == "cl"}))
                for layout in ("cf", "cl")}
        for row in rows.values():
            row.warm()
        img_s: dict[str, list[float]] = {k: [] for k in rows}
        for r in range(args.rounds):
            for k in (("cf", "cl") if r % 2 == 0 else ("cl", "cf")):
                img_s[k].append(rows[k].window(args.window, "memory")["img_s"])
            print(name, args.size, "round", r + 1, {k: v[-1] for k, v in img_s.items()}, flush=True)
        ratios = [cl / cf for cf, cl in zip(img_s["cf"], img_s["cl"])]
        report["models"][name] = {"img_s": img_s, "cl_over_cf": [round(v, 3) for v in ratios],
                                  "median": round(statistics.median(ratios), 3),
                                  "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
        print(name, args.size, "channels-last / channels-first:", report["models"][name]["median"],
              f"({report['models'][name]['min']}-{report['models'][name]['max']})", flush=True)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
