"""A training session, below the CLI and the study (no Keras until a model trains).

The recipe a command asks for (:class:`TrainOptions` on a recipe) or the run it resumes,
the device plan made before Keras is imported, the phantom written on first use, and a
cross-validation's folds. Functions take plain values and tell people what they do
through ``say`` (one line of text) or, while training, a rich console; none prints.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from osteo import device
from osteo.data.split import INNER_VAL
from osteo.errors import OsteoError
from osteo.recipe import (
    Recipe,
    apply_overrides,
    names_backbone,
    recipe_for,
    resolve,
    set_total_epochs,
    train_size,
)
from osteo.registry import get_backbone, names_a_file
from osteo.runs import CvDir, RunDir, find_run, new_run_dir

Say = Callable[[str], None]


@dataclass
class TrainOptions:
    """What ``osteo train``'s options change in a recipe; None (or empty) keeps the recipe's value."""

    data: str | None = None
    weights: str | None = None
    image_size: int | None = None
    batch: int | None = None
    seed: int | None = None
    epochs: int | None = None  # in total, split over the two phases
    deterministic: bool = False
    runs: str | None = None
    mlflow: bool = False
    operating_points: tuple[str, ...] = ()
    group_by: str | None = None  # where patients come from: auto | dicom | regex | csv | none
    group_regex: str | None = None  # data.group_regex
    groups: str | None = None  # data.groups_csv
    overrides: tuple[str, ...] = ()  # KEY=VALUE (--set), applied last

    def as_args(self) -> list[str]:
        """The ``osteo train`` options that ask for these (a study's trials are such commands)."""
        args = []
        for flag, value in (("--data", self.data), ("--weights", self.weights), ("--image-size", self.image_size),
                            ("--batch", self.batch), ("--seed", self.seed), ("--epochs", self.epochs),
                            ("--runs", self.runs), ("--group-by", self.group_by),
                            ("--group-regex", self.group_regex), ("--groups", self.groups)):
            if value is not None:
                args += [flag, str(value)]
        if self.deterministic:
            args.append("--deterministic")
        for point in self.operating_points:
            args += ["--operating-point", point]
        for item in self.overrides:
            args += ["--set", item]
        if self.mlflow:
            args.append("--mlflow")
        return args


def build_recipe(name: str, model: str | None, options: TrainOptions, folds: int = 0) -> Recipe:
    """Recipe ``name`` (or finetune, for a backbone's name) for ``model`` with ``options``,
    resolved (and so checked) before anything is written. ``folds``: the recipe of a K-fold
    cross-validation (``osteo train --folds K``: no test fraction, ``data.inner_val`` allowed)."""
    recipe = recipe_for(name, model)
    fine_tunes = recipe.train.fine_tune_epochs > 0  # before --epochs shares the epochs out
    if folds:
        recipe.data.folds, recipe.data.fold, recipe.data.test = folds, 0, 0.0
    o = options
    if o.data:
        recipe.data.dir = o.data
    if o.weights:
        recipe.model.weights = o.weights
    if o.image_size is not None:
        if o.image_size <= 0:  # 0 in a recipe means the backbone's default; asked for, it is a mistake
            from osteo.registry import get_backbone

            spec = get_backbone(recipe.model.backbone)
            raise OsteoError(f"--image-size {o.image_size} is not an image size; give the side in pixels "
                             f"({spec.min_size} or more for {spec.name}), or leave the option out for the recipe's")
        recipe.data.image_size = o.image_size
    if o.batch is not None:
        recipe.data.batch_size = o.batch
    if o.seed is not None:
        recipe.train.seed = o.seed
    overrides = list(o.overrides)
    if o.epochs is not None:
        # which phases there are (--set train.epochs=0: the whole model from the start) before --epochs
        # divides its total between them; a phase's own number beside the total is one or the other
        fields = {"train.epochs": "epochs", "train.fine_tune_epochs": "fine_tune_epochs"}
        phases = {s: fields[key] for s in overrides if (key := s.split("=", 1)[0].strip()) in fields}
        apply_overrides(recipe, list(phases))
        t = recipe.train
        zeroed = set(phases.values())  # each phase named, once none is above 0
        named = [s.strip() for s, field in phases.items() if getattr(t, field)]
        if named:
            raise OsteoError(f"--epochs {o.epochs} is the total over both phases and --set {named[0]} one phase's: "
                             "give one of them (with --epochs, --set train.epochs=0 trains the whole model from the "
                             "start)")
        if zeroed == {"epochs", "fine_tune_epochs"}:
            raise OsteoError(f"--set train.epochs=0 and train.fine_tune_epochs=0 leave --epochs {o.epochs} no phase: "
                             "drop one of them")
        if zeroed == {"epochs"}:  # the whole model from the start, for all of them (a one-phase recipe too)
            t.fine_tune_epochs = o.epochs
        elif zeroed == {"fine_tune_epochs"}:  # the head alone, for all of them
            t.epochs = o.epochs
        else:
            set_total_epochs(recipe, o.epochs)
        overrides = [s for s in overrides if s not in phases]
    if o.deterministic:
        recipe.train.deterministic = True
    if o.runs:
        recipe.runs_dir = o.runs
    if o.mlflow:
        recipe.train.mlflow = True
    if o.operating_points:
        recipe.train.operating_points = tuple(o.operating_points)
    if o.group_by:
        recipe.data.group_by = o.group_by
    if o.group_regex:
        recipe.data.group_regex = o.group_regex
    if o.groups:
        recipe.data.groups_csv = o.groups
    apply_overrides(recipe, overrides)
    from osteo.runs import check_output_place

    resolved = resolve(recipe)
    idle = [k for k in (setting.split("=", 1)[0].strip() for setting in o.overrides) if k in FINE_TUNE_SETTINGS]
    if idle and not resolved.train.fine_tune_epochs:  # asked for by name, and it would change nothing
        fix = (f"--epochs {o.epochs} leaves the recipe's fine-tuning phase no epochs (the head's phase comes first); "
               "give --epochs 2 or more" if fine_tunes and o.epochs is not None else
               "add --set train.fine_tune_epochs=N, use the finetune recipe")
        raise OsteoError(f"--set {idle[0]} has no effect: this run trains no fine-tuning phase "
                         f"(train.fine_tune_epochs=0); {fix}, or leave it out")
    check_output_place(resolved.runs_dir, "--runs", "choose a runs folder outside it", data=resolved.data.dir,
                       folder=True)
    return resolved


# what only the fine-tuning phase (train.fine_tune_epochs) uses
FINE_TUNE_SETTINGS = ("train.fine_tune_blocks", "train.fine_tune_lr")


def _names_another_recipe(named: str, recipe: Recipe) -> bool:
    """Whether ``osteo train NAMED --resume RUN`` names something other than RUN's ``recipe``: a
    backbone's name (``make train MODEL=vgg16 RESUME=latest`` passes it as the recipe) must be
    the run's backbone, a recipe (shipped, or a file) must give the run's recipe name."""
    if names_backbone(named):
        return named != recipe.model.backbone
    try:
        return recipe_for(named, recipe.model.backbone).name != recipe.name
    except OsteoError:
        return True


def resume_recipe(spec: str, model: str | None, options: TrainOptions,
                  named: str | None = None) -> tuple[RunDir, Recipe]:
    """``--resume``: the run to continue (a path, or ``latest``) and its own resolved recipe.

    The run's recipe decides everything; an option given with ``--resume`` is applied
    where that is safe (``--epochs`` above the run's total: the last phase gets the
    extra epochs), accepted when it repeats the run's value, and refused otherwise; so is
    a recipe ``named`` on the command line (``osteo train finetune --resume RUN``) that is
    not the run's own.
    """
    o = options
    run = find_run(spec, o.runs or "runs", model)
    recipe = resolve(run.read_recipe(), trained=True)
    d, t = recipe.data, recipe.train
    if named is not None and _names_another_recipe(named, recipe):
        raise OsteoError(f"{run.path} was trained with the recipe {recipe.name} ({recipe.model.backbone}), not "
                         f"{named}, and --resume continues it as it was: drop {named!r} (make: RECIPE= and MODEL= "
                         "of the run, or neither), or start a new run with it")
    asked = {"--model": (model, recipe.model.backbone), "--data": (o.data, d.dir),
             "--weights": (o.weights, recipe.model.weights), "--image-size": (o.image_size, d.image_size),
             "--batch": (o.batch, d.batch_size), "--seed": (o.seed, t.seed),
             "--deterministic": (o.deterministic or None, t.deterministic), "--group-by": (o.group_by, d.group_by),
             "--group-regex": (o.group_regex, d.group_regex), "--groups": (o.groups, d.groups_csv)}
    if names_a_file(o.weights) and names_a_file(recipe.model.weights):
        asked["--weights"] = (os.path.abspath(o.weights), os.path.abspath(recipe.model.weights))  # the same file
    if o.data is not None:
        asked["--data"] = (os.path.abspath(o.data), os.path.abspath(d.dir))
    for option, (given, saved) in asked.items():
        if given is not None and given != saved:
            raise OsteoError(f"{option} cannot change when resuming {run.path} (it trained with {saved}); "
                             "drop the option, or start a new run")
    if o.overrides:
        raise OsteoError(f"--set cannot change a run being resumed ({run.path}); drop it, or start a new run")
    if o.operating_points and tuple(o.operating_points) != t.operating_points:
        raise OsteoError(f"--operating-point cannot change when resuming {run.path}; set it afterwards with: "
                         f"osteo calibrate {run.path} --operating-point ...")
    if o.mlflow and not t.mlflow:
        raise OsteoError(f"--mlflow cannot be turned on when resuming {run.path} (its first epochs were not "
                         "logged); start a new run with --mlflow")
    total = t.epochs + t.fine_tune_epochs
    if o.epochs is not None and o.epochs != total:
        if o.epochs < total:
            raise OsteoError(f"--epochs {o.epochs} is fewer than the {total} {run.path} was started with; "
                             "a resumed run can only get more epochs")
        if t.fine_tune_epochs:
            t.fine_tune_epochs += o.epochs - total
        else:
            t.epochs = o.epochs
    return run, recipe


def plan_device(requested: str | None, recipe: Recipe, say: Say, named_by: str = "") -> device.Plan:
    """Probe the device and choose backend, precision and compilation, before Keras is imported.
    ``named_by``: why ``requested`` is what it is where the user did not name it (a resumed run's own)."""
    spec = get_backbone(recipe.model.backbone)
    t = recipe.train
    size = train_size(recipe)
    if "keras" in sys.modules:  # imported already (a library caller): keep the backend it loaded
        import keras

        plan = device.plan(spec, device.probe(), backend=keras.backend.backend(), precision=t.precision,
                           jit_compile=t.jit_compile, impl=recipe.model.impl,
                           weights=recipe.model.weights, image_size=size)
        plan.why["backend"] = "the backend Keras had loaded"
    else:
        choice = requested or os.environ.get("KERAS_BACKEND") or "auto"
        plan = device.plan(spec, device.probe(), backend=choice, precision=t.precision, jit_compile=t.jit_compile,
                           planned_images=device.planned_images(recipe), impl=recipe.model.impl,
                           weights=recipe.model.weights, image_size=size)
        if named_by and choice == requested:
            plan.why["backend"] = named_by
        # what runs, and why, also where the backend was named: a Keras weights file can make the engine Keras'
        say(f"backend: {plan.backend} on {plan.runs_on} ({plan.why['backend']}); "
            f"backbone: {plan.impl} ({plan.why['impl']})")
        for warning in plan.warnings:  # a requested choice measured far slower here (env.json keeps it too)
            logging.getLogger("osteo").warning(warning)
        os.environ["KERAS_BACKEND"] = plan.backend
    if plan.backend == "torch":  # before torch is imported: libgomp reads its settings as it loads
        plan.why["openmp"] = device.short_spin_waits()
    return plan


def ensure_phantom(recipe: Recipe, say: Say) -> None:
    """A phantom data folder (``data/phantom*``) is written on first use (complete or not at all)."""
    path = Path(recipe.data.dir)
    # (a resolved recipe names its folder as an absolute path: data/phantom of the working folder)
    if path.exists() or Path(os.path.abspath(path)).parent != Path(os.path.abspath("data")) or not \
            path.name.startswith("phantom"):
        return
    from osteo.data.phantom import write_phantom

    say(f"writing the phantom dataset ({recipe.data.phantom_n} images of {recipe.data.phantom_size} px) "
        f"to {path} ...")
    write_phantom(path, n=recipe.data.phantom_n, size=recipe.data.phantom_size, seed=0)


def cross_validate(recipe: Recipe, plan: device.Plan, console, folds: int | None, fold: int | None,
                   cv: str | None, command: str) -> CvDir:
    """Every fold (or fold ``fold``, 1..K) of a K-fold cross-validation as a complete run under
    one parent: ``cv``, or a new folder under the recipe's runs folder. ``console`` shows the
    training; ``command`` is recorded in each fold's ``env.json``.

    Nested: each fold's held-out images are its test split, and its checkpoint, temperature
    and thresholds are chosen on an inner validation split of its training folds
    (``data.inner_val``, :data:`osteo.data.split.INNER_VAL` unless the recipe sets one), so
    the pooled out-of-fold predictions come from images that chose nothing. The recipe's own
    test fraction gives way to the folds.

    The same command again continues a killed cross-validation: its parent is ``cv``, or
    the newest unfinished one of the same recipe and settings; finished folds are kept and
    a killed fold resumes from its last committed epoch.
    """

    if cv and not folds and not CvDir(cv).is_cv():
        raise OsteoError(f"--cv {cv} is not a cross-validation (no cv.json there); start one with --folds K, "
                         f"e.g. --folds 5 --cv {cv}")
    k = _cv_folds(folds, cv)
    if k < 2:
        raise OsteoError(f"cross-validation needs --folds K with K >= 2, got {k}; e.g. --folds 5")
    if fold is not None and not 1 <= fold <= k:
        raise OsteoError(f"--fold {fold} is not one of 1..{k}")
    settings = cv_settings(recipe, k)
    parent = _cv_parent(recipe, k, cv, say=logging.getLogger("osteo").warning)
    if parent is not None and not parent.is_cv():  # a new --cv folder's place, before the audit
        parent.check_place(recipe.data.dir)
    if parent is None or not parent.is_cv():  # before its folder is made: no empty cross-validation left
        check_folds(recipe, k)
    made = parent is None or not parent.path.exists()  # this command makes its folder
    if parent is None:
        parent = CvDir(new_run_dir(recipe.runs_dir, recipe.model.backbone).path)
    elif not cv:
        console.print(f"continuing the unfinished cross-validation {parent}", highlight=False, soft_wrap=True)
    # a fold of other settings (image size, epochs, ...) would be pooled with the others as one
    # model's: every command that adds to a cross-validation trains what its first fold trained.
    # Not a study's (cv.json without settings): its nested search gives each fold its own choice.
    if parent.is_cv() and parent.read().get("settings"):
        started = [i for i in range(1, k + 1) if parent.fold(i).is_run()]
        if started:
            _check_same_recipe(parent.fold(started[0]), resolve(_fold_recipe(recipe, k, started[0]),
                                                                 backend=plan.backend), parent)
    new = not parent.is_cv()
    parent.start(folds=k, seed=recipe.train.seed, recipe=recipe.name, model=recipe.model.backbone, settings=settings,
                 data=recipe.data.dir)
    try:
        _train_folds(parent, recipe, k, fold, plan, console, command)
    except BaseException:
        if new and not any(parent.fold(i).is_run() for i in range(1, k + 1)):
            # its first fold stopped before an epoch ended (bad weights, Ctrl-C) and left nothing, as a
            # single run leaves nothing: no cross-validation of no folds is left to be reported unfinished
            parent.manifest_path.unlink(missing_ok=True)
            if made:
                shutil.rmtree(parent.path, ignore_errors=True)
        raise
    return parent


def _train_folds(parent: CvDir, recipe: Recipe, k: int, fold: int | None, plan, console, command) -> None:
    """Each fold of the cross-validation in ``parent`` (or fold ``fold`` alone): a finished one kept,
    a killed one resumed, the others trained."""
    from osteo.trainer import Trainer

    for i in [fold] if fold else range(1, k + 1):
        run = parent.fold(i)
        if run.is_finished():
            console.print(f"cross-validation {parent}: fold {i} of {k} is finished (kept)", highlight=False, soft_wrap=True)
            continue
        r = _fold_recipe(recipe, k, i)
        console.print(f"cross-validation {parent}: fold {i} of {k}", highlight=False, soft_wrap=True)
        if run.is_run():  # killed: it resumes, if it was started with these settings
            _check_same_recipe(run, resolve(r, backend=plan.backend), parent)
            Trainer(resolve(run.read_recipe(), trained=True), console=console, resume=run, command=command, plan=plan).run()
        else:
            Trainer(r, console=console, command=command, plan=plan, at=run.path).run()


def audited_rows(recipe: Recipe, also: Sequence[Recipe] = ()) -> list[dict]:
    """The manifest rows of an audit of ``recipe``'s data folder, whose decodes also fill the
    image cache at the recipe's image size (the backbone's default where it names none), and at
    those of the recipes ``also`` (a study's other models on the folder): the runs that follow
    decode nothing again."""
    from osteo.data.pipeline import ImageCache
    from osteo.data.scan import audit

    places = dict.fromkeys((train_size(r), r.data.resize) for r in (recipe, *also))
    cache = _Caches([ImageCache(size, resize) for size, resize in places])
    return audit(recipe.data.dir, memo=cache.root, cache=cache).manifest_rows()


class _Caches:
    """Image caches of several sizes filled from each of the audit's decodes (its ``cache``)."""

    def __init__(self, caches: list):
        self.caches, self.root = caches, caches[0].root

    def store(self, sha256: str, data: bytes, gray) -> None:
        for cache in self.caches:
            cache.store(sha256, data, gray)


def check_folds(recipe: Recipe, k: int, rows: list[dict] | None = None) -> None:
    """Every fold of a K-fold cross-validation of ``recipe``'s data can be trained and scored:
    it holds out images of every class, and leaves each class training and inner-validation
    images; else a one-line error with the fix (the largest K the classes allow). The splits
    are the ones the folds' trainers will make (same audit, seed, groups and conflicts).
    ``rows``: the data folder's audit manifest, where the caller has it (a study checks every
    backbone and seed on one audit)."""
    from collections import Counter

    from osteo.data.split import check_split, majority_label, read_groups_csv, split_rows

    cfg = _fold_recipe(recipe, k, 1).data
    rows = audited_rows(recipe) if rows is None else rows
    groups = read_groups_csv(cfg.groups_csv) if cfg.groups_csv else None
    per_class: Counter = Counter()  # each class's groups: the same in every fold's split
    for i in range(k):
        split, _ = split_rows(rows, val_fraction=cfg.val, folds=k, fold=i, seed=recipe.train.seed,
                              group_regex=cfg.group_regex or None, groups=groups, conflicts=cfg.conflicts,
                              inner_val=cfg.inner_val, group_by=cfg.group_by)
        if not per_class:
            members: dict[str, list[str]] = {}
            for r in split:
                members.setdefault(r["group"], []).append(r["label"])
            per_class.update(majority_label(labels) for labels in members.values())
        most = min(per_class.values(), default=0)
        held = Counter(r["label"] for r in split if r["split"] == "test")
        short = [c for c in per_class if not held[c]]
        if short:
            c = min(short, key=lambda c: per_class[c])
            fix = f"use --folds {most} or fewer, or add {c} images" if most >= 2 else f"add {c} images"
            raise OsteoError(f"--folds {k} is more folds than class {c} has groups to hold out ({per_class[c]}: "
                             f"images, or patients and duplicates kept whole): fold {i + 1} would score none of "
                             f"its {c} images; {fix}")
        check_split(split, val_option="--set data.inner_val=F (each fold's validation share of its training images)")


def _fold_recipe(recipe: Recipe, k: int, i: int) -> Recipe:
    """Fold ``i`` (1..k) of ``recipe``'s cross-validation: its outer fold held out as test, its
    checkpoint chosen on an inner validation split."""
    r = copy.deepcopy(recipe)
    r.data.folds, r.data.fold, r.data.test = k, i - 1, 0.0
    r.data.inner_val = r.data.inner_val or INNER_VAL
    return r


def cv_settings(recipe: Recipe, folds: int) -> str:
    """A short hash of what a cross-validation trains (its recipe and fold count)."""
    import hashlib
    import json

    text = json.dumps({"recipe": recipe.to_dict(), "folds": folds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def continued_cv_backend(recipe: Recipe, folds: int | None, cv: str | None) -> str | None:
    """The backend the folds of the cross-validation this command continues trained on (its first
    started fold's ``env.json``), as a resumed run keeps its own: its folds are pooled as one
    model's, so they train alike. None where it continues none, or no fold was started."""
    with contextlib.suppress(OsteoError, OSError, ValueError, KeyError):
        k = _cv_folds(folds, cv)
        parent = _cv_parent(recipe, k, cv) if k >= 2 else None
        if parent is not None and parent.is_cv():
            for i in range(1, k + 1):
                if parent.fold(i).is_run():
                    return parent.fold(i).read_env().get("backend")
    return None


def _cv_folds(folds: int | None, cv: str | None) -> int:
    """K: ``--folds``, else the number of folds of the cross-validation ``--cv`` names (0: neither)."""
    return folds or (CvDir(cv).read()["folds"] if cv and CvDir(cv).is_cv() else 0)


def _cv_parent(recipe: Recipe, k: int, cv: str | None, say: Say | None = None) -> CvDir | None:
    """The cross-validation a command adds to: ``--cv``, or the newest unfinished one of this
    recipe and K (None: a new one); ``say`` hears of the unfinished ones of other settings."""
    return CvDir(cv) if cv else _unfinished_cv(recipe, k, cv_settings(recipe, k), say)


def _unfinished_cv(recipe: Recipe, folds: int, settings: str,
                   say: Say | None = None) -> CvDir | None:
    """The newest unfinished cross-validation of ``recipe`` with these ``settings`` (None: none).

    One whose ``settings`` differ but whose started fold trained what this recipe's would (the
    hash of an older osteo, whose recipes had fewer fields) is the same one; one that trains
    other settings is left, and ``say`` names it with the way to continue it."""
    from osteo.runs import list_cvs

    found, other = [], []
    for c in list_cvs(recipe.runs_dir):
        if c.model != recipe.model.backbone or c.is_finished():
            continue
        try:
            info = c.read()
        except OsteoError:  # a damaged cv.json is not continued
            continue
        if info.get("settings") == settings:
            found.append(c)
        elif info.get("settings") and info.get("folds") == folds:
            other.append(c)
    newest = sorted(found or other, key=lambda c: c.path.stat().st_mtime, reverse=True)
    if found:
        return newest[0]
    for c in newest:
        i = next((i for i in range(1, folds + 1) if c.fold(i).is_run()), None)  # its first started fold
        with contextlib.suppress(OsteoError, OSError, ValueError, KeyError):
            if i is not None:
                started = c.fold(i)
                differ = _differences(started, resolve(_fold_recipe(recipe, folds, i),
                                                       backend=started.read_env().get("backend")))
                if not differ:
                    return c
                if say is not None:
                    say(f"left the unfinished cross-validation {c} as it is: its folds train other settings "
                        f"({', '.join(differ[:3])}); to finish it, give --cv {c} with the options that started it")
    return None


def _differences(run: RunDir, wanted: Recipe) -> list[str]:
    """The recipe keys (``section.key``) whose value ``run`` trained with differs from ``wanted``'s."""
    have, want = run.read_recipe().to_dict(), wanted.to_dict()
    for d in (have, want):  # paths as places: a run of an older osteo recorded them as typed, relative
        for section, key in (("data", "dir"), ("model", "weights")):
            value = d.get(section, {}).get(key)
            if isinstance(value, str) and names_a_file(value):
                d[section][key] = os.path.abspath(value)
    differ = [f"{section}.{key}" for section in want if isinstance(want[section], dict)
              for key in want[section] if have.get(section, {}).get(key) != want[section][key]]
    return differ + [key for key in want if not isinstance(want[key], dict) and have.get(key) != want[key]]


def _check_same_recipe(run: RunDir, wanted: Recipe, parent: CvDir) -> None:
    """A killed fold resumes only with the recipe it started with."""
    differ = _differences(run, wanted)
    if differ:
        raise OsteoError(f"{run.path} was started with other settings ({', '.join(differ[:3])}); run the command "
                         f"that started {parent} again, or give another --cv")
