"""Grad-CAM (Selvaraju et al., 2017): where in the knee the model looked for its answer.

The heat map of class c is ReLU(sum_k w_k A_k), with A the activations of the layer the
backbone's spec names (``gradcam_layer``: its last convolutional stage) and w_k the mean
over positions of d score_c / d A_k; it is upsampled to the input size and scaled to
[0, 1] per image. The layer comes from the spec, never from matching names here.

Gradients are the backend's own (TensorFlow's tape, PyTorch's autograd); everything else
is Keras.

    >>> maps, probs = gradcam(model, spec, images)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np

from osteo import CLASSES
from osteo.errors import OsteoError
from osteo.files import OwnedFolder, atomic_path, sweep_temporaries
from osteo.registry import BackboneSpec


def _split(model: keras.Model, spec: BackboneSpec):
    """(layers before the backbone, the feature model [target, backbone output], layers after),
    from the model's engine (:meth:`osteo.backbones.base.Backbone.gradcam_parts`). A model
    loaded whole (a run saved before weights-only checkpoints) has Keras' layers."""
    engine = getattr(model, "osteo_backbone", None)
    if engine is not None:
        return engine.gradcam_parts(model)
    from osteo.backbones.keras_apps import keras_gradcam_parts

    return keras_gradcam_parts(model, spec)


def _forward(parts, x):
    before, feature, after = parts
    for layer in before:
        x = layer(x, training=False)
    activations, x = feature(x, training=False)
    for layer in after:
        x = layer(x, training=False)
    return activations, x


def _gradients(parts, x, classes, device=None):
    """(activations, d score / d activations, probabilities) on the loaded backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            activations, probs = _forward(parts, tf.convert_to_tensor(x))
            score = tf.reduce_sum(tf.gather(probs, classes, axis=1, batch_dims=1))
        grads = tape.gradient(score, activations)
    elif backend == "torch":
        import torch

        inputs = torch.as_tensor(x, device=device).requires_grad_(True)
        with torch.enable_grad():
            activations, probs = _forward(parts, inputs)
            score = probs.gather(1, torch.as_tensor(classes, device=probs.device)[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activations)
    else:
        raise OsteoError(f"Grad-CAM supports the tensorflow and torch backends, not {backend}")
    to_np = keras.ops.convert_to_numpy
    return to_np(activations).astype("float32"), to_np(grads).astype("float32"), to_np(probs).astype("float32")


def gradcam(model: keras.Model, spec: BackboneSpec, images: np.ndarray, classes: np.ndarray | None = None,
            batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps (N, H, W) in [0, 1] for ``classes`` (default: each image's predicted class), and the
    probabilities (N, 3). ``images`` are the model's inputs: (N, H, W, 1) float in [0, 255]."""
    from scipy.ndimage import zoom

    parts = _split(model, spec)
    device = model.weights[0].value.device if keras.backend.backend() == "torch" else None
    images = np.asarray(images, dtype="float32")
    maps, all_probs = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        if classes is None:
            c = np.asarray(model.predict(x, verbose=0)).argmax(1)
        else:
            c = np.asarray(classes[start : start + batch])
        a, g, probs = _gradients(parts, x, c.astype("int64"), device)
        cam = np.maximum((a * g.mean(axis=(1, 2), keepdims=True)).sum(axis=-1), 0.0)
        for m in cam:
            up = zoom(m, (x.shape[1] / m.shape[0], x.shape[2] / m.shape[1]), order=1)
            maps.append(up / up.max() if up.max() > 0 else up)
        all_probs.append(probs)
    return np.stack(maps), np.concatenate(all_probs)


def overlay(ax, image: np.ndarray, heat: np.ndarray, title: str = "", colour: str = "black") -> None:
    """The image in grey with the heat map over it (matplotlib axes)."""
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    ax.imshow(heat, cmap="jet", alpha=0.35, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7, color=colour)
    ax.axis("off")


def overlay_files(names: list[str]) -> list[str]:
    """The overlay file of each image name: ``<stem>.png``, ``<stem>-2.png`` for the second of a
    stem (two inputs with one name, in other folders)."""
    files, used = [], set()
    for name in names:
        stem = Path(name).stem or "image"
        file, k = stem, 1
        while file in used:
            k += 1
            file = f"{stem}-{k}"
        used.add(file)
        files.append(f"{file}.png")
    return files


def write_overlays(out_dir: str | os.PathLike, names: list[str], images: np.ndarray, maps: np.ndarray,
                   probs: np.ndarray) -> list[Path]:
    """One PNG per image: the image, its heat map, the predicted class and its probability.

    Only files an earlier call wrote are replaced (:class:`osteo.files.OwnedFolder`): with
    ``out_dir`` the images' own folder, an overlay would have replaced its X-ray.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    files = overlay_files(names)
    OwnedFolder(out_dir, "--gradcam").claim(files)
    sweep_temporaries(out_dir, pattern=".*.tmp.png")  # overlays of a killed call
    written = []
    for name, file, image, heat, p in zip(names, files, images, maps, probs):
        fig, ax = plt.subplots(figsize=(3, 3.2))
        overlay(ax, image, heat, f"{Path(name).name}\n{CLASSES[int(p.argmax())]} {float(p.max()):.2f}")
        with atomic_path(out_dir / file) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
        plt.close(fig)
        written.append(out_dir / file)
    return written
