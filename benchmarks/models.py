"""Model benchmark: training and inference images/sec of the study's backbones, osteo's engines vs timm.

    python benchmarks/models.py                          # 4 backbones x 224 and 64 px, every engine, two peers
    python benchmarks/models.py --full                   # + the compiled engine and the compiled peer
    python benchmarks/models.py --models convnext_tiny --sizes 224 --engines auto,timm --peers cl

Every measurement runs in its own subprocess (the Keras backend is fixed at import, and
peak memory is per process). Rows, per (backbone, size), all at one batch size and
precision (``--precision``; auto: bfloat16 where the device has it):

- osteo's engines (``--engines``): ``auto`` (what ``osteo train`` picks here, with its own
  precision and compile choices), ``keras-tf`` (keras.applications on TensorFlow),
  ``keras-torch`` (keras.applications on PyTorch), ``timm`` (timm's module inside the
  Keras model, osteo.backbones.timm_torch) and ``timm-compiled`` (the same, torch.compile);
- timm's own loop (``--peers``): ``cf`` channels-first, ``cl`` channels-last,
  ``cl-compiled``; bfloat16 autocast when the precision is mixed.

Measured: training images/sec fed by in-memory tensors and (TensorFlow installed) fed by
osteo's tf.data pipeline from its on-disk cache over at least 20 steps, their ratio
(the pipeline's efficiency), the feed alone (tf.data -> a tensor of the backend on its
device); inference images/sec; time to the first training step; peak resident memory
and peak GPU memory; model FLOPs utilisation: (training FLOPs per image x images/sec)
divided by the FLOP/s a large matrix multiply reaches in the same process, with training
FLOPs per image = 3 x the forward FLOPs (forward + two backward products).

Full fine-tuning (every layer trainable), augmentation off (the peer has none), random
inputs, Adam, batch 16 by default.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ("vgg16", "vgg19", "densenet169", "convnext_tiny")
PIPELINE_STEPS = 20  # the pipeline-fed and feed-only rates run over at least this many batches
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
    import keras
    import numpy as np

    from osteo import device
    from osteo.classifier import Classifier, SparseCrossEntropy
    from osteo.recipe import AugmentConfig
    from osteo.registry import get_backbone
    from osteo.trainer import make_optimizer

    name, size, bs, steps = cfg["model"], cfg["size"], cfg["batch"], cfg["steps"]
    jit = cfg["jit"] if isinstance(cfg["jit"], str) else ("on" if cfg["jit"] else "off")
    # what `osteo train` would choose here for what was left to auto
    plan = device.plan(get_backbone(name), device.probe(), backend=keras.backend.backend(),
                       precision=cfg["precision"], jit_compile=jit, impl=cfg.get("impl", "auto"),
                       planned_images=cfg.get("planned_images", 0))
    cfg["precision"], cfg["jit"], cfg["impl"] = plan.precision, plan.jit_compile, plan.impl
    compile_backbone = plan.jit_compile and plan.impl == "timm"
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(cfg["precision"])
    clf = Classifier(name, image_size=size, weights="none", freeze_bn=False,
                     augment=AugmentConfig(flip=False, zoom=0.0, shear=0.0), impl=plan.impl,
                     compile_backbone=compile_backbone)
    model = clf.build()
    keras.mixed_precision.set_dtype_policy("float32")
    clf.unfreeze_backbone(0)
    # the optimizer `osteo train` uses: Adam, through PyTorch's fused kernel on PyTorch
    model.compile(make_optimizer("adam", 1e-4), SparseCrossEntropy(), jit_compile=plan.jit_compile and not compile_backbone)
    rng = np.random.default_rng(0)
    n = bs * (steps + 2)
    x = rng.uniform(0, 255, (n, size, size, 1)).astype("float32")
    y = rng.integers(0, 3, n).astype("int32")
    out = {"params": int(model.count_params()), "precision": cfg["precision"], "jit": cfg["jit"], "impl": plan.impl}

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

    def feed():  # the input pipeline alone: tf.data from the cache -> a torch tensor on the device
        out["feed_img_s"] = round(_feed_rate(cfg, x, y), 1)

    extra = (pipeline, feed) if cfg.get("pipeline") else ()
    for step in (*extra, inference, mfu):
        _keep_going(out, step)
    out.update(device.peak_memory_mb())
    return out


def _keep_going(out: dict, step) -> None:
    """Run one reporting step; its failure goes into ``out["errors"]`` beside the measurements."""
    try:
        step()
    except Exception as e:
        out.setdefault("errors", {})[step.__name__] = f"{type(e).__name__}: {str(e)[:160]}"


@contextlib.contextmanager
def _cached_dataset(cfg, x, y, min_steps: int = PIPELINE_STEPS):
    """osteo's tf.data pipeline over an on-disk cache of ``x`` (repeated to ``min_steps`` batches)."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    from osteo.data.pipeline import HEADER_BYTES, SCALE, make_dataset

    size, bs = cfg["size"], cfg["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, img in enumerate(x):
            path = os.path.join(tmp, f"{i}.tensor")
            data = tf.io.serialize_tensor(tf.constant(np.round(img * SCALE).astype("uint16"))).numpy()
            Path(path).write_bytes(b" " * HEADER_BYTES + data)  # the cache's header, which the reader skips
            files.append(path)
        reps = max(1, -(-min_steps * bs // len(files)))
        files, labels = files * reps, np.tile(y, reps)
        yield make_dataset(files, labels, size=size, batch_size=bs, training=True, seed=0), len(files) // bs


def _pipeline_rate(cfg, x, y, timed_fit):
    """Training fed by osteo's tf.data pipeline from its on-disk cache (same tensors, >= 20 steps)."""
    with _cached_dataset(cfg, x, y) as (ds, steps):
        _, rate = timed_fit(ds, steps_per_epoch=steps)
    return rate


def _feed_rate(cfg, x, y) -> float:
    """Images/sec of the pipeline alone, each batch made a tensor of the backend on its device."""
    import keras

    with _cached_dataset(cfg, x, y) as (ds, steps):
        it = iter(ds)
        next(it)
        t = time.perf_counter()
        for _ in range(steps - 1):
            images, _ = next(it)
            tensor = keras.ops.convert_to_tensor(images.numpy() if hasattr(images, "numpy") else images)
        keras.ops.convert_to_numpy(tensor[0, 0, 0])  # waits for the device
        return cfg["batch"] * (steps - 1) / (time.perf_counter() - t)


def child_timm(cfg: dict) -> dict:
    import timm
    import torch

    from osteo import device
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
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if cfg.get("channels_last") else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    x = torch.rand(bs, 3, size, size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 3, (bs,), device=dev)
    bf16 = cfg["precision"] in ("bfloat16", "mixed_bfloat16")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    train_model = torch.compile(model) if cfg.get("compile") else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(train_model(x), y)
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
    flops = GFLOPS_224.get(name, 0) * 1e9 * (size / 224) ** 2 * 3
    return {"first_step_s": round(first, 2), "train_img_s": round(rate, 2), "infer_img_s": round(infer, 2),
            "peak_matmul_gflops": round(peak / 1e9, 1), "mfu": round(flops * rate / peak, 3),
            "achieved_gflops": round(flops * rate / 1e9, 1),
            **device.peak_memory_mb(),
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


# osteo's engines: (backend, model.impl, jit_compile); "auto" is what `osteo train` picks here
ENGINES = {
    "auto": ("auto", "auto", "auto"),
    "keras-tf": ("tensorflow", "keras", "off"),
    "keras-torch": ("torch", "keras", "off"),
    "timm": ("torch", "timm", "off"),
    "timm-compiled": ("torch", "timm", "on"),
}
# timm's own loop: (channels_last, torch.compile)
PEERS = {"cf": (False, False), "cl": (True, False), "cl-compiled": (True, True)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(STUDY))
    p.add_argument("--sizes", default="224,64")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps after two warm-up steps")
    p.add_argument("--engines", default="auto,keras-tf,keras-torch,timm",
                   help=f"osteo engines, of: {', '.join(ENGINES)}")
    p.add_argument("--peers", default="cf,cl", help=f"timm's own loop, of: {', '.join(PEERS)} ('' for none)")
    p.add_argument("--precision", default="auto",
                   help="of every engine but auto, and of the peers: auto (bfloat16 where the device has it), "
                        "float32 or mixed_bfloat16")
    p.add_argument("--full", action="store_true", help="also the compiled engine and the compiled peer")
    p.add_argument("--planned-images", type=int, default=50_000,
                   help="the run length `auto` plans for (the compile and short-run rules use it)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the tf.data-fed and feed-only measurements")
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p


def _precision(requested: str) -> str:
    if requested != "auto":
        return requested
    from osteo.device import probe

    d = probe()
    return "mixed_bfloat16" if (d.kind == "gpu" and d.gpu_bf16) or d.cpu_class == "avx512_bf16" else "float32"


def main() -> int:
    args = build_parser().parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    has_tf = _importable("tensorflow")
    backends = {b for b in ("tensorflow", "torch") if _importable(b)}
    engines = [e for e in args.engines.split(",") if e] + (["timm-compiled"] if args.full and "timm-compiled" not in args.engines else [])
    peers = [p for p in args.peers.split(",") if p] + (["cl-compiled"] if args.full and "cl-compiled" not in args.peers
                                                       else [])
    unknown = [e for e in engines if e not in ENGINES] + [p for p in peers if p not in PEERS]
    if unknown:
        console.print(f"unknown engine or peer: {', '.join(unknown)}")
        return 2
    precision = _precision(args.precision)
    use_timm = _importable("timm") and "torch" in backends
    rows = []
    for model in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            base = {"model": model, "size": size, "batch": args.batch, "steps": args.steps}
            for engine in engines:
                backend, impl, jit = ENGINES[engine]
                if engine == "auto":
                    from osteo import device
                    from osteo.registry import get_backbone

                    backend, _ = device.choose_backend("auto", get_backbone(model), device.probe(),
                                                       args.planned_images, tuple(sorted(backends)))
                if backend not in backends or (impl == "timm" and not use_timm):
                    continue
                # the pipeline-fed runs double the cost: by default at small sizes, where the feed matters
                pipeline = has_tf and not args.no_pipeline and (args.full or size <= 64)
                cfg = {**base, "backend": backend, "impl": impl, "jit": jit, "pipeline": pipeline,
                       "precision": "auto" if engine == "auto" else precision,
                       "planned_images": args.planned_images}
                console.print(f"osteo {engine} {model} {size}px ...", highlight=False)
                rows.append({"engine": engine, **cfg, **run_child("keras", cfg, sys.executable, args.timeout)})
                _say(console, rows[-1])
            for peer in peers if use_timm else ():
                channels_last, compiled = PEERS[peer]
                cfg = {**base, "backend": "torch", "impl": "timm-own", "precision": precision, "jit": compiled,
                       "channels_last": channels_last, "compile": compiled}
                console.print(f"timm own loop {peer} {model} {size}px ...", highlight=False)
                rows.append({"engine": f"timm-own-{peer}", **cfg, **run_child("timm", cfg, sys.executable,
                                                                              args.timeout)})
                _say(console, rows[-1])
    _ratios(rows)
    table = Table(title=f"training and inference images/sec (batch {args.batch}, full fine-tuning)")
    for col in ("engine", "model", "px", "backend", "precision", "jit", "train img/s", "pipeline eff.",
                "feed img/s", "infer img/s", "first step s", "MFU", "peak MB", "vs timm best"):
        table.add_column(col, justify="left" if col in ("engine", "model", "backend", "precision") else "right")
    g = lambda r, k: "-" if r.get(k) is None else str(r[k])
    for r in rows:
        peak = r.get("peak_gpu_mb") or r.get("peak_rss_mb")
        table.add_row(r["engine"], r["model"], str(r["size"]), r["backend"], str(r["precision"]),
                      "on" if r["jit"] in (True, "on") else "off",
                      g(r, "train_img_s") if "error" not in r else r["error"][:40], g(r, "pipeline_efficiency"),
                      g(r, "feed_img_s"), g(r, "infer_img_s"), g(r, "first_step_s"), g(r, "mfu"),
                      "-" if peak is None else str(peak), g(r, "vs_timm_best"))
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.date.today().isoformat()}-{platform.node() or 'host'}-models.json"
    path.write_text(json.dumps({"host": platform.node(), "cpu": _cpu_name(), "args": vars(args), "rows": rows},
                               indent=2) + "\n")
    console.print(f"wrote {path}")
    return 0


def _say(console, row: dict) -> None:
    keys = ("impl", "precision", "jit", "train_img_s", "pipeline_efficiency", "feed_img_s", "infer_img_s",
            "first_step_s", "mfu", "peak_rss_mb", "peak_gpu_mb", "error", "errors")
    console.print("   " + ", ".join(f"{k} {row[k]}" for k in keys if k in row), highlight=False)


def _ratios(rows: list[dict]) -> None:
    best = {}
    for r in rows:
        if r["impl"] == "timm-own" and r.get("train_img_s"):
            key = (r["model"], r["size"])
            best[key] = max(best.get(key, 0), r["train_img_s"])
    for r in rows:
        key = (r["model"], r["size"])
        if r["impl"] != "timm-own" and r.get("train_img_s") and key in best:
            r["vs_timm_best"] = round(r["train_img_s"] / best[key], 2)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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
