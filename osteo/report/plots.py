"""The report's figures (``plots/*.png``): training curves, confusion matrices, ROC curves,
reliability diagrams, headline bars, sample predictions and Grad-CAM maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.errors import OsteoError
from osteo.evaluate import METRICS, reliability_curve
from osteo.files import atomic_path
from osteo.report.load import Run, load_run
from osteo.report.tables import cell_text, to_float
from osteo.runs import CvDir, RunDir


def run_colours(runs: list[Run]) -> dict[Path, tuple]:
    """A colour per run (by its folder), told apart as :func:`_names` tells them: by model where
    each model has one run, else each run its own (three seeds of one model were one colour)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    names = _names(runs)
    index = {n: i for i, n in enumerate(sorted(set(names)))}
    return {r.path: cmap(index[n] % 10) for r, n in zip(runs, names)}


def _names(runs: list[Run]) -> list[str]:
    """What plots call each run: its model and the images its numbers are on (a validation
    split chose its checkpoint and temperature, a test split nothing), or its label (run id
    too) where a model has several rows (--all, an external validation)."""
    models = [r.model for r in runs]
    names = [f"{r.model} ({r.evaluated_on})" for r in runs] if len(set(models)) == len(models) else \
        [r.label for r in runs]
    # images that chose the checkpoint (validation) score it optimistically: said on every plot
    return [n if r.chose == "nothing" else f"{n}, optimistic" for r, n in zip(runs, names)]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _tight(fig) -> None:
    """``fig.tight_layout()``, without its warning where a grid of many runs cannot fit: the layout
    is left as it is, and :func:`_save`'s tight bounding box keeps every label in the file."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()


def _floats(rows: list[dict], key: str) -> np.ndarray:
    return np.array([to_float(r.get(key)) for r in rows])


def plot_curves(runs: list[Run], colours, out: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 2.8 * len(runs)), squeeze=False)
    for (ax_acc, ax_loss), r in zip(axes, runs):
        h = r.history
        if not h:
            ax_acc.set_title(f"{r.label}: no history")
            continue
        ep = _floats(h, "epoch")
        col = colours[r.path]
        for ax, key in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            ax.plot(ep, _floats(h, key), color=col, linestyle="--", marker="o", markersize=3, label=f"train {key}")
            ax.plot(ep, _floats(h, f"val_{key}"), color=col, marker="o", markersize=3, label=f"validation {key}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            step = np.diff(_floats(h, "phase"))
            change = np.flatnonzero(np.isfinite(step) & (step != 0) & np.isfinite(ep[:-1]))
            for i in change:  # before phase 2's first epoch (after an early stop, epochs are skipped)
                ax.axvline(ep[i + 1] - 0.5, color="grey", linestyle=":", label="phase 2 starts")
            ax.set_xlabel("epoch")
            ax.set_title(f"{r.label}: {key}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        best = to_float(r.metrics.get("best_epoch"))
        if np.isfinite(best):
            ax_acc.axvline(best, color="black", alpha=0.4, linewidth=3, label="best")
    _tight(fig)
    return _save(fig, out / "curves.png")


def plot_confusions(runs: list[Run], out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(8, 3.4 * len(runs)), squeeze=False)
    for (ax_n, ax_r), r in zip(axes, runs):
        cm = np.array(r.metrics["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        for ax, mat, title, fmt in ((ax_n, cm, "counts", "{:.0f}"), (ax_r, norm, "row-normalised", "{:.2f}")):
            ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            for i in range(len(CLASSES)):
                for j in range(len(CLASSES)):
                    ax.text(j, i, fmt.format(mat[i, j]), ha="center", va="center",
                            color="white" if norm[i, j] > 0.6 else "black", fontsize=9)
            ax.set_xticks(range(len(CLASSES)), CLASSES, fontsize=8)
            ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"{r.label}: {title}", fontsize=9)
    _tight(fig)
    return _save(fig, out / "confusion.png")


def plot_roc(runs: list[Run], colours, out: Path) -> Path:
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, len(CLASSES), figsize=(4 * len(CLASSES), 4))
    for ax, (i, c) in zip(axes, enumerate(CLASSES)):
        for r, name in zip(runs, _names(runs)):
            auc = r.metrics["per_class"][c]["roc_auc"]
            if auc is None:  # one class only in the split, or non-finite probabilities: no curve
                continue
            fpr, tpr, _ = roc_curve(r.y == i, r.probs[:, i])
            ax.plot(fpr, tpr, color=colours[r.path], label=f"{name} AUC {auc:.2f}")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(f"{c} vs rest", fontsize=10)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    _tight(fig)
    return _save(fig, out / "roc.png")


def plot_reliability(runs: list[Run], colours, out: Path) -> Path:
    """Reliability diagrams before and after each run's temperature scaling."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, after in zip(axes, (False, True)):
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        for r, name in zip(runs, _names(runs)):
            probs = r.calibrated if after else r.probs
            if probs is None or (not after and r.metrics.get("probabilities") == "calibrated"):
                continue  # an ensemble's probabilities are its folds' calibrated ones: nothing as trained
            finite = np.isfinite(probs).all(axis=1)  # a NaN row has no confidence to bin
            curve = reliability_curve(r.y[finite], probs[finite])
            ece = r.metrics["ece_calibrated"] if after else r.metrics["ece"]
            ax.plot(curve[:, 0], curve[:, 1], marker="o", color=colours[r.path], label=f"{name} ECE {cell_text(ece)}")
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title("after temperature scaling" if after else "as trained")
    _tight(fig)
    return _save(fig, out / "reliability.png")


def plot_bars(runs: list[Run], colours, out: Path, oracles: list[Run] = ()) -> Path:
    """The headline metrics, a bar per run with its interval. Each run's majority-class baseline
    and, on the phantom, its oracle's ceiling are short lines over its own bar only: both are of
    that run's images (an oracle of the split the run was scored on; none over an external
    folder's row). One legend for the figure, under it, where it covers no bar."""
    import matplotlib.pyplot as plt

    headline = [m for m in METRICS if m.headline]
    fig, axes = plt.subplots(1, len(headline), figsize=(4.2 * len(headline), 3.8), sharey=True)
    names = _names(runs)
    ceiling = {(o.data_dir, o.split_id): o for o in oracles}
    of_run = [None if r.evaluated_on.startswith("external") else ceiling.get((r.data_dir, r.split_id)) for r in runs]
    legend = {}
    for ax, metric in zip(axes, headline):
        k = metric.name
        vals = [r.metrics[k] for r in runs]
        lo = [r.metrics.get(f"{k}_ci", (v, v))[0] for r, v in zip(runs, vals)]
        hi = [r.metrics.get(f"{k}_ci", (v, v))[1] for r, v in zip(runs, vals)]
        x = np.arange(len(runs))
        ax.bar(x, vals, color=[colours[r.path] for r in runs],
               yerr=[np.subtract(vals, lo), np.subtract(hi, vals)], capsize=4)
        if all(k in r.majority for r in runs):
            # each run's own baseline: runs on other splits (one class only, say) have other ones
            legend["majority class, on each run's images"] = ax.hlines(
                [r.majority[k] for r in runs], x - 0.4, x + 0.4, color="red", linestyle="--")
        at = [i for i, o in enumerate(of_run) if o is not None and k in o.metrics]
        if at:  # the ceiling: a classifier that sees the phantom's true latents
            legend["oracle (the phantom's true latents), on each run's images"] = ax.hlines(
                [of_run[i].metrics[k] for i in at], x[at] - 0.4, x[at] + 0.4, color="green", linestyle=":",
                linewidth=2)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric.label + (" (95% CI)" if metric.interval else ""), fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    _tight(fig)
    if legend:  # above the plots, outside them (the tick labels are below): _save's tight box keeps it
        fig.legend(list(legend.values()), list(legend), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                   ncol=len(legend), fontsize=8, frameon=False)
    return _save(fig, out / "metrics.png")


def _sample(r: Run, per_kind: int) -> list[int | None]:
    """The ``per_kind`` most confident correct, then wrong, predictions (None where there are fewer)."""
    pred, conf = r.probs.argmax(1), np.nan_to_num(r.probs.max(1), nan=-1.0)
    order = np.argsort(-conf, kind="stable")
    right = [int(i) for i in order if pred[i] == r.y[i]][:per_kind]
    wrong = [int(i) for i in order if pred[i] != r.y[i]][:per_kind]
    return [*right, *[None] * (per_kind - len(right)), *wrong, *[None] * (per_kind - len(wrong))]


def plot_gradcam(runs: list[Run], out: Path, per_kind: int = 3) -> tuple[Path, list[str]]:
    """Per run: Grad-CAM on a fixed sample of its correct and wrong images (those of its row);
    returns the figure and one line per run saying which layer, of how many cells, the maps are
    of (:meth:`osteo.explain.Target.describe`), or why it has none.

    A cross-validation shows its first fold; a run whose model cannot be loaded (or an
    external row) gets a note instead of maps.
    """
    import matplotlib.pyplot as plt

    cols = 2 * per_kind
    fig, axes = plt.subplots(len(runs), cols, figsize=(1.7 * cols, 2.1 * len(runs)), squeeze=False)
    notes = []
    for axrow, r, name in zip(axes, runs, _names(runs)):
        for ax in axrow:
            ax.axis("off")
        try:
            sample, images, maps, picked, target = _gradcam_sample(r, per_kind)
        except (OsteoError, OSError, ValueError) as e:
            axrow[0].text(0, 0.5, f"{name}: no Grad-CAM ({str(e)[:80]})", fontsize=7, transform=axrow[0].transAxes)
            notes.append(f"{name}: no Grad-CAM ({e})")
            continue
        notes.append(f"{name}: {target.describe(images.shape[1])}")
        from osteo.explain import overlay

        for ax, i, image, heat in zip(axrow, picked, images, maps):
            p, y = sample.probs[i], sample.y[i]
            overlay(ax, image, heat, f"true {CLASSES[y]}\npred {CLASSES[p.argmax()]} {p.max():.2f}",
                    "green" if p.argmax() == y else "red")
        axrow[0].text(-0.1, 0.5, f"{name}\n{target.layer}", transform=axrow[0].transAxes, rotation=90, ha="right",
                      va="center", fontsize=7)
    _tight(fig)
    return _save(fig, out / "gradcam.png"), notes


def _gradcam_sample(r: Run, per_kind: int):
    from osteo.explain import gradcam, gradcam_target
    from osteo.predict import load_best, load_images
    from osteo.registry import get_backbone

    if r.evaluated_on.startswith("external") or r.path.name == "oracle":
        raise OsteoError("not a row of the run's own images")
    run = CvDir(r.path).fold(1) if r.folds else RunDir(r.path)
    sample = r if not r.folds else load_run(run, "auto", 0)  # the first fold's held-out images
    picked = [i for i in _sample(sample, per_kind) if i is not None]
    if not picked:
        raise OsteoError("no images")
    recipe = run.read_recipe()
    data_dir = Path(sample.audit.get("data_dir") or recipe.data.dir)
    images, reasons = load_images([data_dir / sample.rows[i]["path"] for i in picked], recipe.data.image_size,
                                  recipe.data.resize)
    if any(img is None for img in images):
        raise OsteoError(next(r for img, r in zip(images, reasons) if img is None))  # (a readable image may say blank)
    images = np.stack(images)
    model, spec = load_best(run), get_backbone(recipe.model.backbone)
    target = gradcam_target(model, spec)
    maps, _ = gradcam(model, spec, images, classes=sample.probs[picked].argmax(1), target=target)
    return sample, images, maps, picked, target


def plot_samples(runs: list[Run], out: Path, per_kind: int = 4) -> Path:
    """Per model: the most confident correct and wrong predictions on the images of its row."""
    import matplotlib.pyplot as plt

    from osteo.data.decode import DecodeError, decode_file

    cols = 2 * per_kind
    fig, axes = plt.subplots(len(runs), cols, figsize=(1.6 * cols, 2.0 * len(runs)), squeeze=False)
    for axrow, r in zip(axes, runs):
        data_dir = Path(r.audit.get("data_dir") or r.recipe.get("data", {}).get("dir", "."))
        pred = r.probs.argmax(1)
        conf = r.probs.max(1)
        right = [i for i in np.argsort(-conf) if pred[i] == r.y[i]][:per_kind]
        wrong = [i for i in np.argsort(-conf) if pred[i] != r.y[i]][:per_kind]
        for ax, i in zip(axrow, [*right, *[None] * (per_kind - len(right)), *wrong]):
            ax.axis("off")
            if i is None:
                continue
            try:
                img = decode_file(data_dir / r.rows[i]["path"])[0][..., 0]
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            except DecodeError:
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7)
            ok = pred[i] == r.y[i]
            ax.set_title(f"true {CLASSES[r.y[i]]}\npred {CLASSES[pred[i]]} {conf[i]:.2f}",
                         fontsize=6, color="green" if ok else "red")
        axrow[0].text(-0.1, 0.5, f"{r.model}\n{r.evaluated_on}", transform=axrow[0].transAxes, rotation=90,
                      ha="right", va="center", fontsize=8)
    fig.suptitle("most confident correct (green) and wrong (red) predictions", fontsize=9)
    _tight(fig)
    return _save(fig, out / "samples.png")
