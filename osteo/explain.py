"""Grad-CAM (Selvaraju et al., 2017): where in the knee the model looked for its answer.

The heat map of class c is ReLU(sum_k w_k A_k), with A the activations of the layer the
backbone's spec names (``gradcam_layer``: its last convolutional stage) and w_k the mean
over positions of d score_c / d A_k; it is upsampled to the input size and scaled to
[0, 1] per image. The layer comes from the spec, never from matching names here.

A map has one value per cell of that layer's feature map: at small inputs the last stage
is 1x1 or 2x2 (VGG at 32 px, ConvNeXt at 48 px), and its upsampled "map" is a flat tint
that shows nothing. Where the last stage has fewer than :data:`MIN_CELLS` cells a side,
Grad-CAM reads the deepest layer that has them (:func:`gradcam_target`), as the original
paper does for earlier layers: less class-specific, but a map; :class:`Target` says which.

Gradients are the backend's own (TensorFlow's tape, PyTorch's autograd); everything else
is Keras.

    >>> maps, probs = gradcam(model, spec, images)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from osteo import CLASSES
from osteo.errors import OsteoError
from osteo.files import OwnedFolder, atomic_path, sweep_temporaries
from osteo.registry import BackboneSpec

# The fewest feature-map cells a side for a map that shows where the model looked: the last
# stage of the ImageNet backbones at their own 224 px input
MIN_CELLS = 7


@dataclass(frozen=True)
class Target:
    """The layer Grad-CAM reads and its grid; ``last`` and ``last_cells``: the last stage's."""

    layer: str
    cells: tuple[int, int]
    last: str
    last_cells: tuple[int, int]

    def describe(self, size: int) -> str:
        """What the maps are of, in words (the report prints it beside them)."""
        grid = lambda cells: f"{cells[0]}x{cells[1]}"
        if self.layer == self.last:
            return f"heat on {self.layer}, the last stage ({grid(self.cells)} cells at {size} px)"
        return (f"the last stage ({self.last}) is {grid(self.last_cells)} at {size} px, too coarse to show where "
                f"the model looked; heat on {self.layer} ({grid(self.cells)} cells), the deepest layer with at "
                f"least {MIN_CELLS}x{MIN_CELLS}")


def _engine_call(model: keras.Model, spec: BackboneSpec, method: str, *args):
    """The model's engine's ``method`` (:class:`osteo.backbones.base.Backbone`). A model loaded
    whole (a run saved before weights-only checkpoints) has Keras' layers."""
    engine = getattr(model, "osteo_backbone", None)
    if engine is not None:
        return getattr(engine, method)(model, *args)
    from osteo.backbones import keras_apps

    return getattr(keras_apps, f"keras_{method}")(model, spec, *args)


def gradcam_target(model: keras.Model, spec: BackboneSpec) -> Target:
    """The last stage where its map has :data:`MIN_CELLS` cells a side, else the deepest layer
    that has them; an error where no layer has."""
    maps = _engine_call(model, spec, "feature_maps")
    last, last_cells = maps[-1]
    fine = [(name, cells) for name, cells in maps if min(cells) >= MIN_CELLS]
    if not fine:
        raise OsteoError(f"no layer of {spec.name} has a feature map of {MIN_CELLS}x{MIN_CELLS} cells at this input "
                         "size, so Grad-CAM cannot show where it looked; train at a larger image size")
    return Target(*fine[-1], last, last_cells)


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
            batch: int = 16, target: Target | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps (N, H, W) in [0, 1] for ``classes`` (default: each image's predicted class), and the
    probabilities (N, 3). ``images`` are the model's inputs: (N, H, W, 1) float in [0, 255]; the
    layer is ``target`` (default: :func:`gradcam_target`)."""
    from scipy.ndimage import zoom

    parts = _engine_call(model, spec, "gradcam_parts", (target or gradcam_target(model, spec)).layer)
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
                   probs: np.ndarray, target: Target | None = None) -> list[Path]:
    """One PNG per image: the image, its heat map, the predicted class and its probability, and
    the layer the map is of (``target``'s, with its grid).

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
        title = f"{Path(name).name}\n{CLASSES[int(p.argmax())]} {float(p.max()):.2f}"
        if target is not None:
            title += f"\nheat on {target.layer} ({target.cells[0]}x{target.cells[1]})"
        overlay(ax, image, heat, title)
        with atomic_path(out_dir / file) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
        plt.close(fig)
        written.append(out_dir / file)
    return written
