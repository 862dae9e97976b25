"""Batches from the image cache on the PyTorch backend, without TensorFlow in the process.

On PyTorch the tf.data pipeline (:mod:`osteo.data.tfdata`) cost twice: TensorFlow's
runtime in a training process that has no other use for it (about 730 MB resident),
and a float32 batch made on the host and copied from pageable memory to the GPU every
step (measured on an H200 at 224 px, batch 128: 23.9 ms of host time a batch, about as
long as a whole VGG16 step of timm's own loop; ``benchmarks/README.md``). A
:class:`TorchFeed` serves the same batches as tf.data would (the whole split held once
as uint16 levels, each epoch a permutation seeded by ``(seed, epoch)``), as tensors
already on the model's device: on a GPU the uint16 levels cross the bus from pinned
memory (half the bytes of float32), become float32 [0, 255] there. The next batch is
made while the model trains on this one: a worker thread gathers its levels (on a GPU
into pinned memory, and queues their copy on a side stream), so the main thread, which
launches the step's kernels, does not wait for the gather (about 11 ms a batch of 128 at
224 px on the H200's host, ``benchmarks/README.md``). The values are tf.data's to the
bit: ``float32(level) / 257``.

MixUp / CutMix draw their coefficients from NumPy's generator seeded by ``(seed, step)``,
so a resumed run mixes the same batches (the same rule as tf.data's stateless ops, other
draws).
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import keras
import numpy as np

from osteo import CLASSES
from osteo.data.pipeline import SCALE


class TorchFeed(keras.utils.PyDataset):
    """Batches ``(images float32 (B, size, size, 1) in [0, 255], labels[, sample weights])``, all
    on the device (sample weights: with ``class_weight``).

    Training (``training=True``): an endless stream, each pass over the data a fresh
    permutation seeded by ``(seed, pass)``, positioned ``start_batch`` batches in (resume).
    Otherwise one pass in the given order. Keras asks for batches in order; a batch asked
    for out of order is made on the spot.
    """

    def __init__(self, levels: np.ndarray, labels: np.ndarray, batch_size: int, *, training: bool = False,
                 seed: int = 0, start_batch: int = 0, mixup: float = 0.0, cutmix: float = 0.0,
                 class_weight: dict | None = None):
        super().__init__()
        import torch

        self.torch = torch
        self.levels, self.labels = levels, np.asarray(labels, np.int32)
        self.batch_size, self.training, self.seed = int(batch_size), training, int(seed)
        self.start_batch, self.mixup, self.cutmix = int(start_batch), float(mixup), float(cutmix)
        # per class, as Keras' fit(class_weight=...) gives them (a missing class: 1)
        self.class_weight = None if class_weight is None else torch.tensor(
            [float(class_weight.get(c, 1.0)) for c in range(len(CLASSES))], dtype=torch.float32)
        self.per_pass = -(-len(levels) // self.batch_size)
        self.cuda = torch.cuda.is_available()  # where Keras and the timm engine put the model
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self._perm: tuple[int, np.ndarray] | None = None
        self._ahead: tuple[int, Future] | None = None  # the next batch, being made by the worker
        self._pool: ThreadPoolExecutor | None = None
        if self.cuda:
            self._stream = torch.cuda.Stream()
            shape = (self.batch_size, *levels.shape[1:])
            self._pinned = [torch.empty(shape, dtype=torch.int16).pin_memory() for _ in range(2)]
            self._pinned_labels = [torch.empty(self.batch_size, dtype=torch.int32).pin_memory() for _ in range(2)]
            self._copied = [None, None]  # each pinned buffer's last copy: wait for it before refilling
            self._slot = 0

    @property
    def num_batches(self) -> int | None:
        return None if self.training else self.per_pass

    def __len__(self) -> int:  # an endless stream reports one pass (Keras reads num_batches)
        return self.per_pass

    def indices(self, i: int) -> np.ndarray:
        """The split's images in batch ``i`` (of this feed's stream)."""
        if not self.training:
            return np.arange(i * self.batch_size, min((i + 1) * self.batch_size, len(self.levels)))
        k = self.start_batch + i
        epoch, b = divmod(k, self.per_pass)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.levels)))
        return self._perm[1][b * self.batch_size : (b + 1) * self.batch_size]

    def __getitem__(self, i: int):
        x, y = self._take(i)
        if self.training or i + 1 < self.per_pass:  # the next batch, made while the model trains on this one
            self._ahead = (i + 1, self._worker().submit(self._make, i + 1))
        if self.training and (self.mixup > 0 or self.cutmix > 0):
            x, y = self._mix(self.start_batch + i, x, y)
        if self.class_weight is None:
            return x, y
        return x, y, self._sample_weights(y)

    def _sample_weights(self, y):
        """Keras' sample weights for ``class_weight`` (of the argmax of soft labels), on ``y``'s device."""
        if self.class_weight.device != y.device:
            self.class_weight = self.class_weight.to(y.device)  # once
        classes = y.argmax(-1) if y.ndim > 1 else y
        return self.class_weight[classes.long()]

    # ------------------------------------------------------------------ making batches

    def _worker(self) -> ThreadPoolExecutor:
        """The one thread that makes the next batch; it ends when this feed is collected."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="osteo-feed")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def _take(self, i: int):
        """Batch ``i`` on the device: the worker's, or made now when Keras asked out of order
        (after the worker's batch is done: the two must not fill the same pinned buffer)."""
        ahead, self._ahead = self._ahead, None
        made = ahead[1].result() if ahead is not None else None  # re-raises the worker's error here
        if ahead is None or ahead[0] != i:
            made = self._make(i)
        if not self.cuda:
            return made
        torch = self.torch
        levels, labels, ready = made
        stream = torch.cuda.current_stream()
        stream.wait_event(ready)  # the GPU waits for the copy; the host does not
        levels.record_stream(stream)
        labels.record_stream(stream)
        # uint16 travels as int16 (same bits: torch has few uint16 kernels); & 0xFFFF restores it
        return (levels.to(torch.int32) & 0xFFFF).to(torch.float32) / SCALE, labels

    def _make(self, i: int):
        """Batch ``i`` (the worker thread's job): on the CPU its images and labels as tensors;
        on a GPU its levels and labels copied there on the side stream, and the copy's event
        (labels handed over as NumPy would be copied to the device by Keras, and PyTorch waits
        for such a copy: see :class:`osteo.classifier.Model`)."""
        torch, idx = self.torch, self.indices(i)
        if not self.cuda:
            images = torch.from_numpy(self.levels[idx].astype(np.float32) / np.float32(SCALE))
            return images, torch.from_numpy(self.labels[idx])
        levels, labels = self._copy(idx, self._stream)
        ready = torch.cuda.Event()
        ready.record(self._stream)
        return levels, labels, ready

    def _copy(self, idx: np.ndarray, stream):
        """The levels and labels of ``idx``, gathered into pinned memory and copied on ``stream``
        (not waited for)."""
        torch = self.torch
        slot, self._slot = self._slot, self._slot ^ 1  # the other buffer may still be crossing the bus
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # issued a batch ago: done in all but name
        buf, labels = self._pinned[slot][: len(idx)], self._pinned_labels[slot][: len(idx)]
        np.take(self.levels.view(np.int16), idx, axis=0, out=buf.numpy())
        np.take(self.labels, idx, out=labels.numpy())
        with torch.cuda.stream(stream):
            levels = buf.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            self._copied[slot] = torch.cuda.Event()
            self._copied[slot].record(stream)
        return levels, labels

    # ------------------------------------------------------------------ MixUp / CutMix

    def _mix(self, step: int, x, labels):
        torch = self.torch
        rng = np.random.default_rng([self.seed, step])
        y = torch.nn.functional.one_hot(torch.as_tensor(labels).to(x.device, torch.int64), len(CLASSES)).float()
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.uniform() < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        g1, g2 = rng.gamma(alpha), rng.gamma(alpha)
        lam = g1 / (g1 + g2)
        other = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
        x2, y2 = x[other], y[other]
        if use_cutmix:
            size = x.shape[1]
            cut = int(round(size * np.sqrt(1 - lam)))  # noqa: RUF046  (an int whatever NumPy's round gives)
            cy, cx = int(rng.integers(size)), int(rng.integers(size))
            y0, y1 = np.clip([cy - cut // 2, cy + cut // 2], 0, size)
            x0, x1 = np.clip([cx - cut // 2, cx + cut // 2], 0, size)
            out = x.clone()
            out[:, y0:y1, x0:x1] = x2[:, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / float(size * size)
        else:
            out = lam * x + (1 - lam) * x2
        return out, lam * y + (1 - lam) * y2
