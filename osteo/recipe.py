"""Recipes: one small Python file per study setup, and typed dotted overrides.

A recipe file in ``recipes/`` defines ``recipe() -> Recipe``. Recipes are Python
code: load only recipe files you trust.

    >>> r = Recipe(name="demo")
    >>> apply_overrides(r, ["train.epochs=3", "model.head.dropout=0.2"]).train.epochs
    3
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from osteo.errors import OsteoError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class HeadConfig:
    """The custom head. The study's: GAP -> Dropout(0.5) -> Dense(3)."""

    dropout: float = 0.5
    units: tuple[int, ...] = ()


@dataclass
class AugmentConfig:
    """Training-only augmentation; factors as Keras layers define them (0 = off)."""

    flip: bool = True
    rotation: float = 0.0  # fraction of a full turn, e.g. 0.03 = +-11 degrees
    zoom: float = 0.2
    translation: float = 0.0
    shear: float = 0.2
    contrast: float = 0.0
    brightness: float = 0.0
    randaugment: bool = False  # Keras core RandAugment: ~26 ms CPU per 224 px image
    mixup: float = 0.0  # alpha; applied to training batches in the input pipeline
    cutmix: float = 0.0  # alpha; likewise


@dataclass
class DataConfig:
    dir: str = "data/phantom"
    image_size: int = 0  # 0: the backbone's default (224)
    resize: str = "pad"
    val: float = 0.3
    test: float = 0.0
    folds: int = 0
    fold: int = 0
    group_regex: str = ""
    groups_csv: str = ""
    conflicts: str = "exclude"
    batch_size: int = 16
    # The phantom written when ``dir`` is the default and does not exist yet.
    phantom_n: int = 1947
    phantom_size: int = 256


@dataclass
class ModelConfig:
    backbone: str = "convnext_tiny"
    weights: str = "imagenet"  # "imagenet", "none", or a path to a weights file
    freeze_bn: bool = True  # keep BatchNorm statistics frozen (transfer learning)
    bn_momentum: float = 0.0  # BatchNorm moving-average momentum; 0: the backbone's own (0.99)
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    epochs: int = 25  # phase 1: backbone frozen
    fine_tune_epochs: int = 0  # phase 2: backbone unfrozen; 0 = off (the study)
    fine_tune_blocks: int = 0  # 0 = every block
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-3  # Adam's default, as in the study
    fine_tune_lr: float = 1e-5
    weight_decay: float = 1e-4  # adamw only
    schedule: str = "constant"  # constant | cosine (with warmup)
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weight: str = "none"  # none | balanced
    monitor: str = "val_macro_f1"  # val_macro_f1 | val_balanced_accuracy | val_accuracy | val_loss
    early_stopping: int = 0  # patience in epochs; 0 = off
    precision: str = "auto"  # auto | float32 | mixed_bfloat16 | mixed_float16
    jit_compile: str = "auto"  # auto | on | off
    steps_per_epoch: int = 0  # 0 = the whole training split
    seed: int = 0
    deterministic: bool = False
    tensorboard: bool = True
    bootstrap: int = 1000  # resamples for the metrics' 95% intervals
    feature_cache: str = "auto"  # phase 1 on backbone features computed once; auto: when no augmentation


@dataclass
class Recipe:
    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runs_dir: str = "runs"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def study_protocol(backbone: str = "convnext_tiny") -> Recipe:
    """The study's protocol with its bugs fixed (``recipes/seed.py``).

    Frozen pretrained backbone, GAP -> Dropout(0.5) -> Dense(3), Adam at its default
    rate, sparse categorical cross-entropy, 25 epochs, 70/30 stratified split,
    shear/zoom/flip augmentation; fixed: each backbone's own preprocessing, training-
    only augmentation, a leakage-safe split, one checkpoint per run, chosen by macro F1
    and restored before evaluation.
    """
    return Recipe(
        name=f"seed-{backbone}",
        model=ModelConfig(backbone=backbone, weights="imagenet",
                          augment=AugmentConfig(flip=True, zoom=0.2, shear=0.2)),
        train=TrainConfig(epochs=25, lr=1e-3, optimizer="adam", monitor="val_macro_f1"),
    )


def fine_tune_protocol(backbone: str) -> Recipe:
    """osteo's recommended transfer-learning recipe for one backbone.

    The study's protocol, then phase 2: the whole backbone unfrozen (BatchNorm kept
    frozen) at a 100x lower learning rate; balanced class weights, because the
    classes are imbalanced (780 / 374 / 793 in the public knee set), and a cosine
    schedule with one warm-up epoch.
    """
    r = study_protocol(backbone)
    r.name = backbone
    r.train = TrainConfig(epochs=10, fine_tune_epochs=10, lr=1e-3, fine_tune_lr=1e-5, schedule="cosine",
                          warmup_epochs=1, class_weight="balanced", monitor="val_macro_f1")
    r.model.augment.rotation = 0.02
    return r


def set_total_epochs(recipe: Recipe, epochs: int) -> Recipe:
    """``EPOCHS=N``: N epochs in all; with two phases, phase 1 gets the larger half."""
    if epochs < 1:
        raise OsteoError(f"EPOCHS must be at least 1, got {epochs}")
    t = recipe.train
    if t.epochs and t.fine_tune_epochs:
        t.epochs = max(1, -(-epochs // 2))
        t.fine_tune_epochs = epochs - t.epochs
    elif t.fine_tune_epochs:
        t.fine_tune_epochs = epochs
    else:
        t.epochs = epochs
    return recipe


def recipe_path(name_or_path: str) -> Path:
    """A recipe name (``vgg16``) or a path to a recipe file."""
    p = Path(name_or_path)
    if p.suffix == ".py":
        if not p.is_file():
            raise OsteoError(f"recipe file {p} not found")
        return p
    p = RECIPES_DIR / f"{name_or_path}.py"
    if not p.is_file():
        known = sorted(f.stem for f in RECIPES_DIR.glob("*.py") if not f.name.startswith("_"))
        raise OsteoError(f"unknown recipe {name_or_path!r}; choose one of: {', '.join(known)} or a path to a .py file")
    return p


def load_recipe(name_or_path: str, backbone: str | None = None) -> Recipe:
    """Import a recipe file and call its ``recipe()``. The file is code: trust it first.

    A recipe that takes a ``backbone`` argument gets the one asked for on the command
    line (``--model``), so it can adjust per backbone (``recipes/demo.py`` does).
    """
    path = recipe_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"osteo_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "recipe"):
        raise OsteoError(f"recipe file {path} has no recipe() function")
    takes_backbone = "backbone" in inspect.signature(module.recipe).parameters
    r = module.recipe(backbone=backbone) if takes_backbone and backbone else module.recipe()
    if not isinstance(r, Recipe):
        raise OsteoError(f"recipe() in {path} must return osteo.recipe.Recipe, got {type(r).__name__}")
    return r


def _fields(obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _valid_keys(obj, prefix="") -> list[str]:
    keys = []
    for name in _fields(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += _valid_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _convert(text: str, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null", "") and len(args) < len(typing.get_args(hint)):
            return None
        return _convert(text, args[0], key)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise OsteoError(f"{key} expects true or false, got {text!r}")
    if origin is tuple:
        (item, *_rest) = typing.get_args(hint)
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        return tuple(_convert(p.strip(), item, key) for p in parts)
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise OsteoError(f"{key} expects {'an integer' if hint is int else 'a number'}, got {text!r}") from None
    return text


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``key=value`` strings (dotted keys, typed by the dataclass fields)."""
    for item in overrides:
        if "=" not in item:
            raise OsteoError(f"override {item!r} is not key=value; e.g. --set train.epochs=3")
        key, text = item.split("=", 1)
        key = key.strip()
        obj = recipe
        parts = key.split(".")
        for i, part in enumerate(parts):
            fields = _fields(obj)
            if part not in fields:
                raise OsteoError(f"unknown recipe key {key!r}; valid keys: {', '.join(_valid_keys(recipe))}")
            if i < len(parts) - 1:
                obj = getattr(obj, part)
                if not dataclasses.is_dataclass(obj):
                    raise OsteoError(f"unknown recipe key {key!r}; valid keys: {', '.join(_valid_keys(recipe))}")
        if dataclasses.is_dataclass(getattr(obj, parts[-1])):
            raise OsteoError(f"recipe key {key!r} is a section; set one of its fields, e.g. {key}.{next(iter(_fields(getattr(obj, parts[-1]))))}")
        hint = typing.get_type_hints(type(obj))[parts[-1]]
        setattr(obj, parts[-1], _convert(text.strip(), hint, key))
    return recipe


def recipe_from_dict(d: dict) -> Recipe:
    """Rebuild a Recipe from its ``recipe.json`` (unknown keys are an error)."""
    def build(cls, values):
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in values.items():
            if k not in hints:
                raise OsteoError(f"unknown recipe key {k!r} in recipe.json")
            if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
                v = build(hints[k], v)
            elif typing.get_origin(hints[k]) is tuple and isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    return build(Recipe, d)
