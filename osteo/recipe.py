"""Recipes: small Python files per study setup, typed dotted overrides, and ``resolve``.

A recipe file defines ``recipe() -> Recipe`` (or ``recipe(backbone) -> Recipe``). The
shipped ones live in ``recipes/``, installed as the package ``osteo.recipes`` so that a
non-editable install finds them too; any other file is loaded by its path. Recipes are
Python code: load only recipe files you trust.

:func:`resolve` is the one place a recipe is completed and checked: it fills the
backbone's defaults (image size, preprocessing) and validates every value, before
anything is written. ``recipe.json`` stores the resolved recipe, and resume, predict
and report read it as it is.

    >>> r = Recipe(name="demo")
    >>> apply_overrides(r, ["train.epochs=3", "model.head.dropout=0.2"]).train.epochs
    3
    >>> resolve(Recipe(model=ModelConfig(backbone="vgg16"))).data.image_size
    224
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import math
import os
import re
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from osteo import CLASSES
from osteo.errors import OsteoError

# The largest image side a recipe may ask for: 2048 px x 2048 px x 3 channels of float32
# is 48 MiB per image before the backbone's activations.
MAX_IMAGE_SIZE = 2048


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


    def active(self) -> bool:
        """True when any augmentation is on (read off the fields, so a new one counts too)."""
        return any(bool(getattr(self, f.name)) for f in dataclasses.fields(self))

@dataclass
class DataConfig:
    dir: str = "data/phantom"
    image_size: int = 0  # 0: the backbone's default; resolve() fills it
    resize: Literal["pad", "stretch"] = "pad"
    val: float = 0.3
    test: float = 0.0  # held out: chooses nothing, so its numbers are the honest ones
    folds: int = 0
    fold: int = 0
    # nested cross-validation's inner split (osteo train --folds, osteo study): with folds, the
    # outer fold is held out as "test" and this fraction of the other images validates; 0: off
    inner_val: float = 0.0
    group_regex: str = ""
    groups_csv: str = ""
    # where patients come from for the split (osteo.data.split): auto = DICOM PatientIDs, the regex, the CSV
    group_by: Literal["auto", "dicom", "regex", "csv", "none"] = "auto"
    conflicts: Literal["exclude", "majority", "keep"] = "exclude"
    batch_size: int = 16
    # The phantom written when ``dir`` is the default and does not exist yet.
    phantom_n: int = 1947
    phantom_size: int = 256


@dataclass
class ModelConfig:
    backbone: str = "convnext_tiny"
    weights: str = "imagenet"  # "imagenet", "none", or a path to a weights file
    # keras: keras.applications layers; timm: timm's PyTorch module inside the Keras model
    # (PyTorch backend only); auto: timm on PyTorch where timm has the backbone, filled by resolve()
    impl: Literal["auto", "keras", "timm"] = "auto"
    # the input scaling the backbone expects; auto: the implementation's own, filled by resolve()
    # (timm: the module's pretrained_cfg mean and std)
    preprocessing: Literal["auto", "caffe", "torch", "tf", "none", "timm"] = "auto"
    freeze_bn: bool = True  # keep BatchNorm statistics frozen (transfer learning)
    # BatchNorm moving-average momentum, in Keras' terms, on both engines; 0: the architecture's
    # reference value (keras.applications': 0.99 for most, filled by resolve())
    bn_momentum: float = 0.0
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


# The seed of every bootstrap a run's numbers are drawn with, unless a command is given --seed: not
# the training seed, so that training, osteo eval, osteo calibrate, a cross-validation's pooled line
# and the report draw the same intervals from the same predictions, with as many resamples (the
# run's train.bootstrap; the report's --bootstrap: both DEFAULT_BOOTSTRAP unless set)
BOOTSTRAP_SEED = 0
DEFAULT_BOOTSTRAP = 1000  # a recipe's train.bootstrap, and the report's --bootstrap


@dataclass
class TrainConfig:
    epochs: int = 25  # phase 1: backbone frozen
    fine_tune_epochs: int = 0  # phase 2: backbone unfrozen; 0 = off (the study)
    # phase 2 trains the top N architectural stages (0 = all): the same stages on both engines
    # (VGG: 5 conv blocks, DenseNet: 4 dense blocks, ConvNeXt: 4 stages; docs/ARCHITECTURE.md)
    fine_tune_blocks: int = 0
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3  # Adam's default, as in the study
    fine_tune_lr: float = 1e-5
    weight_decay: float = 1e-4  # adamw only
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: with warmup
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    class_weight: Literal["none", "balanced"] = "none"
    monitor: Literal["val_macro_f1", "val_balanced_accuracy", "val_accuracy", "val_loss"] = "val_macro_f1"
    early_stopping: int = 0  # patience in epochs, counted within each phase and across a resume; 0 = off
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    jit_compile: Literal["auto", "on", "off"] = "auto"
    steps_per_epoch: int = 0  # 0 = the whole training split
    seed: int = 0
    deterministic: bool = False
    tensorboard: bool = True
    # screening thresholds chosen on validation after calibration: CLASS[+]:sensitivity|specificity=X
    operating_points: tuple[str, ...] = ("osteoporosis:sensitivity=0.9", "osteopenia+:sensitivity=0.9")
    mlflow: bool = False  # log to MLflow ($MLFLOW_TRACKING_URI, else a file store in ./mlruns)
    bootstrap: int = DEFAULT_BOOTSTRAP  # resamples for the metrics' 95% intervals
    # phase 1 on backbone features computed once; auto: when no augmentation is active
    feature_cache: Literal["auto", "on", "off"] = "auto"


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
    """osteo's recommended transfer-learning recipe for one backbone (``recipes/finetune.py``).

    The study's protocol, then phase 2: the whole backbone unfrozen (BatchNorm kept
    frozen) at a 100x lower learning rate; balanced class weights, because the
    classes are imbalanced (780 / 374 / 793 in the public knee set), and a cosine
    schedule with one warm-up epoch. A 70/15/15 split: validation chooses, test reports.
    """
    r = study_protocol(backbone)
    r.name = f"finetune-{backbone}"
    # 70/15/15: the checkpoint, temperature and thresholds are chosen on validation, and every
    # number is reported on a test split that chose nothing
    r.data.val, r.data.test = 0.15, 0.15
    r.train = TrainConfig(epochs=10, fine_tune_epochs=10, lr=1e-3, fine_tune_lr=1e-5, schedule="cosine",
                          warmup_epochs=1, class_weight="balanced", monitor="val_macro_f1")
    r.model.augment.rotation = 0.02
    return r


def train_size(recipe: Recipe) -> int:
    """The image side a run trains at: ``data.image_size``, or the backbone's default where it
    is 0 (:func:`resolve` fills it in)."""
    from osteo.registry import get_backbone

    return recipe.data.image_size or get_backbone(recipe.model.backbone).default_size


def _check_warmup(t: TrainConfig) -> None:
    """A warm-up belongs to the cosine schedule and fits in each phase that trains: longer,
    the learning rate never reaches its peak (50 warm-up epochs in 2 trained at 1/25 of it)."""
    if not t.warmup_epochs:
        return
    if t.schedule != "cosine":
        raise OsteoError(f"train.warmup_epochs={t.warmup_epochs} has no effect with train.schedule={t.schedule}: the "
                         "warm-up is the cosine schedule's; set train.schedule=cosine, or train.warmup_epochs=0")
    for phase, epochs in (("the head's phase (train.epochs)", t.epochs),
                          ("the fine-tuning phase (train.fine_tune_epochs)", t.fine_tune_epochs)):
        if 0 < epochs < t.warmup_epochs:
            raise OsteoError(f"train.warmup_epochs={t.warmup_epochs} is longer than {phase}, {epochs} epoch(s): its "
                             f"learning rate would never reach its peak; set train.warmup_epochs={epochs} or fewer, "
                             "or train longer")


def set_total_epochs(recipe: Recipe, epochs: int) -> Recipe:
    """``EPOCHS=N``: N epochs in all; with two phases, phase 1 gets the larger half."""
    if epochs < 1:
        raise OsteoError(f"--epochs (make's EPOCHS=) must be at least 1, got {epochs}")
    t = recipe.train
    if t.epochs and t.fine_tune_epochs:
        t.epochs = max(1, -(-epochs // 2))
        t.fine_tune_epochs = epochs - t.epochs
    elif t.fine_tune_epochs:
        t.fine_tune_epochs = epochs
    else:
        t.epochs = epochs
    return recipe


def _shipped_recipes() -> Path:
    """The folder of the recipes osteo ships (``recipes/``, installed as ``osteo.recipes``)."""
    spec = importlib.util.find_spec("osteo.recipes")
    if spec is None or not spec.submodule_search_locations:
        raise OsteoError("osteo's recipes are not installed; reinstall osteo (pip install .)")
    return Path(next(iter(spec.submodule_search_locations)))


def list_recipes() -> list[str]:
    return sorted(f.stem for f in _shipped_recipes().glob("*.py") if not f.name.startswith("_"))


def recipe_path(name_or_path: str) -> Path:
    """A shipped recipe's name (``seed``) or a path to a recipe file."""
    p = Path(name_or_path)
    if p.suffix == ".py":
        if not p.is_file():
            raise OsteoError(f"recipe file {p} not found; pass an existing .py file or a recipe name")
        return p
    p = _shipped_recipes() / f"{name_or_path}.py"
    if not p.is_file():
        # make's RECIPE is its MODEL unless given: a mistyped model's name is seen here
        from osteo.registry import list_backbones

        raise OsteoError(f"unknown recipe {name_or_path!r}; choose one of: {', '.join(list_recipes())}, "
                         f"a registered model name ({', '.join(list_backbones())}), or a path to a .py file")
    return p


def load_recipe(name_or_path: str, backbone: str | None = None) -> Recipe:
    """Import a recipe file and call its ``recipe()``. The file is code: trust it first.

    A recipe that takes a ``backbone`` argument gets the one asked for on the command
    line (``--model``), so it can adjust per backbone (``finetune``, ``seed`` and
    ``demo`` do); the backbone is then set on the recipe either way.
    """
    path = recipe_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"osteo_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    with _recipe_errors(path, "importing it"):
        spec.loader.exec_module(module)
    if not hasattr(module, "recipe"):
        raise OsteoError(f"recipe file {path} has no recipe() function")
    takes_backbone = "backbone" in inspect.signature(module.recipe).parameters
    with _recipe_errors(path, "running its recipe()"):
        r = module.recipe(backbone=backbone) if takes_backbone and backbone else module.recipe()
    if not isinstance(r, Recipe):
        raise OsteoError(f"recipe() in {path} must return osteo.recipe.Recipe, got {type(r).__name__}")
    if backbone:
        r.model.backbone = backbone
    return r


@contextlib.contextmanager
def _recipe_errors(path: Path, doing: str):
    """A recipe file's own error (a syntax error, a failed import, an exception in recipe())
    as one line naming the file, the line and the error; osteo's own errors pass as they are."""
    try:
        yield
    except OsteoError:
        raise
    except Exception as e:  # the file is the user's code: any error is theirs to fix
        frames = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        line = frames[-1] if frames else None
        if isinstance(e, SyntaxError) and e.filename and Path(e.filename).resolve() == path.resolve():
            line = e.lineno  # in the recipe itself; one in a module it imports keeps the import's line
        where = f"{path}, line {line}" if line else str(path)
        detail = " ".join(str(e.msg if isinstance(e, SyntaxError) else e).split())[:200]
        raise OsteoError(f"recipe file {where} failed while {doing}: {type(e).__name__}: {detail}; "
                         "fix the recipe file, or pass a shipped recipe") from None


def names_backbone(name: str) -> bool:
    """Whether ``osteo train NAME`` names a registered backbone (trained with the ``finetune``
    recipe) rather than a recipe: not a file, not a shipped recipe, a backbone's name."""
    from osteo.registry import list_backbones

    return not name.endswith(".py") and name not in list_recipes() and name in list_backbones(include_test=True)


def recipe_for(name: str, backbone: str | None = None) -> Recipe:
    """``osteo train NAME``: a recipe (shipped or a path), or a registered backbone's name,
    which trains with the ``finetune`` recipe for that backbone."""
    if names_backbone(name):
        return load_recipe("finetune", backbone=backbone or name)
    return load_recipe(name, backbone=backbone)


def dotted(d: dict, prefix: str = "") -> dict:
    """A nested recipe dict (``Recipe.to_dict()``) as its dotted keys, as ``--set`` names them:
    ``{"train": {"lr": 3e-4}}`` -> ``{"train.lr": 3e-4}``."""
    out: dict = {}
    for k, v in d.items():
        out.update(dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


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
    if origin is Literal:
        return _check_choice(text, hint, key)
    if hint is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise OsteoError(f"{key} expects true or false, got {text!r}")
    if origin is tuple:
        (item, *_rest) = typing.get_args(hint)
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]  # 64,32 or (64, 32) or [64,32]
        return tuple(_convert(p.strip(), item, key) for p in parts)
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise OsteoError(f"{key} expects {'an integer' if hint is int else 'a number'}, got {text!r}") from None
    return text


def _check_choice(value, hint, key: str):
    choices = typing.get_args(hint)
    if value not in choices:
        raise OsteoError(f"{key} must be one of: {', '.join(choices)}; got {value!r}")
    return value


def _unknown_key(key: str, recipe: Recipe) -> OsteoError:
    """An unknown ``--set`` key: the closest valid one if there is one, else all of them."""
    import difflib

    valid = _valid_keys(recipe)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
    if close:
        return OsteoError(f"unknown recipe key {key!r}; did you mean {close[0]}? (--set {close[0]}=...)")
    return OsteoError(f"unknown recipe key {key!r}; valid keys: {', '.join(valid)}")


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
                raise _unknown_key(key, recipe)
            if i < len(parts) - 1:
                obj = getattr(obj, part)
                if not dataclasses.is_dataclass(obj):
                    raise _unknown_key(key, recipe)
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
            if dataclasses.is_dataclass(hints[k]):
                if not isinstance(v, dict):
                    raise OsteoError(f"recipe key {k!r} in recipe.json is a section (an object), not {v!r}")
                v = build(hints[k], v)
            elif typing.get_origin(hints[k]) is tuple and isinstance(v, list):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    d = dict(d)
    legacy_size = d.pop("resolved_image_size", None)  # runs made before resolve() existed
    r = build(Recipe, d)
    if legacy_size and not r.data.image_size:
        r.data.image_size = legacy_size
    return r


# --------------------------------------------------------------------------- operating points

_SPEC = re.compile(r"^\s*([a-z]+)(\+?)\s*:\s*(sensitivity|specificity)\s*=\s*([0-9.]+)\s*$")


def parse_operating_point(text: str) -> dict:
    """``osteoporosis:sensitivity=0.90`` or ``osteopenia+:specificity=0.8`` -> a spec dict."""
    m = _SPEC.match(text.lower())
    if not m or m.group(1) not in CLASSES or not 0 < float(m.group(4)) < 1:
        raise OsteoError(f"operating point {text!r} is not CLASS[+]:sensitivity=X or CLASS[+]:specificity=X "
                         f"with X in (0, 1); e.g. osteoporosis:sensitivity=0.90 (CLASS one of {', '.join(CLASSES)}, "
                         "'+' for that class or worse)")
    first = CLASSES.index(m.group(1))
    positive = list(range(first, len(CLASSES))) if m.group(2) else [first]
    name = m.group(1) + ("+" if m.group(2) else "")
    if len(positive) == len(CLASSES):
        raise OsteoError(f"operating point {text!r} calls every class positive ({name} is {', '.join(CLASSES)}): no "
                         f"image is negative, so no threshold can be chosen; use {CLASSES[1]}+ or one class")
    return {"name": name, "positive": positive, "target": m.group(3), "value": float(m.group(4))}


def parse_operating_points(texts) -> list[dict]:
    """Each of ``texts`` parsed (:func:`parse_operating_point`), at most one per name: a second
    point for the same classes would share its column in predictions.csv."""
    specs, seen = [], {}
    for text in texts:
        spec = parse_operating_point(text)
        if spec["name"] in seen:
            raise OsteoError(f"two operating points for {spec['name']} ({seen[spec['name']]!r} and {text!r}); "
                             "give one per class (or class+)")
        seen[spec["name"]] = text
        specs.append(spec)
    return specs


# --------------------------------------------------------------------------- resolve

def _between(low, high, text: str | None = None) -> tuple:
    return (lambda v: low <= v <= high, text or f"from {low:g} to {high:g}")


_FRACTION = (lambda v: 0 <= v < 1, "from 0 to below 1")
# Every number of a recipe has a rule (a test walks the dataclasses): bounds within what the
# model and the machine can hold. Rates are float32 in the optimizers, where 1e300 is inf
# and 1e-300 is 0; epochs, steps and resamples are loop counts and array sizes.
MAX_EPOCHS = 10_000
MAX_FOLDS = 1_000
MAX_BATCH = 4_096
MAX_HEAD_UNITS = 16_384  # a Dense layer's width (10**8 units allocated 400 GB, and crashed)
MAX_HEAD_LAYERS = 8
MAX_STEPS = 1_000_000
MAX_BOOTSTRAP = 100_000  # each resample is a row of an int64 array as long as the split
# fewer resamples give no 95% interval worth the name (1 gave low == high); 0: no intervals
MIN_BOOTSTRAP = 20
BOOTSTRAP_RULE = (lambda v: v == 0 or MIN_BOOTSTRAP <= v <= MAX_BOOTSTRAP,
                  f"0 (no intervals) or from {MIN_BOOTSTRAP} to {MAX_BOOTSTRAP}")
MAX_PHANTOM = 1_000_000
_RATE = _between(1e-12, 10.0)
_EPOCHS = _between(0, MAX_EPOCHS)
_AUGMENT_FACTOR = _between(0.0, 1.0)  # Keras' random layers take factors up to 1
_ALPHA = _between(0.0, 10.0)  # MixUp's and CutMix's Beta(alpha, alpha)
_RULES: dict[str, tuple] = {
    "data.image_size": _between(1, MAX_IMAGE_SIZE),
    "data.val": (lambda v: 0 < v < 1, "between 0 and 1"),
    "data.test": _FRACTION,
    "data.folds": (lambda v: v == 0 or 2 <= v <= MAX_FOLDS, f"0 (no cross-validation) or from 2 to {MAX_FOLDS}"),
    "data.fold": _between(0, MAX_FOLDS - 1),
    "data.inner_val": _FRACTION,
    "data.batch_size": _between(1, MAX_BATCH),
    "data.phantom_n": _between(3, MAX_PHANTOM),
    "data.phantom_size": _between(16, MAX_IMAGE_SIZE),
    "model.bn_momentum": _FRACTION,
    "model.head.dropout": _FRACTION,
    # a tuple: the rule holds for each item, and the length for the tuple
    "model.head.units": (lambda v: 1 <= v <= MAX_HEAD_UNITS, f"from 1 to {MAX_HEAD_UNITS} units a layer",
                         MAX_HEAD_LAYERS),
    "model.augment.rotation": _AUGMENT_FACTOR,
    "model.augment.zoom": _AUGMENT_FACTOR,
    "model.augment.translation": _AUGMENT_FACTOR,
    "model.augment.shear": _AUGMENT_FACTOR,
    "model.augment.contrast": _AUGMENT_FACTOR,
    "model.augment.brightness": _AUGMENT_FACTOR,
    "model.augment.mixup": _ALPHA,
    "model.augment.cutmix": _ALPHA,
    "train.epochs": _EPOCHS,
    "train.fine_tune_epochs": _EPOCHS,
    "train.fine_tune_blocks": _between(0, 100),  # and at most the backbone's stages (resolve)
    "train.lr": _RATE,
    "train.fine_tune_lr": _RATE,
    "train.weight_decay": _between(0.0, 1.0),
    "train.warmup_epochs": _EPOCHS,
    "train.label_smoothing": _FRACTION,
    "train.early_stopping": _EPOCHS,
    "train.steps_per_epoch": _between(0, MAX_STEPS),
    "train.seed": (lambda v: 0 <= v < 2**32, "from 0 to 2**32 - 1"),
    "train.bootstrap": BOOTSTRAP_RULE,
}
# Rules a run trained under, where they were looser than now: its saved recipe still reads
_SAVED_RULES: dict[str, tuple] = {
    "train.bootstrap": _between(0, MAX_BOOTSTRAP),  # from 1 resample before the tenth session
}


def _check_values(obj, prefix: str = "", saved: bool = False) -> None:
    """Every field has its declared type (choices included) and lies within its bounds (a
    run's saved recipe: the bounds it was trained under, :data:`_SAVED_RULES`)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value, hint = f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            _check_values(value, f"{key}.", saved)
            continue
        origin = typing.get_origin(hint)
        if origin is Literal:
            _check_choice(value, hint, key)
            continue
        rule = _SAVED_RULES.get(key, _RULES.get(key)) if saved else _RULES.get(key)
        if origin is tuple:
            item = typing.get_args(hint)[0]
            if not isinstance(value, tuple) or not all(_is(v, item) for v in value):
                raise OsteoError(f"{key} expects a list of {item.__name__}s, got {value!r}")
            if rule and len(value) > rule[2]:
                raise OsteoError(f"{key} holds at most {rule[2]} values, got {len(value)}")
            bad = [v for v in value if rule and not rule[0](v)]
            if bad:
                raise OsteoError(f"{key} must be {rule[1]}, got {bad[0]!r}")
            continue
        if not _is(value, hint):
            raise OsteoError(f"{key} expects {getattr(hint, '__name__', hint)}, got {value!r}")
        if rule and not rule[0](value):
            raise OsteoError(f"{key} must be {rule[1]}, got {value!r}")


def _is(value, hint) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint) if isinstance(hint, type) else True


def resolve(recipe: Recipe, backend: str | None = None, *, saved: bool = False, trained: bool | None = None) -> Recipe:
    """The recipe completed from its backbone's spec and checked; raises before anything is written.

    Fills ``data.image_size`` (0: the backbone's default) and, once the Keras
    ``backend`` is known, ``model.impl`` and ``model.preprocessing`` (auto: the
    implementation's own); checks every choice and bound and the weights, and returns a
    new Recipe. Resolving a resolved recipe changes nothing.

    ``saved``: a run's ``recipe.json`` read back (:meth:`osteo.runs.RunDir.read_recipe`):
    every value is checked as when it was written, but not what belongs to the machine
    it was trained on: its engine is kept whatever backend is loaded (loading the model
    checks that), and its weights file, read once when training began, may be gone.
    ``trained`` (default: ``saved``): a run's recipe, resumed or read, is held to the bounds
    it was trained under (:data:`_SAVED_RULES`, no warm-up check), not to later ones.
    """
    from osteo.device import ENGINES, choose_impl
    from osteo.registry import get_backbone, parse_weights

    r = copy.deepcopy(recipe)
    if not isinstance(r.model.backbone, str):  # checked with the rest below, but named first
        raise OsteoError(f"model.backbone expects str, got {r.model.backbone!r}")
    spec = get_backbone(r.model.backbone)
    m = r.model
    r.data.image_size = train_size(r)
    trained = saved if trained is None else trained
    if not trained and isinstance(r.data.dir, str) and r.data.dir:  # the run's record names its folder from anywhere
        r.data.dir = os.path.abspath(r.data.dir)
    _check_values(r, saved=trained)
    # the weights, before the engine that reads them is chosen from them: a file not there, or not
    # readable, is said as such, not as a file of the wrong kind
    if saved:  # the file was read when training began: only what the value names is checked
        imagenet = str(m.weights).lower() == "imagenet"
    else:
        try:
            kind, path = parse_weights(m.weights)
        except OsteoError as e:
            if not trained or "not found" not in str(e):
                raise
            where = "" if Path(m.weights).is_absolute() else " (a path relative to the folder the run was started in)"
            raise OsteoError(f"this run started from weights file {m.weights}{where}, which is not there now; a resumed "
                             "run rebuilds its model from it before taking up its saved state: put the file back "
                             "there, or start a new run") from None
        imagenet = kind == "imagenet"
        if kind == "file" and not trained:  # the run's record names the file wherever it is resumed from
            m.weights = os.path.abspath(path)
    if backend is None and "keras" in sys.modules and not saved:  # loaded: its backend is the one that will run
        backend = sys.modules["keras"].backend.backend()
    if backend is not None and not saved:  # (a resumed run's engine was chosen when it began: not by its file)
        m.impl, _ = choose_impl(m.impl, spec, backend, None if trained else m.weights)
    if saved and m.impl not in ENGINES:  # a run's recipe names the engine it was trained with
        raise OsteoError(f"model.impl {m.impl!r} names no engine (a run's recipe names one of: "
                         f"{', '.join(ENGINES)})")
    engine = ENGINES.get(m.impl)  # None while the backend, and with it the engine, is not known
    if engine is not None:  # its own input scaling, and only what it can do
        if m.preprocessing == "auto":
            m.preprocessing = engine.preprocessing(spec, m.weights)
        engine.check_preprocessing(m.preprocessing)
    m.bn_momentum = m.bn_momentum or spec.bn_momentum
    if r.train.fine_tune_blocks > spec.n_stages:
        raise OsteoError(f"train.fine_tune_blocks={r.train.fine_tune_blocks}, but {spec.name} has {spec.n_stages} "
                         f"stages ({spec.stages_doc}); use 0 (all) to {spec.n_stages}")
    spec.check_size(r.data.image_size)
    if not 1 <= r.train.epochs + r.train.fine_tune_epochs <= MAX_EPOCHS:
        raise OsteoError(f"train.epochs + train.fine_tune_epochs must be from 1 to {MAX_EPOCHS}; give --epochs 1 or "
                         "more (make's EPOCHS=)")
    if not trained:  # a run trained before these checks still reads and resumes
        _check_warmup(r.train)
    if r.data.folds and r.data.fold >= r.data.folds:
        raise OsteoError(f"data.fold={r.data.fold} is not one of the {r.data.folds} folds (0 to {r.data.folds - 1})")
    if r.data.folds and r.data.test:
        raise OsteoError("data.test has no meaning in a cross-validation (each fold's held-out images are its "
                         "test split); set data.test=0 (make: SET=data.test=0), or use osteo train --folds K")
    if r.data.inner_val and (r.data.folds < 2 or r.data.test):
        raise OsteoError("data.inner_val splits a cross-validation fold's training images: it needs data.folds "
                         ">= 2 and data.test = 0")
    if r.data.val + r.data.test >= 1:
        raise OsteoError(f"data.val + data.test must be below 1 (got {r.data.val} + {r.data.test}); "
                         "leave images for training")
    parse_operating_points(r.train.operating_points)
    if imagenet and spec.test_only:
        raise OsteoError(f"{spec.name} has no ImageNet weights; use --weights none (make: WEIGHTS=none)")
    return r
