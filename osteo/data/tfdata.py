"""tf.data batches from the image cache: the input pipeline on the TensorFlow backend.

Evaluation keeps the given order. Training holds the whole split in memory as uint16
after the first pass and serves every later epoch from there, shuffled by a stateless
permutation seeded by ``(seed, epoch)``: epoch ``e`` is the same whether the run started
at epoch 0 or resumed at ``e``. (On PyTorch, :mod:`osteo.data.feed` serves the same
batches without TensorFlow.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from osteo import CLASSES
from osteo.data.pipeline import HEADER_BYTES, SCALE

AUTOTUNE = tf.data.AUTOTUNE


def _read_cached(path: tf.Tensor | str, size: int) -> tf.Tensor:
    # ImageCache.fill has checked the entry; the graph only skips its header
    img = tf.io.parse_tensor(tf.strings.substr(tf.io.read_file(path), HEADER_BYTES, -1), tf.uint16)
    return tf.ensure_shape(img, (size, size, 1))


def make_dataset(
    files: Sequence[str],
    labels: Sequence[int],
    size: int,
    batch_size: int,
    training: bool = False,
    seed: int = 0,
    start_epoch: int = 0,
) -> tf.data.Dataset:
    """Batches of (float32 (B, size, size, 1) in [0, 255], int32 (B,)) from cached tensors.

    ``training``: an endless stream of epochs, each a fresh seeded permutation of every
    image (the last batch of an epoch may be short), starting at ``start_epoch``.
    Otherwise one pass in the given order.
    """
    n = len(files)
    items = tf.data.Dataset.from_tensor_slices((list(files), np.asarray(labels, dtype=np.int32)))
    items = items.map(lambda f, y: (_read_cached(f, size), y), num_parallel_calls=AUTOTUNE, deterministic=True)
    to_float = lambda x, y: (tf.cast(x, tf.float32) / SCALE, y)
    if not training:
        return items.batch(batch_size).map(to_float, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

    def epochs(images, ys):
        def one_epoch(epoch):
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int32), seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
            return tf.data.Dataset.from_tensor_slices(perm).batch(batch_size).map(
                lambda idx: (tf.gather(images, idx), tf.gather(ys, idx)))

        return tf.data.Dataset.range(start_epoch, 2**62).flat_map(one_epoch)

    # the whole split, once, as uint16 in memory; every epoch is then a gather
    ds = items.batch(max(1, n)).flat_map(epochs)
    return ds.map(to_float, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def mix_batch(step, batch, *, seed: int, mixup: float, cutmix: float, size: int):
    """MixUp / CutMix of one training batch (soft (B, 3) labels), from stateless random ops
    seeded by (seed, step): a resumed run mixes the same batches."""
    images, labels = batch
    seed = tf.stack([tf.constant(seed, tf.int64), step])
    y = tf.one_hot(labels, len(CLASSES))
    b = tf.shape(images)[0]
    use_cutmix = cutmix > 0 and (mixup <= 0 or
                                      tf.random.stateless_uniform([], seed=seed + 7) < 0.5)
    alpha = cutmix if cutmix > 0 else mixup
    g1 = tf.random.stateless_gamma([], seed=seed, alpha=alpha)
    g2 = tf.random.stateless_gamma([], seed=seed + 1, alpha=alpha)
    lam = g1 / (g1 + g2)
    other = tf.reverse(tf.range(b), [0])
    x2, y2 = tf.gather(images, other), tf.gather(y, other)
    mixed_x = lam * images + (1 - lam) * x2
    if cutmix > 0:
        size = size
        cut = tf.cast(tf.round(size * tf.sqrt(1 - lam)), tf.int32)
        cy = tf.random.stateless_uniform([], seed=seed + 2, maxval=size, dtype=tf.int32)
        cx = tf.random.stateless_uniform([], seed=seed + 3, maxval=size, dtype=tf.int32)
        y0, y1 = tf.clip_by_value(cy - cut // 2, 0, size), tf.clip_by_value(cy + cut // 2, 0, size)
        x0, x1 = tf.clip_by_value(cx - cut // 2, 0, size), tf.clip_by_value(cx + cut // 2, 0, size)
        r = tf.range(size)
        inside = ((r[:, None] >= y0) & (r[:, None] < y1)) & ((r[None, :] >= x0) & (r[None, :] < x1))
        box = tf.cast(inside, images.dtype)[None, :, :, None]
        area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / float(size * size)
        cut_x = images * (1 - box) + x2 * box
        cut_lam = 1 - area
        if mixup > 0:
            images_out = tf.where(use_cutmix, cut_x, mixed_x)
            lam = tf.where(use_cutmix, cut_lam, lam)
        else:
            images_out, lam = cut_x, cut_lam
    else:
        images_out = mixed_x
    return images_out, lam * y + (1 - lam) * y2
