"""Model benchmark: training images/sec of the study's backbones, osteo's engines beside timm's own loop.

    python benchmarks/models.py                        # make bench: 4 backbones at 64 px, osteo auto vs timm cf / cl
    python benchmarks/models.py --full --sizes 224,64  # every engine and peer, the compiled ones too, the pipeline
    python benchmarks/models.py --models convnext_tiny --window 3 --repeats 2   # a quick look (numbers not for quoting)

Rows, per (backbone, size) group, all at one batch size and precision (``--precision``;
auto: bfloat16 where the device has it):

- osteo's engines (``--engines``): ``auto`` (what ``osteo train`` picks here: backend,
  engine, precision, compile), ``keras-tf`` (keras.applications on TensorFlow),
  ``keras-torch`` (keras.applications on PyTorch), ``timm`` (timm's module inside the Keras
  model, osteo.backbones.timm_torch), ``timm-compiled`` (the same, torch.compile). Each is
  trained as ``osteo train`` trains: ``model.fit`` on an endless stream of NumPy batches
  (what osteo's tf.data stream hands Keras; each batch is copied to the device as it is
  used), osteo's optimizer (``make_optimizer``: FusedAdam on PyTorch), loss, metrics and
  per-batch callback (NonFiniteLoss: with it Keras reads the logs after every step, a
  device sync, as in ``osteo train``). ``--pipeline``: ``auto`` also fed by osteo's
  tf.data pipeline from its on-disk cache (row ``auto pipeline``; TensorFlow installed);
  ``--async-row``: ``auto`` also without the per-batch callback (row ``auto async``);
- timm's own eager loop (``--peers``): ``cf`` channels-first, ``cl`` channels-last,
  ``cl-compiled``; torch.optim.Adam, one input tensor kept on the device, bfloat16
  autocast when the precision is mixed, cuDNN autotuning on a GPU (as timm's train.py).
  ``cl-keras``, a probe and not one of "timm's best": the ``cl`` loop in a process that
  has also imported what osteo's row imports (Keras, osteo's model code); its rate and
  peak memory against ``cl`` are what the imports cost.

How a number is made (on a shared 2-core machine identical short runs differed 10x, so:
interleave, repeat, report medians with their spread):

1. Each row's model lives in its own process (the Keras backend is fixed at import, peak
   memory is per process), built and warmed once per start: its first step is timed (it
   holds the compile or the autotuning) and two more run untimed. Every row's process is
   started ``--starts`` times (default 2), one after the other, and the rounds are split
   between the starts (5 rounds: 3 on the first, 2 on the second): a process keeps its
   speed from round to round, but a new one of the same row may not (timm's DenseNet169 at
   224 px: 11.2-13.0 img/s in every round of one process, 17.3-19.8 in the next run's),
   and only across starts does the spread below see that. Most of that was page faults:
   every row's process keeps the memory its steps free, as ``osteo train`` does
   (``--malloc kept``, :func:`osteo.device.keep_freed_memory`), so the ratio compares the
   engines; ``--malloc default`` leaves glibc's settings. Likewise every row's process,
   timm's too, gets osteo train's OpenMP setting (``--spin osteo``,
   :func:`osteo.device.short_spin_waits`: threads spin briefly, then sleep); ``--spin
   default`` leaves libgomp's. With libgomp's default spin, a second training on the same
   2 cores slowed the rows 4-30x, at rates that jumped up to 10x from one window to the
   next (issue 20.2's busy run).
2. A timed window trains until ``--window`` seconds have passed (and at least
   ``MIN_STEPS`` steps); its first step is not timed, and the clock stops once the device
   has finished. A time budget rather than a step count fixed beforehand: a count
   calibrated during a neighbour's burst made windows of two timed steps. Default 10 s:
   a neighbour's burst of a second or two is then a small part of a window, and even a
   224 px step on a CPU (2-5 s) repeats in it; the 3-step windows before this lasted
   under a second at 64 px and gave 91.2 vs 9.77 img/s for one setting.
3. Rounds (``--repeats``, default 5): in each, every row runs one window while the others
   wait idle on their stdin (one process computing at a time, ``--pause`` apart), in an
   order that rotates from round to round (A B C, B C A, C A B), so that no row always
   runs first after the pause or right after the same neighbour. Within a round the rows
   run seconds apart, so a slowdown of the machine hits them alike and cancels in their
   ratio.
4. Per round, each osteo row's ratio to timm's best (the faster of ``cf`` and ``cl`` in
   the same round; a compiled timm engine also to the eager one). Reported per row: the median
   img/s, the median ratio and the min-max of the per-round ratios. A ratio whose rounds
   spread by more than ``FLAG_SPREAD`` (10%) of its median is FLAGGED and not reported:
   the targets it is read against have a 10% margin (>= 0.9x timm's loop), which such a
   spread cannot resolve, and the 0.22 swings seen between quiet back-to-back short runs
   are caught by it. From ``TRIM_FROM`` (5) rounds on, the spread leaves out the lowest
   and the highest round: one burst of a neighbour does not flag four rounds that agree.
5. A busy machine is said, not averaged. Each window also records the share of the
   machine's CPU time that other processes took while it ran (``others``: the busy time of
   the CPUs this process may run on, from ``/proc/stat``, steal included, less the row's
   own process time, over cores x seconds). A ratio whose row or peers ran with a median ``others``
   above ``BUSY_SHARE`` (5%) is BUSY and not reported. A steady neighbour can shift every
   round alike, so the spread does not see it: beside a second training, ConvNeXtTiny's
   rounds agreed within 3-4% on a ratio 11% below the quiet run's (timm's channels-first
   loop overtook its channels-last one under load). Quiet, windows here measured 0-2.6%.

``make bench``'s run (4 backbones at 64 px, rows auto, cf, cl) takes about 3.5 minutes a
group on a quiet 2-core machine (3 rows x 5 rounds x 10.5 s, plus two start-ups and
warm-ups and the single measurements), ~14 minutes in all (820 s); on a loaded one each
window also runs on to the end of a slower step (5.6 minutes a group at load 5).

Measured once per row after the rounds (single measurements, not for quoting alone):
time to the first step, inference images/sec (as many batches as the last training
window), peak resident and GPU memory, the feed alone (``--pipeline``: tf.data -> a tensor
of the backend on its device) and a large matrix multiply, from which model FLOPs
utilisation = (3 x forward FLOPs per image x median images/sec) / its FLOP/s. ``--feed``
adds the host feed at GPU rates (benchmarks/feed.py), first; ``--compile-check`` adds the
compiled timm engine to a backbone's group (its compile time, its rate against the eager
engine's and after how many images compiling pays). ``--single`` engines run one window
(a side measurement, no verdict). ``--budget-s``: no group starts after that many seconds.

The results JSON keeps every window's raw numbers (steps, seconds, CPU seconds, img/s).
Full fine-tuning (every layer trainable), augmentation off (the peer has none), random
inputs, batch 16 by default.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ("vgg16", "vgg19", "densenet169", "convnext_tiny")
WINDOW_S = 10.0  # seconds of training per timed window (see the module docstring)
REPEATS = 5
STARTS = 2  # each row's process is started twice, the rounds split between the starts (see run_group)
FLAG_SPREAD = 0.10  # a row whose per-round ratios spread more than this (see _spread) is FLAGGED
BUSY_SHARE = 0.05  # other processes' median share of the machine's CPU above which a ratio is BUSY
TRIM_FROM = 5  # from this many rounds on, the spread leaves out the lowest and the highest
MIN_STEPS = 3  # a window's first step is untimed: at least two timed steps
MAX_STEPS = 10**9  # an epoch never ends a window: the clock does
WARM_STEPS = 2  # untimed steps after the first, before the rounds
PAUSE_S = 0.5  # between windows: idle thread pools of the last process stop spinning
STREAM_BATCHES = 4  # distinct random batches in an osteo row's stream (and the pipeline's cache)
TAG = "@@osteo-bench "  # marks the workers' replies on their protocol channel
# Forward GFLOPs per image at 224 px without the ImageNet classifier (2 x multiply-adds).
GFLOPS_224 = {"vgg16": 30.7, "vgg19": 39.0, "densenet169": 6.7, "convnext_tiny": 8.9, "resnet50": 8.2,
              "efficientnetv2_b0": 1.4, "mobilenetv3_large": 0.44}


# --------------------------------------------------------------------------- workers (child processes)


def _peak_matmul(n: int, dtype: str) -> float:
    """FLOP/s of an n^3 matrix multiply, the best of a few, through keras.ops."""
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


def _torch_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release_cached_gpu_memory():
    """The rows of a group share one GPU: an idle row gives its cached blocks back (the next
    window allocates them again in its untimed first step)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class OsteoRow:
    """An osteo engine, built and trained as ``osteo train`` does (child of one group)."""

    def __init__(self, cfg: dict):
        import keras
        import numpy as np

        from osteo import device
        from osteo.callbacks import NonFiniteLoss, callback_list
        from osteo.classifier import Classifier, SparseCrossEntropy, default_metrics
        from osteo.optim import make_optimizer
        from osteo.recipe import AugmentConfig
        from osteo.registry import get_backbone

        self.keras = keras
        self.NonFiniteLoss, self.callback_list = NonFiniteLoss, callback_list
        name, self.size, self.bs = cfg["model"], cfg["size"], cfg["batch"]
        plan = device.plan(get_backbone(name), device.probe(), backend=keras.backend.backend(),
                           precision=cfg["precision"], jit_compile=cfg["jit"], impl=cfg["impl"],
                           planned_images=cfg["planned_images"], image_size=self.size)
        compile_backbone, keras_jit = device.get_engine(plan.impl).jit(plan.jit_compile)
        device.set_determinism(0, deterministic=False)  # as osteo train does (cuDNN autotuning on PyTorch)
        keras.mixed_precision.set_dtype_policy(plan.precision)
        self.clf = clf = Classifier(name, image_size=self.size, weights="none", freeze_bn=False,
                                    augment=AugmentConfig(flip=False, zoom=0.0, shear=0.0), impl=plan.impl,
                                    compile_backbone=compile_backbone, channels_last=plan.channels_last)
        self.model = clf.build()
        keras.mixed_precision.set_dtype_policy("float32")
        clf.unfreeze_backbone(0)
        self.model.compile(make_optimizer("adam", 1e-4), SparseCrossEntropy(), metrics=default_metrics(),
                           jit_compile=keras_jit)
        self.sync = _torch_sync if keras.backend.backend() == "torch" else (lambda: None)
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (STREAM_BATCHES * self.bs, self.size, self.size, 1)).astype("float32")
        y = (np.arange(len(x)) % 3).astype("int32")
        self.batches = [(x[i: i + self.bs], y[i: i + self.bs]) for i in range(0, len(x), self.bs)]
        self.feed = None
        if keras.backend.backend() == "torch":  # osteo train's feed there: uint16 levels to the device
            from osteo.data.feed import TorchFeed
            from osteo.data.pipeline import SCALE

            levels = np.round(x * SCALE).astype("uint16")
            self.feed = TorchFeed(levels, y, self.bs, training=True)
        self.last_steps = MIN_STEPS
        self.stack = contextlib.ExitStack()
        self.dataset = None
        self.info = {"plan": plan.to_json(), "params": int(self.model.count_params()),
                     "precision": plan.precision, "jit": plan.jit_compile, "impl": plan.impl,
                     "backend": keras.backend.backend(), "versions": _versions()}

    def _stream(self):
        """The training stream ``osteo train`` hands Keras: on PyTorch its TorchFeed (batches
        already on the device), on TensorFlow NumPy batches as tf.data's would be."""
        if self.feed is not None:
            return self.feed
        return self._numpy_batches()

    def _numpy_batches(self):
        while True:
            yield from self.batches

    def _pipeline(self):
        """osteo's tf.data training pipeline over an on-disk cache of the stream's images."""
        if self.dataset is None:
            import numpy as np
            import tensorflow as tf

            from osteo.data.pipeline import HEADER_BYTES, SCALE
            from osteo.data.tfdata import make_dataset

            tmp = self.stack.enter_context(tempfile.TemporaryDirectory())
            files, labels = [], []
            for x, y in self.batches:
                for img, label in zip(x, y):
                    path = os.path.join(tmp, f"{len(files)}.tensor")
                    data = tf.io.serialize_tensor(tf.constant(np.round(img * SCALE).astype("uint16"))).numpy()
                    Path(path).write_bytes(b" " * HEADER_BYTES + data)  # the cache's header, which the reader skips
                    files.append(path)
                    labels.append(int(label))
            self.dataset = make_dataset(files, labels, size=self.size, batch_size=self.bs, training=True, seed=0)
        return self.dataset

    def _fit(self, window_s: float, min_steps: int, feed: str = "memory", callbacks: str = "osteo") -> dict:
        """Train until ``window_s`` seconds have passed since the end of the first step (and at
        least ``min_steps`` steps); the clock stops once the device has finished.

        The clock is a batch-*begin* callback; the callbacks are listed as ``osteo train``
        lists them (:func:`osteo.callbacks.callback_list`: no per-batch read of the logs),
        with osteo's NonFiniteLoss, or without it (``callbacks="none"``).
        """
        keras, sync = self.keras, self.sync
        marks: list[float] = []
        done = [0]

        class Window(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                done[0] = batch + 1
                if batch == 1:  # the first step is not timed
                    sync()
                    marks.append(time.perf_counter())
                elif batch > 1 and done[0] >= min_steps and time.perf_counter() - marks[0] >= window_s:
                    self.model.stop_training = True  # this batch is the last

        data = self._pipeline() if feed == "pipeline" else self._stream()
        extra = [self.NonFiniteLoss()] if callbacks == "osteo" else []
        listed = self.callback_list([Window(), *extra], self.model, epochs=1, steps=MAX_STEPS)  # as osteo train's
        cpu, machine = time.process_time(), machine_cpu_s()
        t = time.perf_counter()
        self.model.fit(data, steps_per_epoch=MAX_STEPS, epochs=1, verbose=0, callbacks=listed)
        sync()
        end = time.perf_counter()
        self.last_steps = done[0]
        cpu = time.process_time() - cpu
        return {"first_s": marks[0] - t, **_window_result(done[0], self.bs, end - marks[0], cpu),
                "others": others_share(machine, cpu, end - t)}

    def warm(self) -> dict:
        out = {"first_step_s": round(self._fit(0.0, 1 + WARM_STEPS)["first_s"], 2)}
        if self.clf.compile_backbone:  # a compile that failed fell back to eager (one warning)
            out["compiled"] = self.clf.backbone.compiled
        return out

    def window(self, window_s: float, feed: str, callbacks: str = "osteo") -> dict:
        got = self._fit(window_s, MIN_STEPS, feed, callbacks)
        del got["first_s"]
        _release_cached_gpu_memory()
        return got

    def extras(self) -> dict:
        out: dict = {}
        n = max(self.last_steps, 2)

        def inference():  # as many batches as the last training window
            self.model.predict(self._stream(), steps=2, verbose=0)
            t = time.perf_counter()
            self.model.predict(self._stream(), steps=n, verbose=0)
            out["infer_img_s"] = round(n * self.bs / (time.perf_counter() - t), 2)

        def matmul():
            gpu = self.info["plan"]["runs_on"] == "gpu"
            out["peak_matmul_gflops"] = round(_peak_matmul(8192 if gpu else 2048, _compute_dtype(
                self.info["precision"])) / 1e9, 1)

        def feed():  # the input pipeline alone: tf.data from the cache -> a tensor of the backend
            keras, it = self.keras, iter(self._pipeline())
            next(it)
            k = max(n, 20)
            t = time.perf_counter()
            for _ in range(k):
                images, _ = next(it)
                tensor = keras.ops.convert_to_tensor(images.numpy())
            keras.ops.convert_to_numpy(tensor[0, 0, 0])  # waits for the device
            out["feed_img_s"] = round(self.bs * k / (time.perf_counter() - t), 1)

        for step in (inference, matmul, *((feed,) if self.dataset is not None else ())):
            _keep_going(out, step)
        _release_cached_gpu_memory()
        from osteo import device

        return {**out, **device.peak_memory_mb()}

    def close(self):
        self.stack.close()


class TimmRow:
    """timm's own eager loop (channels-first or channels-last, optionally compiled)."""

    def __init__(self, cfg: dict):
        # row cl-keras: what OsteoRow imports (Keras, osteo's model code), the loop unchanged:
        # tells the imports' cost from the engine's
        if cfg.get("osteo_imports"):
            import keras  # noqa: F401

            import osteo.callbacks
            import osteo.classifier
            import osteo.optim  # noqa: F401
        import timm
        import torch

        from osteo.registry import get_backbone

        name, size, self.bs = cfg["model"], cfg["size"], cfg["batch"]
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
            torch.backends.cudnn.benchmark = True  # as timm's train.py
        fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
        self.model = model.to(dev, memory_format=fmt)
        self.opt = torch.optim.Adam(self.model.parameters(), 1e-4)
        self.x = torch.rand(self.bs, 3, size, size, device=dev).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 3, (self.bs,), device=dev)
        self.dev, self.torch = dev, torch
        self.bf16 = cfg["precision"] in ("bfloat16", "mixed_bfloat16")
        self.train_model = torch.compile(self.model) if cfg["compile"] else self.model
        self.last_steps = MIN_STEPS
        self.info = {"params": sum(p.numel() for p in self.model.parameters()), "precision": cfg["precision"],
                     "jit": cfg["compile"], "impl": "timm-own", "backend": "torch", "versions": _versions()}

    def _step(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.dev, dtype=torch.bfloat16, enabled=self.bf16):
            loss = torch.nn.functional.cross_entropy(self.train_model(self.x), self.y)
        loss.backward()
        self.opt.step()

    def warm(self) -> dict:
        self.model.train()
        t = time.perf_counter()
        self._step()
        _torch_sync()
        first = time.perf_counter() - t
        for _ in range(WARM_STEPS):
            self._step()
        _torch_sync()
        return {"first_step_s": round(first, 2)}

    def window(self, window_s: float, feed: str) -> dict:
        if feed != "memory":
            raise ValueError(f"timm's loop has no {feed} feed")
        cpu, machine, t0 = time.process_time(), machine_cpu_s(), time.perf_counter()
        self._step()  # the first step is not timed
        _torch_sync()
        t = time.perf_counter()
        n = 1
        while n < MIN_STEPS or time.perf_counter() - t < window_s:
            self._step()
            n += 1
        _torch_sync()
        end = time.perf_counter()
        cpu = time.process_time() - cpu
        others = others_share(machine, cpu, end - t0)  # before the release, whose CPU is not the window's
        self.last_steps = n
        _release_cached_gpu_memory()
        return {**_window_result(n, self.bs, end - t, cpu), "others": others}

    def extras(self) -> dict:
        torch = self.torch
        from osteo import device

        out: dict = {}
        n = max(self.last_steps, 2)  # as many batches as the last training window
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.dev, dtype=torch.bfloat16, enabled=self.bf16):
            self.model(self.x)
            _torch_sync()
            t = time.perf_counter()
            for _ in range(n):
                self.model(self.x)
            _torch_sync()
            out["infer_img_s"] = round(self.bs * n / (time.perf_counter() - t), 2)
        self.model.train()
        n = 2048 if self.dev == "cpu" else 8192
        a, b = (torch.randn(n, n, device=self.dev, dtype=torch.bfloat16 if self.bf16 else torch.float32)
                for _ in range(2))
        best = float("inf")
        for _ in range(4):
            t = time.perf_counter()
            a @ b
            _torch_sync()
            best = min(best, time.perf_counter() - t)
        out["peak_matmul_gflops"] = round(2 * n**3 / best / 1e9, 1)
        _release_cached_gpu_memory()
        return {**out, **device.peak_memory_mb()}

    def close(self):
        pass


def _window_result(steps: int, batch: int, seconds: float, cpu_s: float) -> dict:
    return {"steps": steps, "seconds": round(seconds, 4), "cpu_s": round(cpu_s, 3),
            "img_s": round(batch * (steps - 1) / seconds, 3)}


def _our_cpus() -> set[int] | None:
    """The CPUs this process may run on (its affinity: in a container, its cpuset), or None."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def machine_cpu_s() -> float | None:
    """CPU seconds the CPUs this process may run on have run so far, for every process (user,
    system, interrupts and the hypervisor's steal), from ``/proc/stat``'s ``cpuN`` lines; None
    where there is none. (A CPU quota without a cpuset is not seen: the CPUs are the host's.)"""
    cpus = _our_cpus()
    total, seen = 0, 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if not (fields and fields[0].startswith("cpu") and fields[0][3:].isdigit() and len(fields) >= 9):
                    continue
                if cpus is not None and int(fields[0][3:]) not in cpus:
                    continue
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
                total += user + nice + system + irq + softirq + steal
                seen += 1
    except OSError:
        return None
    return total / os.sysconf("SC_CLK_TCK") if seen else None


def _machine_cores() -> int:
    """The CPUs :func:`machine_cpu_s` counts: this process's affinity, else ``os.cpu_count()``."""
    return len(_our_cpus() or ()) or os.cpu_count() or 1


def others_share(machine_before: float | None, own_cpu_s: float, seconds: float) -> float | None:
    """The share of the machine's CPU time (cores x ``seconds``) that other processes took
    while this one used ``own_cpu_s``; ``machine_before``: :func:`machine_cpu_s` at the start."""
    now = machine_cpu_s()
    if machine_before is None or now is None or seconds <= 0:
        return None
    return round(max(0.0, now - machine_before - own_cpu_s) / (_machine_cores() * seconds), 4)


def median_others(windows) -> float | None:
    """The median ``others`` share of timed windows that recorded one (None: none did)."""
    got = [w["others"] for w in windows if w.get("others") is not None]
    return statistics.median(got) if got else None


def busiest(*rows_windows) -> float | None:
    """The highest :func:`median_others` of the rows a ratio is made of (each a list of its
    windows), None where none recorded a share."""
    got = [x for x in (median_others(w) for w in rows_windows) if x is not None]
    return max(got) if got else None


def is_busy(others: float | None) -> bool:
    return others is not None and others > BUSY_SHARE


def ratio_status(summary: dict, others: float | None, single: str) -> str:
    """A ratio summary's status (one or more rounds): ``BUSY`` where other processes took a
    median share of the machine above ``BUSY_SHARE``, ``single`` (no verdict) with one round,
    ``FLAGGED`` where the rounds spread by more than ``FLAG_SPREAD``, else ``ok``."""
    if is_busy(others):
        return "BUSY"
    if len(summary["ratios"]) < 2:
        return single
    return "FLAGGED" if summary["ratio_spread"] > FLAG_SPREAD else "ok"


def _compute_dtype(precision: str) -> str:
    return {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(precision, "float32")


def _keep_going(out: dict, step) -> None:
    """Run one single measurement; its failure goes into ``out["errors"]`` beside the others."""
    try:
        step()
    except Exception as e:
        out.setdefault("errors", {})[step.__name__] = _one_line(e)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("keras", "torch", "timm", "tensorflow"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def as_osteo_train() -> dict:
    """``osteo train``'s process settings, for a script that trains in its own process: Keras'
    optional imports left out, freed memory kept, short OpenMP spin waits. Call it before torch
    is imported; returns what each setting did (for the results' JSON)."""
    from osteo import _lean, device

    _lean.install()
    return {"malloc": device.keep_freed_memory(), "openmp": device.short_spin_waits()}


def serve(kind: str, cfg: dict) -> int:
    """A worker: build the row, then answer the parent's requests (one JSON line each) until ``quit``.

    The replies travel on a private copy of stdout; whatever the libraries print goes to
    stderr, which the parent keeps for a failure's one-line reason.
    """
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        channel.write(TAG + json.dumps(obj) + "\n")
        channel.flush()

    from osteo import (  # Keras-free, torch-free: the settings below come before torch loads
        _lean,
        device,
    )

    _lean.install()  # as osteo's commands: Keras' optional scikit-learn, pandas and matplotlib not loaded

    malloc = "default: glibc's own settings"
    if cfg.get("malloc", "kept") == "kept":  # osteo train's setting, in every row's process alike: the
        malloc = device.keep_freed_memory()  # ratio compares the engines, not malloc's settings
    spin = "default: libgomp's own settings"
    if cfg.get("spin", "osteo") == "osteo":  # likewise osteo train's OpenMP setting
        spin = device.short_spin_waits()
    try:
        row = (OsteoRow if kind == "osteo" else TimmRow)(cfg)
    except Exception as e:
        reply({"error": _one_line(e)})
        return 1
    reply({**row.info, "malloc": malloc, "openmp": spin})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        try:
            reply(getattr(row, request["op"])(**request.get("args", {})))
        except Exception as e:
            reply({"error": _one_line(e)})
    row.close()
    return 0


# --------------------------------------------------------------------------- the parent's side of a worker


class Worker:
    """One row's process; ``ask`` sends a request and waits for its reply."""

    def __init__(self, kind: str, cfg: dict, backend: str, python: str):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": backend,
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--serve", kind, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.lines.put(json.loads(line[len(TAG):]))
        self.lines.put(None)

    def reply(self, timeout: float) -> dict:
        try:
            got = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return {"error": f"no answer within {timeout:.0f}s"}
        return got if got is not None else {"error": self._last_words()}

    def ask(self, op: str, timeout: float, **args) -> dict:
        if self.proc.poll() is not None:
            return {"error": self._last_words()}
        try:
            self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            return {"error": self._last_words()}
        return self.reply(timeout)

    def _last_words(self) -> str:
        self.stderr.seek(0)
        lines = [ln.strip() for ln in self.stderr.read().splitlines() if ln.strip()]
        return (lines[-1] if lines else f"worker exited with status {self.proc.poll()}")[:200]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.stderr.close()


# --------------------------------------------------------------------------- a group


def round_order(names: list[str], r: int) -> list[str]:
    """Round ``r``'s order: the rows rotated by ``r``."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def start_blocks(repeats: int, starts: int) -> list[range]:
    """The rounds each start of a group's processes runs: ``repeats`` rounds in ``starts``
    consecutive blocks, as even as possible (5 rounds, 2 starts: rounds 0-2, then 3-4)."""
    starts = max(1, min(starts, repeats))
    edges = [-(-repeats * k // starts) for k in range(starts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(edges) if b > a]


def _start_workers(rows: list[dict], args, say, start: int) -> tuple[dict[str, Worker], dict[str, dict]]:
    """Start one process per worker of ``rows``, side by side, and warm each (one at a time)."""
    workers: dict[str, Worker] = {}
    for row in rows:  # the processes import and build side by side, then work one at a time
        if row["worker"] not in workers:
            workers[row["worker"]] = Worker(row["kind"], row["cfg"], row["cfg"]["backend"], sys.executable)
    info = {}
    for name, w in workers.items():
        info[name] = w.reply(args.timeout)
        if "error" not in info[name]:
            info[name].update(w.ask("warm", args.timeout))
        say(f"   {name} (start {start + 1}): " + (
            info[name]["error"] if "error" in info[name] else
            f"{info[name].get('impl')}/{info[name].get('backend')}, {info[name].get('precision')}"
            f"{', compiled' if info[name].get('jit') else ''}; first step {info[name]['first_step_s']} s"))
    return workers, info


def run_group(group: dict, args, say) -> None:
    """Run the interleaved rounds of ``group`` on ``args.starts`` starts of its processes
    (each start: every row's process started, built and warmed, then its block of rounds),
    then the single measurements on the last start; everything lands in ``group["rows"]``.

    Why several starts: one process of a row keeps its speed from round to round, but a new
    process of the same row may not (timm's DenseNet169 at 224 px ran 11.2-13.0 img/s in
    every round of one process and 17.3-19.8 in the next run's), so rounds on one start
    agree with each other and not with the next run; over two starts that difference
    lands between the rounds, where the spread sees it and flags the row."""
    rows = group["rows"]
    for row in rows:
        row["rounds"], row["starts"] = [], []
    blocks = start_blocks(max((r["repeats"] for r in rows), default=0), args.starts)
    # a worker is started for the blocks its rows have rounds in (a --single row: the first
    # only), and measured once more (extras) on the last of them
    last_start: dict[str, int] = {}
    for r in rows:
        ran = [k for k, b in enumerate(blocks) if b[0] < r["repeats"]]
        last_start[r["worker"]] = max([*ran, last_start.get(r["worker"], -1)])
    for start, block in enumerate(blocks):
        wanted = [r for r in rows if "error" not in r and block[0] < r["repeats"]]
        if not wanted:
            continue
        workers, info = _start_workers(wanted, args, say, start)
        for row in wanted:
            got = info[row["worker"]]
            row["starts"].append({"start": start, **{k: got[k] for k in ("first_step_s", "error") if k in got}})
            if start == 0 or "error" in got:
                row.update(got)
        live = {r["row"]: r for r in wanted if "error" not in r}
        for rnd in block:
            done = []
            for name in round_order(list(live), rnd):
                row = live[name]
                if "error" in row or rnd >= row["repeats"]:
                    continue
                time.sleep(args.pause)
                variant = {"callbacks": row["callbacks"]} if row["kind"] == "osteo" else {}
                got = workers[row["worker"]].ask("window", args.timeout, window_s=args.window, feed=row["feed"],
                                                 **variant)
                if "error" in got:
                    row["error"] = got["error"]
                    continue
                row["rounds"].append({"round": rnd, "start": start, **got})
                busy = f" ({got['others']:.0%} others)" if got.get("others") else ""
                done.append(f"{name} {got['img_s']:.4g}{busy}")
            say(f"   round {rnd + 1} (start {start + 1}): " + ", ".join(done) + " img/s")
        for name, w in workers.items():
            if start == last_start[name] and "error" not in info[name]:
                extras = w.ask("extras", args.timeout)
                for row in wanted:
                    if row["worker"] == name:
                        row["extras"] = extras
            w.close()
    group["summary"] = summarize(group)


# --------------------------------------------------------------------------- summary


def _spread(values: list[float]) -> float | None:
    """(max - min) / median, the lowest and highest value left out from TRIM_FROM values on
    (one burst of a neighbour does not flag rounds that otherwise agree); None below two."""
    if len(values) < 2:
        return None
    kept = sorted(values)[1:-1] if len(values) >= TRIM_FROM else values
    return (max(kept) - min(kept)) / statistics.median(values)


def ratio_summary(ratios: list[float]) -> dict:
    """Per-round ratios (rounded) and, where there are any, their median, min-max and spread."""
    out: dict = {"ratios": [round(x, 4) for x in ratios]}
    if ratios:
        out.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                   ratio_spread=_spread(ratios))
    return out


def summarize(group: dict) -> list[dict]:
    """Per osteo row: median img/s, per-round ratios to timm's best, their median, min-max,
    spread, the busiest of its rows' ``others`` shares and status (``ok``, ``FLAGGED``,
    ``BUSY``, ``1 window``, or the error); peers' medians; a
    variant row (pipeline, async) against its engine's row and a compiled timm engine
    against the eager one, round by round."""
    rows = group["rows"]
    rates = {r["row"]: {x["round"]: x["img_s"] for x in r.get("rounds", ())} for r in rows}
    windows = {r["row"]: r.get("rounds", ()) for r in rows}
    peers = [r["row"] for r in rows if r["kind"] == "timm" and r["row"] not in PROBE_PEERS]

    def best_peer(rnd: int) -> float | None:
        got = [rates[p][rnd] for p in peers if rnd in rates[p]]
        return max(got) if got else None

    def relative(own: dict, other: dict) -> float | None:
        rel = [own[k] / other[k] for k in sorted(own) if other.get(k)]
        return statistics.median(rel) if rel else None

    eager = _eager_timm_row(rows)
    out = []
    for r in rows:
        own = rates[r["row"]]
        s = {"row": r["row"], "kind": r["kind"], "img_s": statistics.median(own.values()) if own else None,
             "img_s_spread": _spread(list(own.values())), "rounds": len(own)}
        if r["kind"] == "osteo":
            s.update(ratio_summary([own[k] / best_peer(k) for k in sorted(own) if best_peer(k)]))
            s["others"] = busiest(windows[r["row"]], *(windows[p] for p in peers))
            if r["row"] != r["worker"]:
                s["vs_engine_row"] = relative(own, rates.get(r["worker"], {}))
            if r.get("impl") == "timm" and r.get("jit") and eager:
                s["vs_eager"] = relative(own, rates[eager["row"]])
                _pays_after(s, r, eager, statistics.median(rates[eager["row"]].values()) if rates[eager["row"]]
                            else None)
        if "error" in r:
            s["status"] = f"error: {r['error']}"
        elif not own:
            s["status"] = "no rounds"
        elif r["row"] in PROBE_PEERS:
            s["status"] = "probe"
            s["vs_cl"] = relative(own, rates.get("cl", {}))
        elif r["kind"] == "timm":
            s["status"] = "reference"
        elif not s.get("ratios"):
            s["status"] = "no timm row"
        else:
            s["status"] = ratio_status(s, s["others"], "1 window")
        flops = GFLOPS_224.get(group["model"], 0) * 1e9 * (group["size"] / 224) ** 2 * 3
        peak = r.get("extras", {}).get("peak_matmul_gflops")
        if s["img_s"] and flops and peak:
            s["mfu"] = flops * s["img_s"] / (peak * 1e9)
        out.append(s)
    return out


def _eager_timm_row(rows: list[dict]) -> dict | None:
    """The timm engine's eager row of a group (``timm``, else ``auto`` where it is that), if any."""
    eager = [r for r in rows if r["kind"] == "osteo" and r["row"] == r["worker"] and r.get("impl") == "timm"
             and not r.get("jit") and "first_step_s" in r]
    return min(eager, key=lambda r: r["row"] != "timm", default=None)


def _pays_after(s: dict, row: dict, eager: dict, eager_img_s: float | None) -> None:
    """The compile's extra first-step seconds over the seconds it saves per image: the images
    after which compiling pays (None: it never does)."""
    if "first_step_s" not in row or not (eager_img_s and s["img_s"]):
        return
    extra = row["first_step_s"] - eager["first_step_s"]
    saved = 1 / eager_img_s - 1 / s["img_s"]
    s.update(compile_s=round(extra, 1), eager_row=eager["row"],
             pays_after_images=round(extra / saved) if saved > 0 else None)


# --------------------------------------------------------------------------- plan and report


# osteo's engines: (backend, model.impl, jit_compile); "auto" is what `osteo train` picks here
ENGINES = {
    "auto": ("auto", "auto", "auto"),
    "keras-tf": ("tensorflow", "keras", "off"),
    "keras-torch": ("torch", "keras", "off"),
    "timm": ("torch", "timm", "off"),
    "timm-compiled": ("torch", "timm", "on"),
}
# timm's own loop: (channels_last, torch.compile, osteo's imports too)
PEERS = {"cf": (False, False, False), "cl": (True, False, False), "cl-compiled": (True, True, False),
         "cl-keras": (True, False, True)}
# Peers that tell where a difference comes from; they are not "timm's best".
PROBE_PEERS = ("cl-keras",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(STUDY))
    p.add_argument("--sizes", default="64")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--engines", default="auto", help=f"osteo engines, of: {', '.join(ENGINES)} ('' for none)")
    p.add_argument("--peers", default="cf,cl", help=f"timm's own loop, of: {', '.join(PEERS)} ('' for none)")
    p.add_argument("--full", action="store_true", help="every engine and every peer")
    p.add_argument("--single", default="", help="engines timed in one window only (a side measurement, never "
                                                "a verdict), e.g. keras-torch")
    p.add_argument("--window", type=float, default=WINDOW_S, help="seconds of training per timed window")
    p.add_argument("--repeats", type=int, default=REPEATS, help="rounds of interleaved windows")
    p.add_argument("--starts", type=int, default=STARTS, help="starts of each row's process; the rounds are "
                                                             "split among them (1: one process per row)")
    p.add_argument("--precision", default="auto",
                   help="of every engine but auto, and of the peers: auto (bfloat16 where the device has it), "
                        "float32 or mixed_bfloat16")
    p.add_argument("--planned-images", type=int, default=50_000,
                   help="the run length `auto` plans for (the compile and short-run rules use it)")
    p.add_argument("--pipeline", action="store_true", help="also auto fed by osteo's tf.data pipeline from its "
                                                           "on-disk cache (TensorFlow installed), and the feed alone")
    p.add_argument("--async-row", action="store_true", help="also auto without osteo's per-batch callback "
                                                            "(NonFiniteLoss): the cost of Keras' per-step sync")
    p.add_argument("--compile-check", default="", help="backbones (of --models) whose group also has the timm "
                                                      "engine compiled: compile time, rate, when it pays")
    p.add_argument("--pause", type=float, default=PAUSE_S, help="seconds between windows")
    p.add_argument("--feed", action="store_true", help="also the host feed at the batch and size given "
                                                       "(benchmarks/feed.py)")
    p.add_argument("--budget-s", type=float, default=0, help="start no group (or the feed) after this many "
                                                             "seconds (0: no limit)")
    p.add_argument("--malloc", choices=("kept", "default"), default="kept",
                   help="every row's process keeps its freed memory as osteo train does (kept), or uses "
                        "glibc's defaults (default)")
    p.add_argument("--spin", choices=("osteo", "default"), default="osteo",
                   help="every row's process gets osteo train's OpenMP spin setting (osteo), or libgomp's "
                        "defaults (default)")
    p.add_argument("--timeout", type=int, default=900, help="seconds a worker may take for one request")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="a folder, or a .json file")
    return p


def _precision(requested: str) -> str:
    if requested != "auto":
        return requested
    from osteo.device import probe

    d = probe()
    return "mixed_bfloat16" if (d.kind == "gpu" and d.gpu_bf16) or d.cpu_class == "avx512_bf16" else "float32"


def plan_groups(args, backends: set[str], has_timm: bool) -> list[dict]:
    """The groups to measure, each with its rows (and its workers' configurations)."""
    from osteo import device
    from osteo.registry import get_backbone

    engines = list(ENGINES) if args.full else [e for e in args.engines.split(",") if e]
    peers = list(PEERS) if args.full else [p for p in args.peers.split(",") if p]
    single = {e for e in args.single.split(",") if e}
    unknown = [e for e in [*engines, *single] if e not in ENGINES] + [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown engine or peer: {', '.join(unknown)}; engines: {', '.join(ENGINES)}; "
                         f"peers: {', '.join(PEERS)}")
    precision = _precision(args.precision)
    probe = device.probe()

    def osteo_row(engine: str, model: str, size: int, repeats: int) -> list[dict]:
        backend, impl, jit = ENGINES[engine]
        if engine == "auto":
            backend, _ = device.choose_backend("auto", get_backbone(model), probe, tuple(sorted(backends)))
        if backend not in backends or (impl == "timm" and not has_timm):
            return []
        cfg = {"model": model, "size": size, "batch": args.batch, "backend": backend, "impl": impl, "jit": jit,
               "precision": "auto" if engine == "auto" else precision, "planned_images": args.planned_images,
               "malloc": args.malloc, "spin": args.spin}
        row = {"row": engine, "worker": engine, "kind": "osteo", "cfg": cfg, "feed": "memory", "callbacks": "osteo",
               "repeats": repeats}
        out = [row]
        if engine == "auto" and "tensorflow" in backends and (args.pipeline or args.full):
            out.append({**row, "row": "auto pipeline", "feed": "pipeline"})
        if engine == "auto" and args.async_row:
            out.append({**row, "row": "auto async", "callbacks": "none"})
        return out

    groups = []
    sizes = [int(s) for s in args.sizes.split(",") if s]
    models = args.models.split(",")
    compiled = [m for m in args.compile_check.split(",") if m]
    if set(compiled) - set(models):
        raise SystemExit(f"--compile-check {','.join(compiled)}: each must also be in --models")
    for model in models:
        for size in sizes:
            wanted = engines + (["timm-compiled"] if model in compiled and "timm-compiled" not in engines else [])
            rows = [r for e in wanted for r in osteo_row(e, model, size, 1 if e in single else args.repeats)]
            for peer in peers if has_timm else ():
                channels_last, compiled_peer, osteo_imports = PEERS[peer]
                cfg = {"model": model, "size": size, "batch": args.batch, "backend": "torch",
                       "precision": precision, "channels_last": channels_last, "compile": compiled_peer,
                       "osteo_imports": osteo_imports,
                       "malloc": args.malloc, "spin": args.spin}
                rows.append({"row": peer, "worker": peer, "kind": "timm", "cfg": cfg, "feed": "memory",
                             "repeats": args.repeats})
            groups.append({"model": model, "size": size, "batch": args.batch, "rows": rows})
    return groups


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 10 ** digits else f"{v:,.0f}"
    return str(v)


def _short(precision) -> str:
    return {"mixed_bfloat16": "bf16", "mixed_float16": "fp16", "float32": "fp32"}.get(precision, str(precision))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _note(s: dict) -> str:
    """An osteo row's note: how busy the machine was where that made it BUSY, an error."""
    if s["status"] == "BUSY":
        return f"others took {s['others']:.0%} of the CPU"
    return "" if s["status"] in ("ok", "FLAGGED") else s["status"][:80]


def print_tables(console, report: dict) -> None:
    from rich.table import Table

    m = report["method"]
    t = Table(title=f"training images/sec: median of {m['repeats']} interleaved rounds of ~{m['window_s']:g} s "
                    f"(batch {m['batch']}, {m['precision']}); ratio = osteo row / timm's best (cf, cl) in the "
                    f"same round; FLAGGED: the rounds' ratios spread > {m['flag_spread']:.0%}; BUSY: other "
                    f"processes took > {m.get('busy_share', BUSY_SHARE):.0%} of the machine's CPU (median of "
                    "the windows)")
    for col in ("backbone", "px", "row", "engine", "img/s", "spread", "timm cf", "timm cl", "vs timm best",
                "ratio min-max", "ratio spread", "note"):
        t.add_column(col, justify="left" if col in ("backbone", "row", "engine", "note") else "right")
    for g in report["groups"]:
        if "summary" not in g:
            continue
        by = {s["row"]: s for s in g["summary"]}
        rows = {r["row"]: r for r in g["rows"]}
        for s in g["summary"]:
            if s["status"] == "probe":  # timm's loop in a process with osteo's imports: against cl, per round
                t.add_row(g["model"], str(g["size"]), s["row"], "timm's cl loop, osteo's imports",
                          _fmt(s["img_s"]), _pct(s["img_s_spread"]), "", "", "", "", "",
                          f"vs cl {_fmt(s.get('vs_cl'))} (median of the rounds)")
            if s["kind"] != "osteo":
                continue
            r = rows[s["row"]]
            engine = f"{r.get('impl', '?')}/{r.get('backend', '?')} {_short(r.get('precision'))}" + (
                " compiled" if r.get("jit") else "") + (" cf" if r.get("plan", {}).get("channels_last") is False else "")
            ok = s["status"] in ("ok", "1 window")
            t.add_row(g["model"], str(g["size"]), s["row"], engine, _fmt(s["img_s"]), _pct(s["img_s_spread"]),
                      _fmt(by.get("cf", {}).get("img_s")), _fmt(by.get("cl", {}).get("img_s")),
                      _fmt(s.get("ratio")) if ok else s["status"].split(":")[0],
                      f"{_fmt(s.get('ratio_min'))}-{_fmt(s.get('ratio_max'))}" if s.get("ratios") else "-",
                      _pct(s.get("ratio_spread")), _note(s))
    console.print(t)

    t = Table(title="single measurements per row (after the rounds; first step includes compile or autotuning)")
    for col in ("backbone", "px", "row", "first step s", "infer img/s", "MFU", "peak MB", "feed img/s",
                "variant / engine row"):
        t.add_column(col, justify="left" if col in ("backbone", "row") else "right")
    for g in report["groups"]:
        for s in g.get("summary", ()):
            r = next(x for x in g["rows"] if x["row"] == s["row"])
            e = r.get("extras", {})
            peak = e.get("peak_gpu_mb") or e.get("peak_rss_mb")
            t.add_row(g["model"], str(g["size"]), s["row"], _fmt(r.get("first_step_s")), _fmt(e.get("infer_img_s")),
                      _fmt(s.get("mfu"), 2), _fmt(peak), _fmt(e.get("feed_img_s")) if r["row"] == r["worker"] else "-",
                      _fmt(s.get("vs_engine_row")))
    console.print(t)

    checks = [(g, s) for g in report["groups"] for s in g.get("summary", ()) if "vs_eager" in s]
    if checks:
        t = Table(title="compile check: the timm engine compiled (torch.compile, cold cache) vs eager, interleaved")
        for col in ("backbone", "px", "eager row", "eager img/s", "compiled img/s", "compiled / eager",
                    "compile s (first step extra)", "pays after images", "note"):
            t.add_column(col, justify="left" if col in ("backbone", "eager row", "note") else "right")
        for g, c in checks:
            row = next(r for r in g["rows"] if r["row"] == c["row"])
            e = next((s for s in g["summary"] if s["row"] == c.get("eager_row")), {})
            t.add_row(g["model"], str(g["size"]), c.get("eager_row", "-"), _fmt(e.get("img_s")), _fmt(c["img_s"]),
                      _fmt(c["vs_eager"]), _fmt(c.get("compile_s")),
                      "never" if "compile_s" in c and c.get("pays_after_images") is None else
                      _fmt(c.get("pays_after_images")),
                      "the compile failed: ran eagerly" if row.get("compiled") is False else "")
        console.print(t)
    if report.get("feed"):
        import feed

        rates = [s["img_s"] for g in report["groups"] for s in g.get("summary", ()) if s["kind"] == "osteo"
                 and s["img_s"]]
        feed.print_table(console, report["feed"], max(rates, default=None))


def run_feed(args) -> dict:
    """benchmarks/feed.py in its own process (the backend and the memory are its own)."""
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    size = int(args.sizes.split(",")[0])
    cmd = [sys.executable, str(Path(__file__).with_name("feed.py")), "--size", str(size), "--batch", str(args.batch),
           "--seconds", str(min(args.window, 5.0)), "--reply"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}


def main() -> int:
    args = build_parser().parse_args()
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs keep the tables whole
    say = lambda s: console.print(s, highlight=False)
    backends = {b for b in ("tensorflow", "torch") if _importable(b)}
    groups = plan_groups(args, backends, _importable("timm") and "torch" in backends)
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / f"{datetime.date.today().isoformat()}-{platform.node() or 'host'}-models.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"host": platform.node(), "cpu": _cpu_name(), "gpu": _gpu_name(), "args": vars(args),
              "method": {"window_s": args.window, "repeats": args.repeats, "starts": args.starts, "malloc": args.malloc,
                         "spin": args.spin,
                         "flag_spread": FLAG_SPREAD, "busy_share": BUSY_SHARE,
                         "trim_from": TRIM_FROM, "pause_s": args.pause, "batch": args.batch,
                         "precision": _precision(args.precision)},
              "groups": groups}
    t0 = time.perf_counter()
    over = lambda: args.budget_s and time.perf_counter() - t0 > args.budget_s
    # the feed first: cheap, and the groups' last one may hold a long compile
    for g in ([None] if args.feed else []) + groups:
        if over():
            if g is not None:
                g["skipped"] = f"time budget of {args.budget_s:g}s spent"
            say(f"skipped {'the feed' if g is None else g['model']}: time budget spent")
            continue
        if g is None:
            say("host feed ...")
            report["feed"] = run_feed(args)
        else:
            say(f"group {g['model']} {g['size']}px: "
                f"{', '.join(r['row'] for r in g['rows']) or 'no rows here'}")
            run_group(g, args, say)
        _write(path, report)  # after each group: a run cut short keeps what it measured
    print_tables(console, report)
    _write(path, report)
    say(f"wrote {path} ({time.perf_counter() - t0:.0f}s)")
    return 0


def _write(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


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


def _gpu_name() -> str | None:
    from osteo import device

    d = device.probe()
    return d.name if d.kind == "gpu" else None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve(sys.argv[2], json.loads(sys.argv[3])))
    sys.exit(main())
