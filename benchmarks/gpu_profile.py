"""Where osteo's timm engine loses to timm's own loop on a GPU: one process, one backbone at a
time, the same module trained five ways, then both loops under torch.profiler.

    KERAS_BACKEND=torch python benchmarks/gpu_profile.py --models vgg16,densenet169 --out DIR

Rows (images/sec, median of --repeats windows of --window seconds, interleaved):
- ``timm cl``: timm's eager loop, channels-last (``timm cf``, channels-first, where osteo's plan
  picks that: VGG on an AVX2 CPU from 128 px; every row is in that layout), bf16 autocast
  (``--precision float32``: none; the CPU decision where the CPU has no bfloat16 instructions)
  (benchmarks/models.py's TimmRow);
- ``timm cl fused`` (on a CPU only): the same loop on a copy of the model with torch's fused Adam,
  which osteo's optimizer is (on a GPU ``timm cl`` is already fused); the CPU default is one kernel
  per tensor;
- ``module``: osteo's own timm module (TimmLayer.module, as built by osteo) in that same loop;
- ``model eager``: osteo's whole Keras model called by a plain PyTorch loop (forward, loss,
  backward, torch's fused Adam): Keras' layers and casts, without Keras' trainer;
- ``fit``: ``model.fit`` as ``osteo train`` runs it (FusedAdam, metrics, TorchFeed);
- ``fit+callbacks``: the same with the per-batch callbacks ``osteo train`` adds.
Then a profile of a few steps of ``timm cl`` and ``fit``: the top device kernels and host
ops, the host time per step, and the device syncs. Also the memory formats osteo's module
sees. Writes profile.json and profile.log into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # models.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def log(*a):
    print(*a, flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="vgg16,densenet169,convnext_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--window", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prof-steps", type=int, default=6)
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--precision", choices=("mixed_bfloat16", "float32"), default="mixed_bfloat16",
                   help="both loops' precision: float32 is osteo's decision on an AVX2 CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_profile"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import models  # torch-free: osteo train's malloc and OpenMP settings, before torch loads

    settings = models.as_osteo_train()
    import keras
    import timm
    import torch

    from osteo import device

    device.set_determinism(0, deterministic=False)
    t_start = time.perf_counter()
    report = {"precision": args.precision, **settings, "torch": torch.__version__, "keras": keras.__version__,
              "timm": timm.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "models": {}}

    for name in args.models.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            log(f"skipped {name}: budget spent")
            continue
        report["models"][name] = profile_model(name, args, out)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "profile.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


def profile_model(name: str, args, out: Path) -> dict:
    """Every row and both profiles for one backbone (see the module's docstring)."""
    import keras
    import timm
    import torch

    from osteo import device
    from osteo.callbacks import HistoryCSV, NonFiniteLoss, callback_list
    from osteo.classifier import Classifier, SparseCrossEntropy, default_metrics
    from osteo.data.feed import TorchFeed
    from osteo.data.pipeline import SCALE
    from osteo.optim import make_optimizer
    from osteo.recipe import AugmentConfig
    from osteo.registry import get_backbone

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    bf16 = args.precision == "mixed_bfloat16"
    bs, size = args.batch, args.size
    r: dict = {"rows": {}}
    spec = get_backbone(name)
    # the layout osteo train's plan picks (VGG on AVX2 from 128 px: channels-first), for osteo's module and
    # timm's loop alike, so the rows compare the loops, not the layouts
    layout = device.choose_layout(spec, device.probe(), "torch", "timm", size)
    r["osteo_layout"] = ("channels-last" if layout[0] else "channels-first", layout[1])
    log(name, "layout:", *r["osteo_layout"])
    fmt = torch.channels_last if layout[0] else torch.contiguous_format
    timm_row = "timm cl" if layout[0] else "timm cf"
    # --- timm's loop
    torch.manual_seed(0)
    if name.startswith("vgg"):
        base = timm.create_model(spec.timm_name, pretrained=False)
        ref = torch.nn.Sequential(base.features, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(512, 3))
    else:
        base = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        ref = torch.nn.Sequential(base, torch.nn.Linear(base.num_features, 3))
    ref = ref.to(dev, memory_format=fmt).train()
    ref_opt = torch.optim.Adam(ref.parameters(), 1e-4, fused=dev == "cuda")
    xr = torch.rand(bs, 3, size, size, device=dev).contiguous(memory_format=fmt)
    yr = torch.randint(0, 3, (bs,), device=dev)
    # on a CPU, a twin of timm's model with its own fused Adam (osteo's optimizer)
    ref_fused = copy.deepcopy(ref) if dev == "cpu" else None
    ref_fused_opt = torch.optim.Adam(ref_fused.parameters(), 1e-4, fused=True) if ref_fused is not None else None

    def ref_step(model=ref, opt=ref_opt, x=xr):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), yr)
        loss.backward()
        opt.step()

    # --- osteo's model, built as benchmarks/models.py's OsteoRow does
    keras.mixed_precision.set_dtype_policy(args.precision)
    clf = Classifier(name, image_size=size, weights="none", freeze_bn=False,
                     augment=AugmentConfig(flip=False, zoom=0.0, shear=0.0), impl="timm", channels_last=layout[0])
    model = clf.build()
    keras.mixed_precision.set_dtype_policy("float32")
    clf.unfreeze_backbone(0)
    module = clf.engine.layer.module
    formats = []

    def hook(m, inp):
        x = inp[0]
        formats.append([bool(x.is_contiguous(memory_format=torch.channels_last)), bool(x.is_contiguous()),
                        bool(m.weight.is_contiguous(memory_format=torch.channels_last)), str(x.dtype)])

    handles = [m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4 * bs, size, size, 1)).astype("float32")
    y = (np.arange(len(x)) % 3).astype("int32")
    feed = TorchFeed(np.round(x * SCALE).astype("uint16"), y, bs, training=True)
    xb, _ = feed[0]
    with torch.no_grad():
        model(xb, training=True)
    for h in handles:
        h.remove()
    r["conv_formats"] = {"n": len(formats), "input_cl": sum(f[0] for f in formats),
                         "input_contiguous": sum(f[1] for f in formats),
                         "weight_cl": sum(f[2] for f in formats), "first": formats[:2]}
    log(name, "conv formats", r["conv_formats"])

    # osteo's module in timm's loop
    nf = clf.engine.layer.num_features
    mod_head = torch.nn.Linear(nf, 3).to(dev)
    mod_params = list(module.parameters()) + list(mod_head.parameters())
    mod_opt = torch.optim.Adam(mod_params, 1e-4, fused=dev == "cuda")

    def module_step():
        mod_opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            f = module.forward_features(xr)
            loss = torch.nn.functional.cross_entropy(mod_head(f.mean((2, 3))), yr)
        loss.backward()
        mod_opt.step()

    # osteo's Keras model in a plain loop
    params = [v.value for v in model.trainable_variables]
    eager_opt = torch.optim.Adam(params, 1e-4, fused=dev == "cuda")
    yt = torch.as_tensor(y[:bs].astype("int64"), device=dev)

    def eager_step():
        eager_opt.zero_grad(set_to_none=True)
        probs = model(xb, training=True)
        loss = torch.nn.functional.nll_loss(torch.log(probs.float() + 1e-7), yt)
        loss.backward()
        eager_opt.step()

    # osteo's fit
    model.compile(make_optimizer("adam", 1e-4), SparseCrossEntropy(), metrics=default_metrics())
    fit_models = {"fit": model}

    def fit_window(m, steps: int, extra=()) -> float:
        marks = []

        class Clock(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if batch == 1:
                    sync()
                    marks.append(time.perf_counter())

        callbacks = callback_list([Clock(), *extra], m, epochs=1, steps=steps + 1)  # as osteo train lists them
        m.fit(feed, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=callbacks)
        sync()
        return steps * bs / (time.perf_counter() - marks[0])

    def loop_window(step, steps: int) -> float:
        step()
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return steps * bs / (time.perf_counter() - t)

    def osteo_callbacks():  # the per-batch ones osteo train adds
        return [NonFiniteLoss(), HistoryCSV(out / "history.csv", images_per_epoch=bs)]

    # warm everything (cuDNN autotuning) and size the windows from timm's rate
    t = time.perf_counter()
    for s in (ref_step, module_step, eager_step):
        s()
    if ref_fused is not None:
        ref_step(model=ref_fused, opt=ref_fused_opt)
    fit_window(fit_models["fit"], 2)
    sync()
    r["warm_s"] = round(time.perf_counter() - t, 1)
    rate = loop_window(ref_step, 3)
    steps = max(5, int(args.window * rate / bs))
    r["steps_per_window"] = steps
    rows = {timm_row: lambda: loop_window(ref_step, steps),
            **({f"{timm_row} fused": lambda: loop_window(lambda: ref_step(model=ref_fused, opt=ref_fused_opt), steps)}
               if ref_fused is not None else {}),
            "module": lambda: loop_window(module_step, steps),
            "model eager": lambda: loop_window(eager_step, steps),
            "fit": lambda: fit_window(fit_models["fit"], steps),
            "fit+callbacks": lambda: fit_window(fit_models["fit"], steps, osteo_callbacks())}
    for k in range(args.repeats):
        order = list(rows)[k % len(rows):] + list(rows)[: k % len(rows)]
        for row in order:
            r["rows"].setdefault(row, []).append(round(rows[row](), 1))
        log(name, "round", k + 1, {row: v[-1] for row, v in r["rows"].items()})
    r["median"] = {row: statistics.median(v) for row, v in r["rows"].items()}
    best = r["median"][timm_row]
    r["ratio"] = {row: round(v / best, 3) for row, v in r["median"].items()}  # of the medians
    # each row over timm's loop in the same round: the median and range of those (models.py's statistic)
    per_round = {row: [a / b for a, b in zip(v, r["rows"][timm_row])] for row, v in r["rows"].items()}
    r["ratio_per_round"] = {row: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                                  "max": round(max(v), 3)} for row, v in per_round.items()}
    log(name, "median img/s", r["median"], "ratio of medians", r["ratio"])
    log(name, "per-round ratio, median (min-max)",
        {row: f"{v['median']} ({v['min']}-{v['max']})" for row, v in r["ratio_per_round"].items()})

    # profiles
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    n = args.prof_steps
    for label, run in ((timm_row, lambda: loop_window(ref_step, n)),
                       ("fit", lambda: fit_window(fit_models["fit"], n)))[: 2 if n > 0 else 0]:
        sync()
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            run()
            wall = time.perf_counter() - t
        ka = prof.key_averages()
        key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
        top_dev = sorted(ka, key=lambda e: getattr(e, key, 0), reverse=True)[:18]
        top_cpu = sorted(ka, key=lambda e: e.cpu_time_total, reverse=True)[:25]
        syncs = {e.key: e.count for e in ka if any(s in e.key for s in (
            "Synchronize", "cudaMemcpy", "item", "_local_scalar_dense", "cudaStreamWaitEvent", "copy_"))}
        dev_total = sum(getattr(e, key, 0) for e in ka) / 1e3
        r.setdefault("profile", {})[label] = {
            "wall_ms_per_step": round(wall / (n + 1) * 1e3, 2),
            "device_ms_per_step": round(dev_total / (n + 1), 2),
            "syncs": syncs,
            "top_device": [(e.key[:70], e.count, round(getattr(e, key, 0) / 1e3, 2)) for e in top_dev],
            "top_host": [(e.key[:70], e.count, round(e.cpu_time_total / 1e3, 2)) for e in top_cpu],
        }
        log(f"--- profile {name} {label}: wall {wall / (n + 1) * 1e3:.1f} ms/step, device kernels "
            f"{dev_total / (n + 1):.1f} ms/step")
        log(ka.table(sort_by=key, row_limit=18, max_name_column_width=60))
        log("syncs/copies:", syncs)
    if dev == "cuda":
        torch.cuda.empty_cache()
    return r


if __name__ == "__main__":
    sys.exit(main())
