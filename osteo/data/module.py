"""The DataModule: audit -> split -> cache -> datasets, in one object (Lightning's habit).

    dm = DataModule(resolve(recipe).data, seed=0).setup()
    model.fit(dm.train_dataset(), steps_per_epoch=dm.steps_per_epoch(),
              validation_data=dm.eval_dataset("val"))

The image size and the batch size are the (resolved) data config's; the batch size
can be overridden per call (feature extraction, benchmarks).

``setup`` audits the folder (filling the shared image cache from the audit's own
decodes), splits it (or takes a saved ``split.csv`` when resuming), and checks that
every image of the split is cached. Files that became unreadable (or
whose bytes changed) after the audit are skipped with a warning and listed in
``skipped``; the Trainer counts them in ``env.json``.

The batches come from tf.data on the TensorFlow backend (:mod:`osteo.data.tfdata`) and
from :class:`osteo.data.feed.TorchFeed` on PyTorch, which keeps TensorFlow out of the
process and hands the model tensors already on its device; ``backend`` chooses (by
default the backend Keras has loaded).

MixUp and CutMix (``mixup``/``cutmix`` alpha > 0) mix training batches here, in the
input pipeline, because they mix labels too; the labels become soft (B, 3) targets. The
mixing coefficients are drawn from generators seeded by (seed, step), so a resumed run
sees the same batches.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.data.pipeline import SCALE, Entry, ImageCache, load_split
from osteo.data.scan import audit
from osteo.data.split import (
    MIN_TEST_PER_CLASS,
    check_split,
    majority_label,
    read_groups_csv,
    split_rows,
)
from osteo.errors import OsteoError

log = logging.getLogger("osteo")


class DataModule:
    def __init__(self, cfg, seed: int = 0, mixup: float = 0.0, cutmix: float = 0.0, backend: str | None = None):
        if cfg.image_size < 1:
            raise ValueError("DataModule needs a resolved data config (image_size >= 1): use osteo.recipe.resolve")
        self.cfg = cfg
        self.image_size = int(cfg.image_size)
        self.batch_size = int(cfg.batch_size)
        self.seed = int(seed)
        self.mixup, self.cutmix = float(mixup), float(cutmix)
        self.audit = None
        self.split: list[dict] = []
        self.excluded: list[str] = []
        self.skipped: list[str] = []
        self._files: dict[str, list[str]] = {}
        self._rows: dict[str, list[dict]] = {}
        keras = sys.modules.get("keras")
        self.backend = backend or (keras.backend.backend() if keras is not None else "tensorflow")
        self._levels: dict[str, np.ndarray] = {}  # PyTorch: each split's images, read once

    # ------------------------------------------------------------------ setup

    def setup(self, split: list[dict] | None = None, progress=None) -> DataModule:
        """Audit, split (or ``split``, a resumed run's own) and cache."""
        cfg = self.cfg
        root = Path(cfg.dir)
        cache = ImageCache(self.image_size, cfg.resize)
        # the audit's decodes fill the cache: a new dataset's files are read and decoded once
        self.audit = audit(root, progress=(lambda k, n: progress("audit", k, n)) if progress else None,
                           cache=cache, memo=cache.root)
        ok = {r.path: r for r in self.audit.ok()}
        if not ok:
            raise OsteoError(f"no readable images in {root}{self.audit.first_unreadable()}; "
                             f"put PNG/JPEG/DICOM files under {root}/<class>/")
        if split is None:
            groups = read_groups_csv(cfg.groups_csv) if cfg.groups_csv else None
            split, self.excluded = split_rows(
                self.audit.manifest_rows(), val_fraction=cfg.val, test_fraction=cfg.test, folds=cfg.folds,
                fold=cfg.fold, seed=self.seed, group_regex=cfg.group_regex or None, groups=groups,
                conflicts=cfg.conflicts, inner_val=cfg.inner_val, group_by=cfg.group_by,
            )
            # a cross-validation's test split is one outer fold: its numbers are pooled over all folds
            check_split(split, min_test=MIN_TEST_PER_CLASS if cfg.test and not cfg.folds else 0,
                        val_option="--set data.inner_val=F" if cfg.folds else "--set data.val=F")
        self.split = split
        entries, gone = {}, []
        for r in split:
            rec = ok.get(r["path"])
            if rec is None:
                gone.append(r["path"])
            else:
                entries[r["path"]] = Entry.from_row(root, rec)
        failed = cache.fill(list(entries.values()),
                            progress=(lambda k, n: progress("cache", k, n)) if progress else None)
        bad = {e.path for e in failed}
        gone += [p for p, e in entries.items() if e.path in bad]
        self.skipped = sorted(set(gone))
        for p in self.skipped:
            log.warning("skipping %s: unreadable, changed or missing since the split was made", p)
        skipped = set(self.skipped)
        for name in ("train", "val", "test"):
            rows = [r for r in split if r["split"] == name and r["path"] not in skipped]
            self._rows[name] = rows
            self._files[name] = [str(cache.path(entries[r["path"]].sha256)) for r in rows]
        if not self._rows["train"] or not self._rows["val"]:
            raise OsteoError(f"the split of {root} leaves no training or no validation images; add images")
        return self

    # ------------------------------------------------------------------ queries

    def rows(self, name: str) -> list[dict]:
        return self._rows.get(name, [])

    def count(self, name: str) -> int:
        return len(self.rows(name))

    def labels(self, name: str) -> np.ndarray:
        return np.array([CLASSES.index(r["label"]) for r in self.rows(name)], dtype=np.int32)

    def steps_per_epoch(self, batch_size: int | None = None) -> int:
        return -(-self.count("train") // (batch_size or self.batch_size))

    def class_weights(self) -> dict[int, float]:
        """``balanced``: n / (k * n_c) from the training split (scikit-learn's formula)."""
        counts = Counter(self.labels("train").tolist())
        n, k = sum(counts.values()), len(CLASSES)
        return {i: (n / (k * counts[i]) if counts[i] else 0.0) for i in range(k)}

    def majority_class(self) -> str:
        return majority_label(r["label"] for r in self.rows("train"))

    # ------------------------------------------------------------------ datasets

    def train_dataset(self, batch_size: int | None = None, start_epoch: int = 0, steps_per_epoch: int | None = None,
                      class_weight: dict | None = None):
        """Endless training batches, positioned at Keras epoch ``start_epoch`` (for resume).

        With ``steps_per_epoch`` other than a full pass, Keras epochs and passes over the
        data differ; the stream is positioned by batches, so a resumed run sees exactly
        the batches an uninterrupted one would have. ``class_weight``: PyTorch's batches carry
        the sample weights it gives (Keras' ``fit(class_weight=...)`` on TensorFlow).
        """
        batch_size = batch_size or self.batch_size
        per_pass = self.steps_per_epoch(batch_size)
        step = start_epoch * (steps_per_epoch or per_pass)
        if self.backend == "torch":
            from osteo.data.feed import TorchFeed

            return TorchFeed(self._split_levels("train"), self.labels("train"), batch_size, training=True,
                             seed=self.seed, start_batch=step, mixup=self.mixup, cutmix=self.cutmix,
                             class_weight=class_weight)
        if class_weight is not None:
            raise ValueError("on TensorFlow, class weights go to Keras' fit(class_weight=...)")
        from osteo.data import tfdata

        ds = tfdata.make_dataset(self._files["train"], self.labels("train"), self.image_size, batch_size,
                                 training=True, seed=self.seed, start_epoch=step // per_pass)
        if step % per_pass:
            ds = ds.skip(step % per_pass)
        if self.mixup > 0 or self.cutmix > 0:
            mix = lambda k, batch: tfdata.mix_batch(k, batch, seed=self.seed, mixup=self.mixup, cutmix=self.cutmix,
                                                    size=self.image_size)
            ds = ds.enumerate(step).map(mix, num_parallel_calls=tfdata.AUTOTUNE)
        return ds

    def eval_dataset(self, name: str, batch_size: int | None = None):
        """One pass over split ``name``, in order: tf.data on TensorFlow, a TorchFeed on PyTorch."""
        if not self.count(name):
            raise OsteoError(f"the split has no {name} images")
        batch_size = batch_size or self.batch_size
        if self.backend == "torch":
            from osteo.data.feed import TorchFeed

            return TorchFeed(self._split_levels(name), self.labels(name), batch_size)
        from osteo.data import tfdata

        return tfdata.make_dataset(self._files[name], self.labels(name), self.image_size, batch_size)

    def eval_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Split ``name``'s images (float32 in [0, 255]) and labels as NumPy arrays."""
        levels = self._levels.get(name)
        levels = load_split(self._files[name], self.image_size) if levels is None else levels
        return levels.astype(np.float32) / np.float32(SCALE), self.labels(name)

    def _split_levels(self, name: str) -> np.ndarray:
        if name not in self._levels:
            self._levels[name] = load_split(self._files[name], self.image_size)
        return self._levels[name]
