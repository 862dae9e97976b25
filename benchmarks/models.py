"""Model benchmark: training and inference images/sec of the study's backbones, osteo vs timm.

    python benchmarks/models.py                          # default set, under 10 minutes on 2 cores
    python benchmarks/models.py --full                   # every backend x precision x jit x size
    python benchmarks/models.py --models convnext_tiny --sizes 224 --configs torch:float32:off
    KERAS_BACKEND=torch python benchmarks/models.py --no-pipeline   # a machine with PyTorch only

Every measurement runs in its own subprocess (the Keras backend is fixed at import,
and peak memory is per process). For each (backbone, size, backend, precision,
jit_compile):

- training images/sec fed by in-memory tensors, and (TensorFlow installed) fed by
  osteo's tf.data pipeline from its cache: their ratio is the pipeline efficiency;
- inference images/sec; time to the first training step; peak resident memory;
- model FLOPs utilisation: (training FLOPs per image x images/sec) divided by the
  FLOP/s a large matrix multiply reaches in the same process. Training FLOPs per
  image = 3 x the forward FLOPs (forward + two backward products).

Full fine-tuning (every layer trainable), augmentation off (the peer has none),
random inputs, Adam, batch 16 by default. The peer is timm on PyTorch (``--timm``,
needs the ``bench`` extra in ``.venv-bench``): the same architecture, global
pooling and a linear head, float32 and bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ("vgg16", "vgg19", "densenet169", "convnext_tiny")
# Forward GFLOPs per image at 224 px without the ImageNet classifier (2 x multiply-adds).
GFLOPS_224 = {"vgg16": 30.7, "vgg19": 39.0, "densenet169": 6.7, "convnext_tiny": 8.9, "resnet50": 8.2,
              "efficientnetv2_b0": 1.4, "mobilenetv3_large": 0.44}


# --------------------------------------------------------------------------- children


def _peak_matmul(backend: str, dtype: str, n: int = 2048) -> float:
    """FLOP/s of an n^3 matrix multiply, the best of a few."""
    import keras

    a = keras.random.normal((n, n), dtype=dtype)
    b = keras.random.normal((n, n), dtype=dtype)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        c = keras.ops.matmul(a, b)
        # NumPy has no bfloat16: read the result back as float32 (it also waits for the device)
        float(keras.ops.convert_to_numpy(keras.ops.cast(c[0, 0], "float32")))
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def child_keras(cfg: dict) -> dict:
    import resource

    import keras
    import numpy as np

    from osteo.classifier import Classifier, SparseCrossEntropy
    from osteo.recipe import AugmentConfig

    name, size, bs, steps = cfg["model"], cfg["size"], cfg["batch"], cfg["steps"]
    if "auto" in (cfg["precision"], cfg["jit"]):  # what `osteo train` would choose here
        from osteo import device
        from osteo.registry import get_backbone

        jit = cfg["jit"] if isinstance(cfg["jit"], str) else ("on" if cfg["jit"] else "off")
        plan = device.plan(get_backbone(name), device.probe(), backend=keras.backend.backend(),
                           precision=cfg["precision"], jit_compile=jit)
        cfg["precision"], cfg["jit"] = plan.precision, plan.jit_compile
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(cfg["precision"])
    clf = Classifier(name, image_size=size, weights="none", freeze_bn=False,
                     augment=AugmentConfig(flip=False, zoom=0.0, shear=0.0))
    model = clf.build()
    keras.mixed_precision.set_dtype_policy("float32")
    clf.unfreeze_backbone(0)
    model.compile(keras.optimizers.Adam(1e-4), SparseCrossEntropy(), jit_compile=cfg["jit"])
    rng = np.random.default_rng(0)
    n = bs * (steps + 2)
    x = rng.uniform(0, 255, (n, size, size, 1)).astype("float32")
    y = rng.integers(0, 3, n).astype("int32")
    out = {"params": int(model.count_params()), "precision": cfg["precision"], "jit": cfg["jit"]}

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    def timed_fit(data, **kw):
        clock = Clock()
        t0 = time.perf_counter()
        model.fit(data, epochs=1, verbose=0, callbacks=[clock], **kw)
        first = clock.times[0] - t0
        rate = bs * (len(clock.times) - 2) / (clock.times[-1] - clock.times[1])
        return first, rate

    first, rate = timed_fit(x, y=y, batch_size=bs, shuffle=False)
    out.update(first_step_s=round(first, 2), train_img_s=round(rate, 2))
    # the training rate is measured: a later step that fails is recorded beside it, never loses it

    def pipeline():
        out["pipeline_train_img_s"] = round(_pipeline_rate(cfg, x, y, timed_fit), 2)
        out["pipeline_efficiency"] = round(out["pipeline_train_img_s"] / rate, 3)

    def inference():
        model.predict(x[: bs * 2], batch_size=bs, verbose=0)
        t = time.perf_counter()
        model.predict(x, batch_size=bs, verbose=0)
        out["infer_img_s"] = round(n / (time.perf_counter() - t), 2)

    def mfu():
        flops = GFLOPS_224.get(name, 0) * 1e9 * (size / 224) ** 2 * 3
        dtype = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(cfg["precision"], "float32")
        peak = _peak_matmul(keras.backend.backend(), dtype)
        out.update(peak_matmul_gflops=round(peak / 1e9, 1), achieved_gflops=round(flops * rate / 1e9, 1),
                   mfu=round(flops * rate / peak, 3) if peak else None)

    for step in ((pipeline,) if cfg.get("pipeline") else ()) + (inference, mfu):
        _keep_going(out, step)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _keep_going(out: dict, step) -> None:
    """Run one reporting step; its failure goes into ``out["errors"]`` beside the measurements."""
    try:
        step()
    except Exception as e:
        out.setdefault("errors", {})[step.__name__] = f"{type(e).__name__}: {str(e)[:160]}"


def _pipeline_rate(cfg, x, y, timed_fit):
    """Training fed by osteo's tf.data pipeline from its on-disk cache (same tensors)."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    from osteo.data.pipeline import SCALE, make_dataset

    size, bs = cfg["size"], cfg["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, img in enumerate(x):
            path = os.path.join(tmp, f"{i}.tensor")
            data = tf.io.serialize_tensor(tf.constant(np.round(img * SCALE).astype("uint16"))).numpy()
            Path(path).write_bytes(data)
            files.append(path)
        ds = make_dataset(files, y, size=size, batch_size=bs, training=True, seed=0)
        _, rate = timed_fit(ds, steps_per_epoch=len(files) // bs)
    return rate


def child_timm(cfg: dict) -> dict:
    import resource

    import timm
    import torch

    from osteo.registry import get_backbone

    name, size, bs, steps = cfg["model"], cfg["size"], cfg["batch"], cfg["steps"]
    torch.manual_seed(0)
    if name.startswith("vgg"):
        base = timm.create_model(get_backbone(name).timm_name, pretrained=False)
        model = torch.nn.Sequential(base.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(512, 3))
    else:
        base = timm.create_model(get_backbone(name).timm_name, pretrained=False, num_classes=0)
        model = torch.nn.Sequential(base, torch.nn.Linear(base.num_features, 3))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(bs, 3, size, size, device=dev)
    y = torch.randint(0, 3, (bs,), device=dev)
    bf16 = cfg["precision"] == "bfloat16"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    model.train()
    t = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t
    step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    rate = bs * steps / (time.perf_counter() - t)
    model.eval()
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        model(x)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync()
        infer = bs * steps / (time.perf_counter() - t)
    n = 2048 if dev == "cpu" else 8192
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    if bf16:
        a, b = a.bfloat16(), b.bfloat16()
    best = min(_timeit(lambda: (a @ b, sync())) for _ in range(4))
    peak = 2 * n**3 / best
    flops = GFLOPS_224[name] * 1e9 * (size / 224) ** 2 * 3
    return {"first_step_s": round(first, 2), "train_img_s": round(rate, 2), "infer_img_s": round(infer, 2),
            "peak_matmul_gflops": round(peak / 1e9, 1), "mfu": round(flops * rate / peak, 3),
            "achieved_gflops": round(flops * rate / 1e9, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
            "timm": timm.__version__}


def _timeit(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --------------------------------------------------------------------------- parent


def run_child(kind: str, cfg: dict, python: str, timeout: int) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if kind == "keras":
        env["KERAS_BACKEND"] = cfg["backend"]
    code = f"import json,sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import models; " \
           f"print('RESULT' + json.dumps(models.child_{kind}(json.loads(sys.argv[1]))))"
    try:
        proc = subprocess.run([python, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(STUDY))
    p.add_argument("--sizes", default="224,48")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps after two warm-up steps")
    p.add_argument("--configs", default="", help="backend:precision:jit,... (default: a set per model)")
    p.add_argument("--full", action="store_true", help="every backend x precision x jit")
    p.add_argument("--timm", default="auto", help="python of the bench venv for timm ('auto': .venv-bench, 'off')")
    p.add_argument("--no-pipeline", action="store_true", help="skip the tf.data-fed measurement")
    p.add_argument("--compare-tf", action="store_true", help="also TensorFlow float32 where auto picks PyTorch")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def main() -> int:
    args = build_parser().parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    has_tf = _importable("tensorflow")
    backends = [b for b in ("tensorflow", "torch") if _importable(b)]
    timm_python = str(ROOT / ".venv-bench" / "bin" / "python") if args.timm == "auto" else args.timm
    timm_python = shutil.which(timm_python) or timm_python
    use_timm = args.timm != "off" and os.path.exists(timm_python)
    rows = []
    for model in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            if args.configs:
                configs = [(b, pr, j == "on") for b, pr, j in (c.split(":") for c in args.configs.split(","))]
            elif args.full:
                configs = [(b, pr, j) for b in backends for pr in ("float32", "mixed_bfloat16", "mixed_float16")
                           for j in ((False, True) if b == "tensorflow" else (False,))]
            else:  # what `osteo train` picks by default here, and float32 on TensorFlow beside it
                from osteo import device
                from osteo.registry import get_backbone

                backend, _ = device.choose_backend("auto", get_backbone(model), device.probe(), 1000)
                configs = [(backend, "auto", "auto")]
                if args.compare_tf and configs[0][0] != "tensorflow" and "tensorflow" in backends:
                    configs.append(("tensorflow", "float32", False))
            for backend, precision, jit in configs:
                if backend not in backends:
                    continue
                # the pipeline-fed run doubles the cost; by default only at small sizes, where it matters
                pipeline = has_tf and not args.no_pipeline and (args.full or size <= 64)
                cfg = {"model": model, "size": size, "batch": args.batch, "steps": args.steps, "backend": backend,
                       "precision": precision, "jit": jit, "pipeline": pipeline}
                console.print(f"osteo {model} {size}px {backend} {precision} jit={jit if isinstance(jit, str) else ('on' if jit else 'off')} ...",
                              highlight=False)
                result = run_child("keras", cfg, sys.executable, args.timeout)
                rows.append({"impl": "osteo", **cfg, **result, "requested": f"{precision}/{jit}"})
                _say(console, rows[-1])
            if use_timm:
                for precision in ("float32", "bfloat16") if (args.full or _cpu_bf16()) else ("float32",):
                    cfg = {"model": model, "size": size, "batch": args.batch, "steps": args.steps,
                           "backend": "torch", "precision": precision, "jit": False}
                    console.print(f"timm {model} {size}px {precision} ...", highlight=False)
                    rows.append({"impl": "timm", **cfg, **run_child("timm", cfg, timm_python, args.timeout)})
                    _say(console, rows[-1])
    _ratios(rows)
    table = Table(title=f"training and inference images/sec (batch {args.batch}, full fine-tuning, CPU)")
    for col in ("impl", "model", "px", "backend", "precision", "jit", "train img/s", "pipeline eff.",
                "infer img/s", "first step s", "MFU", "peak MB", "vs timm best"):
        table.add_column(col, justify="left" if col in ("impl", "model", "backend", "precision") else "right")
    g = lambda r, k: "-" if r.get(k) is None else str(r[k])
    for r in rows:
        table.add_row(r["impl"], r["model"], str(r["size"]), r["backend"], r["precision"], "on" if r["jit"] else "off",
                      g(r, "train_img_s") if "error" not in r else r["error"][:40], g(r, "pipeline_efficiency"),
                      g(r, "infer_img_s"), g(r, "first_step_s"), g(r, "mfu"), g(r, "peak_rss_mb"),
                      g(r, "vs_timm_best"))
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.date.today().isoformat()}-{platform.node() or 'host'}-models.json"
    path.write_text(json.dumps({"host": platform.node(), "cpu": _cpu_name(), "args": vars(args), "rows": rows},
                               indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


def _say(console, row: dict) -> None:
    keys = ("train_img_s", "pipeline_efficiency", "infer_img_s", "first_step_s", "mfu", "peak_rss_mb", "error",
            "errors")
    console.print("   " + ", ".join(f"{k} {row[k]}" for k in keys if k in row), highlight=False)


def _ratios(rows: list[dict]) -> None:
    best = {}
    for r in rows:
        if r["impl"] == "timm" and r.get("train_img_s"):
            key = (r["model"], r["size"])
            best[key] = max(best.get(key, 0), r["train_img_s"])
    for r in rows:
        key = (r["model"], r["size"])
        if r["impl"] == "osteo" and r.get("train_img_s") and key in best:
            r["vs_timm_best"] = round(r["train_img_s"] / best[key], 2)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _cpu_bf16() -> bool:
    from osteo.device import cpu_class

    return cpu_class() == "avx512_bf16"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
