"""The ``osteo`` command. The only module that parses arguments and prints for people.

    osteo data phantom OUT [--n N] [--size PX] [--seed S] [--proportions 780,374,793] [--bit-depth 8|16]
    osteo data audit DATA [--out DIR]
    osteo data split DATA --out split.csv [--val 0.3] [--test 0] [--folds K --fold I] [--seed S]
    osteo train RECIPE_OR_MODEL [--data DIR] [--set key=value ...] | --resume RUN_DIR|latest
                [--folds K [--fold I] [--cv DIR]]
    osteo eval RUN_DIR [--split val|test] [--bootstrap 1000] | --data FOLDER [--out DIR] [--tta]
    osteo calibrate RUN_DIR [--operating-point CLASS[+]:sensitivity=X ...]
    osteo report [RUNS ...] [--out DIR] [--all] [--runs DIR] [--split auto|val|test]
    osteo predict RUN_DIR IMAGE_OR_FOLDER ... [--out predictions.csv] [--tta] [--gradcam DIR] [--no-calibration]
    osteo export RUN_DIR [--format onnx|savedmodel|keras] [--out PATH]
    osteo study [--models M,...] [--recipe R] [--folds K] [--seeds N] [--address ADDR] [--search KEY=LO:HI:log]
                [--external FOLDER ...]

User errors print one line and exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from osteo import CLASSES
from osteo.errors import OsteoError, Stopped
from osteo.recipe import BOOTSTRAP_RULE, BOOTSTRAP_SEED, DEFAULT_BOOTSTRAP, MAX_FOLDS


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2; each (sub)command's parser
    leaves its name in the namespace, for an error about its arguments to point at its help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.set_defaults(help_of=self.prog)

    given: tuple[str, ...] = ()  # the command line being parsed (main sets it)

    def error(self, message: str):  # type: ignore[override]
        # a file whose name starts with a dash reads as an option: argparse only says what is missing
        print(f"osteo: error: {message}{_dashed_file_hint(_Parser.given)} (see '{self.prog} --help')",
              file=sys.stderr)
        raise SystemExit(2)


def _dashed_file_hint(args) -> str:
    """``; -x.png is a file, read as an option: name it ./-x.png`` for the first of ``args`` that
    is a file whose name starts with a dash, else ""."""
    dashed = next((a for a in args if a.startswith("-") and len(a) > 1 and os.path.isfile(a)), None)
    return f"; {dashed} is a file, read as an option: name it ./{dashed}" if dashed else ""


# the width of a table written to a log or a pipe, where rich would take 80 columns and wrap numbers
# mid-digit ("0.33" over "3"); COLUMNS, where set, wins
LOG_WIDTH = 200


def _console():
    import os

    from rich.console import Console

    console = Console(stderr=False, highlight=False)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=False, highlight=False, width=LOG_WIDTH)
    return console


def _console_err():
    """Progress bars go to stderr, so stdout stays the command's result."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _progress(console):
    """A progress bar that leaves nothing behind; none where ``console`` is not a terminal (a pipe,
    a log file, a test), where rich would leave a blank line."""
    from rich.progress import Progress

    return Progress(console=console, transient=True, disable=not console.is_terminal)


def _say(console):
    """A ``say`` callback: plain lines on ``console`` (names from disk are printed as they are, no markup),
    each one line however long (a log is read, and grepped, by line; a terminal wraps it on screen)."""
    return lambda text: console.print(text, highlight=False, markup=False, soft_wrap=True)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _at_least(low: int, high: int | None = None):
    """An argparse type: an integer from ``low`` (to ``high``), else a one-line usage error."""
    def convert(text: str) -> int:
        value = _integer(text)
        if value < low or (high is not None and value > high):
            bounds = f"{low} or more" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return convert


PREDICTIONS_CSV = "predictions.csv"  # osteo predict's default output
SEED = _at_least(0, 2**32 - 1)


def BOOTSTRAP(text: str) -> int:
    """--bootstrap: 0 (no intervals) or enough resamples for a 95% interval (an argparse type, as SEED)."""
    value = _integer(text)
    if not BOOTSTRAP_RULE[0](value):
        raise argparse.ArgumentTypeError(f"must be {BOOTSTRAP_RULE[1]}, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 780,374,793, got {text!r}") from None


# --------------------------------------------------------------------------- data


def cmd_phantom(args) -> int:

    from osteo.data.phantom import DEFAULT_OVERLAP, check_options, write_phantom

    overlap = DEFAULT_OVERLAP if args.overlap is None else args.overlap
    total = sum(check_options(args.n, args.size, args.proportions, args.bit_depth, overlap))  # before any output
    t0 = time.perf_counter()
    with _progress(_console()) as bar:
        task = bar.add_task("phantom", total=total)
        try:
            counts = write_phantom(
                args.out, n=args.n, size=args.size, seed=args.seed, proportions=args.proportions,
                bit_depth=args.bit_depth, progress=lambda k: bar.update(task, completed=k),
                overlap=overlap,
            )
        except OSError as e:  # Pillow's full disk names no file: the folder being written is named
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(args.out)) from e
    dt = time.perf_counter() - t0
    summary = ", ".join(f"{c} {k}" for c, k in counts.items())
    print(f"wrote {total} phantom images ({summary}) to {args.out} in {dt:.1f}s")
    return 0


def _add_phantom_parser(dsub) -> None:
    p = dsub.add_parser("phantom", help="write the synthetic knee-radiograph dataset")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1947, help="number of images (default 1947)")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--proportions", type=_int_list, default=(780, 374, 793),
                   help="relative class sizes normal,osteopenia,osteoporosis, as counts (default 780,374,793: "
                        "the public knee set's)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    p.add_argument("--overlap", type=float, default=None,
                   help="spread of the class latents, x the table in osteo/data/phantom.py (default 2: a Bayes "
                        "classifier on the latents scores balanced accuracy ~0.90)")
    p.set_defaults(func=cmd_phantom)


def print_audit(result, console=None) -> None:
    from rich.table import Table

    from osteo.files import some_of

    console = console or _console()
    info = result.to_json()
    table = Table(title=f"audit of {info['data_dir']}")
    table.add_column("class")
    table.add_column("readable images", justify="right")
    table.add_column("in duplicate groups", justify="right")
    table.add_column("in conflicts", justify="right")
    ok = result.ok()
    for c in CLASSES:
        rows = [r for r in ok if r.label == c]
        table.add_row(c, str(len(rows)), str(sum(bool(r.dup_group) for r in rows)), str(sum(r.conflict for r in rows)))
    console.print(table)
    groups = info["duplicate_groups"]
    console.print(
        f"{info['n_files']} files: {info['n_ok']} readable, {len(info['unreadable'])} unreadable, "
        f"{len(info['ignored'])} ignored; {len(groups)} duplicate groups "
        f"({sum(g['kind'] == 'exact' for g in groups)} exact, {sum(g['kind'] == 'near' for g in groups)} near), "
        f"{sum(g['conflict'] for g in groups)} with conflicting labels"
    )
    for u in info["unreadable"][:10]:
        console.print(f"  unreadable: {u['path']}: {u['reason']}", markup=False, soft_wrap=True)
    if info["ignored"]:  # what is not read, and why: a folder is listed once (not walked)
        console.print(f"  ignored (not images by their name or bytes, hidden or system files and folders, or outside "
                      f"the class folders; audit.json lists them): {some_of(info['ignored'], 6)}", markup=False,
                      soft_wrap=True)
    patients = info["patients"]
    if patients["patients"]:
        low, high = patients["images_per_patient"]["min"], patients["images_per_patient"]["max"]
        each = f"{low} image{'s' * (low > 1)}" if low == high else f"{low}-{high} images"
        console.print(f"  patients: {patients['patients']} by DICOM PatientID ({each} each): the split keeps each "
                      "patient's images on one side", markup=False, soft_wrap=True)
    empty = _empty_classes(info)
    if empty:
        console.print(f"  no readable images of class {' and '.join(empty)}: training needs images of every class",
                      markup=False)
    for g in [g for g in groups if g["conflict"]][:10]:
        console.print(f"  conflict {g['id']} ({g['kind']}): {', '.join(g['paths'])}", markup=False, soft_wrap=True)


def cmd_audit(args) -> int:
    from osteo.data.scan import AUDIT_MARKS, audit, write_audit
    from osteo.files import default_cache_root, refuse_foreign_files
    from osteo.runs import check_output_place

    check_output_place(args.out, "--out", "choose a folder outside it, e.g. --out reports/audit", dataset=args.data,
                       folder=True)
    refuse_foreign_files(args.out, AUDIT_MARKS, "--out", "move them elsewhere, or choose another --out")
    t0 = time.perf_counter()
    with _progress(_console()) as bar:
        task = bar.add_task("audit", total=None)
        # every file read, not recalled: the records it leaves serve the next run
        result = audit(args.data, progress=lambda k, n: bar.update(task, completed=k, total=n),
                       memo=default_cache_root(), recall=False)
    dt = time.perf_counter() - t0
    from osteo.files import folder_lock

    with folder_lock(args.out, "an audit"):  # another audit into --out waits: its failure puts back only its own
        manifest, report = write_audit(result, args.out)
    print_audit(result)
    print(f"wrote {manifest} and {report} ({dt:.1f}s)")
    found = audit_findings(result)
    if args.strict and found:
        print(f"osteo: audit --strict: {', '.join(found)} (listed in {report}); fix the data, or audit without "
              "--strict", file=sys.stderr)
        return 1
    return 0


def audit_findings(result) -> list[str]:
    """What ``osteo data audit --strict`` fails on: the data's own faults, which a study trained on
    it inherits (images filed under two classes, files that cannot be read, blank images, a
    class without images); duplicates within a class, which the split keeps together, are not."""
    info = result.to_json()
    counts = ((sum(g["conflict"] for g in info["duplicate_groups"]), "duplicate group", " with conflicting labels"),
              (len(info["unreadable"]), "unreadable file", ""), (len(info["blank"]), "blank image", ""))
    found = [f"{n} {what}{'s' * (n != 1)}{rest}" for n, what, rest in counts if n]
    empty = _empty_classes(info)
    return found + ([f"no readable images of {' and '.join(empty)}"] if empty else [])


def _empty_classes(info: dict) -> list[str]:
    """The classes of an audit (its ``to_json()``) with no readable image."""
    return [c for c in CLASSES if not info["classes"].get(c)]


def _add_audit_parser(dsub) -> None:
    p = dsub.add_parser("audit", help="find unreadable files, duplicates and label conflicts")
    p.add_argument("data")
    p.add_argument("--out", default="reports/audit", help="folder for audit.json and manifest.csv")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if the data has label conflicts, unreadable files, blank images or an empty class "
                        "(for scripts and CI; the report is written either way)")
    p.set_defaults(func=cmd_audit)


def cmd_split(args) -> int:
    from osteo.data.decode import refuse_to_replace_an_image
    from osteo.data.scan import audit
    from osteo.data.split import SPLIT_COLUMNS, read_groups_csv, split_rows, write_split
    from osteo.files import default_cache_root, written_by_osteo
    from osteo.runs import check_output_place

    fix = "write the split elsewhere, e.g. --out split.csv"
    check_output_place(args.out, "--out", fix, dataset=args.data)
    refuse_to_replace_an_image(args.out, "--out", fix)
    if os.path.lexists(args.out) and not written_by_osteo(args.out, SPLIT_COLUMNS[:3]):  # a split is replaced: asked
        raise OsteoError(f"--out {args.out} exists and is not a split osteo wrote, which this would replace; {fix}")
    if args.folds and not (args.folds >= 2 and 1 <= args.fold <= args.folds):
        raise OsteoError(f"--fold {args.fold} of --folds {args.folds} is not a fold: give --folds K (K >= 2) and "
                         "--fold I, 1 <= I <= K (fold-I/ of osteo train --folds K)")
    rows = audit(args.data, memo=default_cache_root()).manifest_rows()
    split, excluded = split_rows(  # fold I as osteo train numbers them (fold-1/ ...), 0-based inside
        rows, val_fraction=args.val, test_fraction=args.test, folds=args.folds, fold=args.fold - 1,
        seed=args.seed, group_regex=args.group_regex,
        groups=read_groups_csv(args.groups) if args.groups else None, conflicts=args.conflicts,
        group_by=args.group_by,
    )
    write_split(args.out, split)
    counts = {s: sum(r["split"] == s for r in split) for s in ("train", "val", "test")}
    print(f"wrote {args.out}: {counts['train']} train, {counts['val']} val, {counts['test']} test, "
          f"{len(excluded)} excluded (conflicting labels)")
    return 0


def _add_split_options(p: argparse.ArgumentParser) -> None:
    from osteo.data.split import CONFLICT_POLICIES

    p.add_argument("--val", type=float, default=0.3, help="validation fraction (default 0.3)")
    p.add_argument("--test", type=float, default=0.0, help="test fraction (default 0)")
    p.add_argument("--folds", type=_at_least(0), default=0, help="k for k-fold cross-validation")
    p.add_argument("--fold", type=_at_least(1), default=1,
                   help="which fold is validation (1..K, as osteo train --folds K numbers fold-1/ ...)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--group-regex", help="regex on the file name; group 1 is the patient id")
    p.add_argument("--groups", help="CSV with path,group columns")
    p.add_argument("--conflicts", choices=CONFLICT_POLICIES, default="exclude")
    _add_group_by(p, default="auto")


def _add_group_by(p: argparse.ArgumentParser, default: str | None) -> None:
    from osteo.data.split import GROUP_BY

    p.add_argument("--group-by", choices=GROUP_BY, default=default,
                   help="where patients come from, so no patient is on two sides: auto (DICOM PatientID, "
                        "--group-regex or --groups, whichever is given; default), dicom, regex, csv, none")


def _add_split_parser(dsub) -> None:
    p = dsub.add_parser("split", help="write a leakage-safe split.csv")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    _add_split_options(p)
    p.set_defaults(func=cmd_split)


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="phantom dataset, audit and splits")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    _add_phantom_parser(dsub)
    _add_audit_parser(dsub)
    _add_split_parser(dsub)


# --------------------------------------------------------------------------- train


def _print_pooled(cv, recipe) -> None:
    """A finished cross-validation's result in one line: its pooled out-of-fold numbers, with their
    intervals, and the majority baseline on the same images."""
    from osteo.evaluate import METRICS, provenance
    from osteo.report.load import load_cv

    r = load_cv(cv, n_boot=recipe.train.bootstrap, seed=BOOTSTRAP_SEED)  # the report's seed (its --bootstrap: 1000)
    m, base = r.metrics, r.majority
    label = {x.name: x.label for x in METRICS}
    figures = ", ".join(_with_interval(m, k, label[k]) for k in ("balanced_accuracy", "accuracy", "macro_f1"))
    print(f"pooled out-of-fold ({provenance(r.evaluated_on, r.chose)}: each of its {m['n']} images scored once, by the "
          f"fold that held it out): {figures}; always answering {base['class']}: balanced accuracy "
          f"{base['balanced_accuracy']:.3f}")


def print_run_summary(run_dir, console) -> None:
    """The headline metrics of each held-out split (the one reported first), what each split chose,
    and the majority baseline's where it has them."""
    from rich.table import Table

    from osteo.evaluate import CHOSE, METRICS, SPLIT_NAMES, headline_split, provenance
    from osteo.runs import RunDir

    metrics = RunDir(run_dir).read_metrics()
    names = [name for name in ("test", "val") if name in metrics]
    headline = [x for x in METRICS if x.headline]
    based = [x for x in headline if all(x.name in metrics[n]["majority_baseline"] for n in names)]
    table = Table(title=f"{metrics['model']}: best epoch {metrics['best_epoch']} ({metrics['monitor']})")
    for col in ("split", "n", *(x.label for x in headline), *(f"majority {x.label}" for x in based)):
        table.add_column(col, justify="right")
    num = lambda v: "-" if v is None else f"{v:.3f}"
    for name in names:
        m = metrics[name]
        table.add_row(SPLIT_NAMES[name], str(m["n"]), *(num(m.get(x.name)) for x in headline),
                      *(num(m["majority_baseline"][x.name]) for x in based))
    console.print(table)
    split = metrics.get("headline") or headline_split(names)
    for name in names:  # what each row's images chose, the headline first
        console.print(("headline: " if name == split else "") + provenance(SPLIT_NAMES[name], CHOSE[name])
                      + ("" if split == "test" or name != split else "; hold out a test split (--set data.test=0.15; make: SET=data.test=0.15) "
                         "or cross-validate (--folds 5) for numbers that chose nothing"), highlight=False, markup=False,
                      soft_wrap=True)
    console.print(f"run directory: {run_dir}", highlight=False, soft_wrap=True)


def _train_options(args):
    """What ``osteo train``'s options change in the recipe (:class:`osteo.session.TrainOptions`)."""
    from osteo.session import TrainOptions

    return TrainOptions(data=args.data, weights=args.weights, image_size=args.image_size, batch=args.batch,
                        seed=args.seed, epochs=args.epochs, deterministic=args.deterministic, runs=args.runs,
                        mlflow=args.mlflow, operating_points=tuple(args.operating_point or ()),
                        group_by=args.group_by, group_regex=args.group_regex, groups=args.groups,
                        overrides=tuple(args.set or ()))


def cmd_train(args) -> int:
    from osteo.session import (
        build_recipe,
        continued_cv_backend,
        cross_validate,
        ensure_phantom,
        plan_device,
        resume_recipe,
    )

    console = _console()
    say = _say(console)
    options = _train_options(args)
    run = None
    if args.resume:
        if args.folds is not None or args.fold is not None or args.cv:
            raise OsteoError("--resume takes one run; to resume a fold, pass its folder: --resume CV_DIR/fold-I")
        run, recipe = resume_recipe(args.resume, args.model, options, named=args.recipe)
    elif args.recipe is None:
        raise OsteoError("osteo train needs a recipe or a backbone, e.g. osteo train finetune --model vgg16 "
                         "(or --resume RUN_DIR to continue a run)")
    else:
        recipe = build_recipe(args.recipe, args.model, options, folds=args.folds or 0)
    backend, named_by = args.backend, ""
    if run is not None and backend is None:  # a run resumes on the backend (and engine) it trained on
        with contextlib.suppress(OsteoError, OSError, ValueError):
            backend = run.read_env().get("backend")
            named_by = "the run's own: a run resumes on the backend it trained on"
    elif backend is None and (args.folds is not None or args.cv):  # and a cross-validation's folds, theirs
        backend = continued_cv_backend(recipe, args.folds, args.cv)
        named_by = "the cross-validation's: its folds train on the backend its first fold trained on"
    plan = plan_device(backend, recipe, say, named_by=named_by if backend else "")
    if run is None:
        ensure_phantom(recipe, say)
    if args.folds is not None or args.fold is not None or args.cv:
        cv = cross_validate(recipe, plan, console, folds=args.folds, fold=args.fold, cv=args.cv,
                            command=shlex.join(sys.argv))
        k = cv.read()["folds"]
        if cv.is_finished():
            _print_pooled(cv, recipe)
        under_runs = cv.path.resolve().is_relative_to(Path(recipe.runs_dir).resolve())  # else --cv put it elsewhere
        print(f"cross-validation: {cv} ({'fold ' + str(args.fold) if args.fold else f'{k} folds'}); compare with: "
              + (f"osteo report --runs {recipe.runs_dir}" if under_runs else f"osteo report {cv} RUNS..."))
        return 0
    from osteo.trainer import Trainer

    trainer = Trainer(recipe, console=console, resume=run, command=shlex.join(sys.argv), plan=plan)
    args.trainer = trainer  # a stop says which run to continue, if it made one
    print_run_summary(trainer.run(), console)
    return 0


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one model from a recipe")
    # optional with --resume, whose run's recipe decides: the hints name `osteo train --resume RUN_DIR`
    p.add_argument("recipe", nargs="?", help="recipe name (seed, finetune, demo), a .py path, or a registered "
                                             "backbone (trains with finetune); not needed with --resume")
    p.add_argument("--model", help="backbone, overriding the recipe's")
    p.add_argument("--data", help="data folder with class sub-folders (default: the phantom)")
    p.add_argument("--weights", help="imagenet, none, or a path to a weights file")
    p.add_argument("--epochs", type=int, help="total epochs (split over the two phases)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--runs", help="runs folder (default runs/)")
    p.add_argument("--deterministic", action="store_true", help="seeded, deterministic ops")
    p.add_argument("--resume", help="continue a killed run: its directory, or 'latest'")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, e.g. train.lr=3e-4")
    p.add_argument("--backend", help="auto (default: the measured-faster one), tensorflow or torch")
    p.add_argument("--folds", type=_at_least(2, MAX_FOLDS), help="k-fold cross-validation: K runs under one parent "
                                                                   "folder")
    p.add_argument("--fold", type=_at_least(1), help="run fold I (1..K) only, for schedulers (with --folds or --cv)")
    p.add_argument("--cv", help="the cross-validation's parent folder (default: a new one under RUNS)")
    p.add_argument("--mlflow", action="store_true", help="log the run to MLflow ($MLFLOW_TRACKING_URI, else ./mlruns)")
    p.add_argument("--operating-point", action="append", metavar="CLASS[+]:sensitivity=X",
                   help="screening threshold chosen on validation (repeatable), e.g. osteoporosis:sensitivity=0.90")
    _add_group_by(p, default=None)
    p.add_argument("--group-regex", metavar="PATTERN", help="regex on the file name; group 1 is the patient id")
    p.add_argument("--groups", metavar="CSV", help="CSV with path,group columns: each image's patient")
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------- eval, report, predict


def cmd_eval(args) -> int:
    from osteo.evaluate import evaluate_run, print_metrics

    if args.data:
        return eval_external(args)
    if args.tta or args.out:
        raise OsteoError("--tta and --out go with --data FOLDER (an external validation)")
    from osteo.files import all_or_none, folder_lock, sweep_temporaries
    from osteo.model_card import write_model_card
    from osteo.runs import RunDir

    run = RunDir(args.run).check(need=(RunDir.PREDICTIONS,), finished=True)
    with folder_lock(run.path, f"the metrics in {run.metrics_path}"):  # as calibrate: one at a time
        sweep_temporaries(run.path)
        # the metrics and the card that cites them, both new or neither (another --seed or --bootstrap: other
        # intervals, which the card must not contradict)
        with all_or_none([run.metrics_path, run.model_card_path]):
            metrics = evaluate_run(run.path, splits=[args.split] if args.split else None,
                                   n_boot=_bootstrap_of(run.path, args.bootstrap), seed=args.seed)
            write_model_card(run)
    console = _console()
    for name in ("test", "val"):  # the headline split first
        if name in metrics and (args.split in (None, name)):
            print_metrics(metrics, name, console)
    print(f"wrote {args.run}/metrics.json")
    return 0


def eval_external(args) -> int:
    """``osteo eval RUN --data FOLDER``: the run's best model (a cross-validation's fold models
    as one ensemble) on another labelled folder."""

    from osteo.evaluate import print_metrics
    from osteo.predict import evaluate_folder

    if args.split:
        raise OsteoError("--split is the run's own split; with --data the folder is scored whole")
    with _progress(_console_err()) as bar:
        task = bar.add_task("eval", total=None)
        out, report = evaluate_folder(args.run, args.data, args.out, tta=args.tta,
                                      n_boot=_bootstrap_of(args.run, args.bootstrap),
                                      seed=args.seed, progress=lambda k, n: bar.update(task, completed=k, total=n),
                                      warn=_warn)
    console = _console()
    tta = " with test-time augmentation" if args.tta else ""
    print_metrics({"external": report["external"]}, "external", console,
                  title=f"{args.run} on {args.data}{tta}, which chose nothing (n={report['external']['n']})")
    for p in report["operating_points"]:
        undefined = f" ({p['undefined']})" if p.get("undefined") else ""
        chosen = ("chosen on validation" if p.get("threshold_from", "validation") == "validation"
                  else p["threshold_from"]) + (" without test-time augmentation" if args.tta else "")
        print(f"{p['name']} (threshold {p['threshold']:.4f}, {chosen}), on {args.data}{tta}: "
              f"{_point_figures(p)}{undefined}")
    from osteo.predict import SEEN_IN

    seen_in = SEEN_IN["cv" if report["ensemble_of"] else "run"]
    near = f" ({report['excluded_near_copies']} of them re-encoded or resized copies)" if report.get(
        "excluded_near_copies") else ""
    filed = (f"{report['excluded_label_conflicts']} filed under two classes left out; "
             if report.get("excluded_label_conflicts") else "")
    print(f"{report['excluded_training_overlap']} image(s) also in {seen_in} left out{near}; {filed}"
          f"{report['unreadable']} unreadable; wrote {out}/predictions.csv, metrics.json, audit.json")
    return 0


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="metrics with intervals from a run's predictions")
    p.add_argument("run", help="a run directory (with --data also a cross-validation: its folds as one ensemble)")
    p.add_argument("--split", choices=("val", "test"))
    p.add_argument("--data", help="score the run's model on this labelled folder (external validation)")
    p.add_argument("--out", help="with --data: output folder (default RUN_DIR/eval/<folder-name>/)")
    p.add_argument("--tta", action="store_true", help="with --data: test-time augmentation")
    p.add_argument("--bootstrap", type=BOOTSTRAP, help="bootstrap resamples (default: the run's train.bootstrap, "
                                                       "as training drew its intervals)")
    p.add_argument("--seed", type=SEED, default=BOOTSTRAP_SEED, help=f"the bootstrap's seed (default {BOOTSTRAP_SEED}, "
                                                                     "as training's)")
    p.set_defaults(func=cmd_eval)


def _bootstrap_of(run_dir, given: int | None) -> int:
    """``--bootstrap`` where given, else the resamples the run drew its intervals with (its recipe's
    ``train.bootstrap``; a cross-validation's, its first fold's): the same predictions then get the
    same intervals from training, eval, calibrate and the report."""
    from osteo.runs import CvDir, RunDir

    if given is not None:
        return given
    path = CvDir(run_dir).fold(1).path if CvDir(run_dir).is_cv() else run_dir
    saved = RunDir(path).check().read_recipe().train.bootstrap  # not a run: check says so, and what to pass
    # an older run may hold fewer resamples than a 95% interval wants (--bootstrap's own rule): the default then
    return saved if BOOTSTRAP_RULE[0](saved) else DEFAULT_BOOTSTRAP


def _metric_cell(v) -> str:
    return "-" if v in ("", None) else f"{float(v):.3g}" if float(v) < 1e-3 else f"{float(v):.3f}"


def _p_cell(v) -> str:
    """A p-value with three significant digits, as the verdict gives it (0.00151, not 0.002)."""
    return "-" if v in ("", None) else f"{float(v):.3g}"


def cmd_report(args) -> int:
    import os

    from rich.table import Table

    from osteo.evaluate import METRICS, which_chose
    from osteo.report import collect_runs, write_report
    from osteo.runs import use_backend_of

    runs = collect_runs(args.runs_list, runs_dir=args.runs, all_runs=args.all, warn=_warn)
    use_backend_of(runs)  # the Grad-CAM grid loads models
    console = _console()
    console.print(f"reporting {len(runs)} run(s): {', '.join(str(r) for r in runs)}", markup=False, soft_wrap=True)
    page = write_report(runs, args.out, split=args.split, n_boot=args.bootstrap, warn=_warn)
    import csv

    with open(os.path.join(args.out, "verdict.txt"), encoding="utf-8") as f:
        console.print(f.read().strip(), markup=False)  # the verdict first: best, by how much, whether real
    with open(os.path.join(args.out, "comparison.csv"), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    table = Table(title="comparison")
    headline = [x for x in METRICS if x.headline]
    cols = {x.name: x.label for x in headline}  # the headline metrics and McNemar's p (the verdict has the baseline)
    cols["mcnemar_p_holm"] = "McNemar p (Holm)"
    table.add_column("model", no_wrap=True, min_width=13)
    table.add_column("evaluated on", min_width=12, overflow="fold")
    for label in cols.values():  # a narrow terminal folds a cell, never cuts it
        table.add_column(label, justify="right", overflow="fold")
    chose = {r["chose"] for r in rows} - {"nothing"}
    engines = len({r.get("engine") for r in rows} - {None, ""}) > 1  # runs of both: each row says its own
    # two rows of one model (--all, seeds) are told apart by their run ids, as the CSV tells them
    models = [(r["model"], r["evaluated_on"]) for r in rows]
    ids = len(set(models)) < len(models)
    for r in rows:  # a row whose images chose something is starred, and the star said below
        table.add_row(r["model"] + (f" {r['run_id']}" if ids and r.get("run_id") else "")
                      + (f" ({r.get('engine')})" if engines and r.get("engine") else ""),
                      r["evaluated_on"] + (" *" if r["chose"] != "nothing" else ""),
                      *((_p_cell if c == "mcnemar_p_holm" else _metric_cell)(r[c]) for c in cols))
    console.print(table)
    print("".join(f"*: images {which_chose(c)}; " for c in sorted(chose))
          + f"{'the other' if chose else 'the'} rows' images chose nothing")
    print(f"report: {os.path.abspath(page)}")
    return 0


def _add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="compare runs: CSVs, plots and one HTML page")
    p.add_argument("runs_list", nargs="*", metavar="RUNS", help="run directories (default: latest of each model)")
    p.add_argument("--runs", default="runs", help="runs folder to search (default runs/)")
    p.add_argument("--all", action="store_true", help="every finished run, not only the latest per model")
    p.add_argument("--out", default="reports", help="output folder (default reports/)")
    p.add_argument("--split", choices=("auto", "val", "test"), default="auto",
                   help="what single runs are reported on: auto (default) their test split where they have one, "
                        "which chose nothing, else validation")
    p.add_argument("--bootstrap", type=BOOTSTRAP, default=DEFAULT_BOOTSTRAP)
    p.set_defaults(func=cmd_report)


def cmd_predict(args) -> int:

    from osteo.predict import predict_files
    from osteo.runs import RunDir

    RunDir(args.run).check(need=(RunDir.BEST,), finished=True)  # a missing run is said first, not the CSV
    out = args.out
    if out is None:  # here, and never over an earlier CSV unasked
        out = Path(PREDICTIONS_CSV)
        if os.path.lexists(out):
            raise OsteoError(f"{out} exists (an earlier osteo predict's?); pass --out {out} to replace it, or "
                             "--out another.csv")
    with _progress(_console_err()) as bar:
        task = bar.add_task("predict", total=None)
        done = predict_files(args.run, args.images, out, calibrated=not args.no_calibration, tta=args.tta,
                             gradcam_dir=args.gradcam, progress=lambda k, n: bar.update(task, completed=k, total=n))
    print(f"wrote {done.out}" + (f"; Grad-CAM overlays in {args.gradcam}" if args.gradcam else ""))
    return 1 if done.unreadable or done.unlisted else 0  # as an export's predict.py: a script sees that some files have no row's answer


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify images with a trained run's best model")
    p.add_argument("run", help="a run directory")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", help=f"the CSV to write (replaced if it exists); default: {PREDICTIONS_CSV} here, "
                                 "if there is none yet")
    p.add_argument("--no-calibration", action="store_true", help="the model's own probabilities, not calibrated")
    p.add_argument("--tta", action="store_true", help="average over the image, its mirror and small shifts")
    p.add_argument("--gradcam", metavar="DIR", help="write a Grad-CAM overlay per image to DIR")
    p.set_defaults(func=cmd_predict)


def _point_figures(p: dict) -> str:
    """Sensitivity and specificity at an operating point, with their intervals where there are some."""
    return ", ".join(_with_interval(p, k) for k in ("sensitivity", "specificity"))


def _with_interval(m: dict, key: str, label: str | None = None) -> str:
    """``label 0.812 [0.750, 0.861]``: ``m[key]`` and its interval ``m[key_ci]`` where it has one."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lo, hi = m.get(f"{key}_ci") or (None, None)
    return f"{label or key} {fmt(m[key])}" + (f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None else "")


def cmd_calibrate(args) -> int:
    """Fit (again) a run's temperature and operating points on its validation predictions."""
    from osteo.calibrate import calibrate_run
    from osteo.files import all_or_none, folder_lock, sweep_temporaries
    from osteo.model_card import write_model_card
    from osteo.runs import RunDir

    run = RunDir(args.run).check(need=(RunDir.PREDICTIONS,), finished=True)
    points = args.operating_point or run.read_recipe().train.operating_points
    # one calibrate or eval of the run at a time: another calibrate's external validations measured at its
    # thresholds would stay beside this one's calibration.json, an eval's at the calibration it read
    with folder_lock(run.path, f"the calibration in {run.calibration_path}"):
        sweep_temporaries(run.path)  # a killed calibrate's
        # the calibration, the external validations measured at it and the card citing both: all new, or none
        scored = sorted(run.eval_path.glob(f"*/{RunDir.METRICS}")) if run.eval_path.is_dir() else []
        try:  # the points in use until now: one not asked for again is no longer decided on
            before = [p.get("name") for p in (run.read_calibration() or {}).get("operating_points", [])]
        except (OsteoError, AttributeError, TypeError):
            before = []
        with all_or_none([run.calibration_path, *scored, run.model_card_path]):
            cal = calibrate_run(run, points, n_boot=_bootstrap_of(run.path, args.bootstrap), seed=args.seed)
            write_model_card(run)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"temperature {fmt(cal['temperature'])}: ECE {fmt(cal.get('ece_before'))} -> {fmt(cal.get('ece_after'))}, "
          f"NLL {fmt(cal.get('nll_before'))} -> {fmt(cal.get('nll_after'))} (validation, which chose it, "
          f"n={cal['n']})")
    if cal.get("temperature_note"):
        print(cal["temperature_note"])
    if cal.get("test"):
        print(f"ECE on test, which chose nothing: {fmt(cal['test']['ece_before'])} -> {fmt(cal['test']['ece_after'])} "
              f"(n={cal['test']['n']})")
    for p in cal["operating_points"]:
        if p.get("error"):
            _warn(f"{p['name']}: {p['error']}")
            continue
        print(f"{p['name']}: threshold {p['threshold']:.4f}"
              + (f"; test (chose nothing) {_point_figures(p['test'])}" if p.get("test") else "")
              + f"; validation (chose it) {_point_figures(p['val'])}")
    dropped = [name for name in before if name and name not in {p["name"] for p in cal["operating_points"]}]
    if dropped:
        _warn(f"{', '.join(dropped)} {'is' if len(dropped) == 1 else 'are'} no longer an operating point of this run "
              f"(osteo predict drops its screening column; its goal is kept in earlier_goals): give every point the "
              f"run should decide with --operating-point")
    again = f"; measured again at it: {', '.join(p.parent.name for p in scored)}" if scored else ""
    print(f"wrote {run.calibration_path} and {run.model_card_path}{again}")
    return 0


def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="temperature scaling and operating points on a run's validation split")
    p.add_argument("run", help="a run directory")
    p.add_argument("--operating-point", action="append", metavar="CLASS[+]:sensitivity=X",
                   help="e.g. osteoporosis:sensitivity=0.90 or osteopenia+:specificity=0.8 (repeatable; "
                        "default: the run's recipe's)")
    p.add_argument("--bootstrap", type=BOOTSTRAP, help="bootstrap resamples (default: the run's train.bootstrap)")
    p.add_argument("--seed", type=SEED, default=BOOTSTRAP_SEED)
    p.set_defaults(func=cmd_calibrate)


def cmd_export(args) -> int:
    """``osteo export``: the path written, and how close its probabilities came to ``osteo predict``'s."""
    from osteo.export_request import check_request

    check_request(args.run, args.format, args.out)  # refused before Keras and the backend are imported
    from osteo.export import export_run, parity_of

    out = export_run(args.run, args.format, args.out)
    parity = parity_of(out, args.format)
    print(f"wrote {out}" + (f" (its probabilities within {parity['max_abs_diff']:.1e} of osteo predict's on "
                            f"{parity['images']} {parity['source']} images)" if parity else ""))
    return 0


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="the run's best model for other systems, preprocessing and calibration inside")
    p.add_argument("run", help="a run directory")
    p.add_argument("--format", choices=("onnx", "savedmodel", "keras"), default="onnx")
    p.add_argument("--out", help="output path (default: RUN_DIR/export/model.onnx, export/savedmodel/ or "
                                 "export/model.keras)")
    p.set_defaults(func=cmd_export)


def cmd_study(args) -> int:
    """``osteo study``: the backbones x folds x seeds grid (and a learning-rate search) as trials."""
    import os

    from osteo.session import TrainOptions
    from osteo.study import StudyConfig, run_study

    options = TrainOptions(data=args.data, weights=args.weights, image_size=args.image_size, epochs=args.epochs,
                           runs=args.runs, mlflow=args.mlflow, overrides=tuple(args.set or ()))
    cfg = StudyConfig(
        models=[m.strip() for m in args.models.split(",") if m.strip()], recipe=args.recipe, folds=args.folds,
        seeds=args.seeds, address=args.address or os.environ.get("RAY_ADDRESS"),
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, out=args.out,
        runs=args.runs or "runs", options=options, search=args.search, trials=args.trials,
        mlflow=args.mlflow, external=args.external or [],
    )
    console = _console()
    page = run_study(cfg, say=_say(console), warn=_warn)
    print(f"study report: {os.path.abspath(page)}")
    return 0


def _add_study_parser(sub) -> None:
    p = sub.add_parser("study", help="the backbones x folds x seeds grid, on Ray when installed")
    p.add_argument("--models", default="vgg16,vgg19,densenet169,convnext_tiny", help="comma-separated backbones")
    p.add_argument("--recipe", default="finetune", help="recipe for every trial (default finetune)")
    p.add_argument("--folds", type=_at_least(2, MAX_FOLDS), default=5,
                   help="k of the k-fold cross-validation (default 5)")
    p.add_argument("--seeds", type=_at_least(1), default=1, help="split and training seeds per model (default 1)")
    p.add_argument("--address", help="a Ray cluster's address (default: $RAY_ADDRESS, else Ray on this machine)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--out", default="reports/study", help="the study's report folder")
    p.add_argument("--data")
    p.add_argument("--weights")
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--runs", help="runs folder (default runs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override for every trial")
    p.add_argument("--search", metavar="KEY=LO:HI:log", help="search a hyper-parameter per backbone first")
    p.add_argument("--trials", type=_at_least(1), default=8, help="search trials per outer fold (default 8)")
    p.add_argument("--mlflow", action="store_true", help="log every trial to MLflow (one experiment)")
    p.add_argument("--external", action="append", metavar="FOLDER",
                   help="score each backbone's final model (its fold models as one ensemble) on this labelled "
                        "folder of another hospital (repeatable)")
    p.set_defaults(func=cmd_study)


# --------------------------------------------------------------------------- main


def _warn(message: str) -> None:
    print(f"osteo: warning: {message}", file=sys.stderr)


def _warnings_as_lines() -> None:
    """The library's logged warnings (skipped files, rebuilt cache entries) as ``osteo: warning:`` lines,
    and so are Python warnings of the libraries osteo calls (one line each, without the source line
    Python shows): those of cases osteo handles are silenced where they arise."""
    import logging
    import warnings

    log = logging.getLogger("osteo")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("osteo: warning: %(message)s"))
        log.addHandler(handler)
        log.propagate = False

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning | PendingDeprecationWarning):
            return  # for osteo's developers, not its users (Python hides them outside __main__ too)
        text = " ".join(str(message).split())[:300]
        print(f"osteo: warning: {text} ({category.__name__} in {Path(filename).name})", file=sys.stderr)

    warnings.showwarning = one_line


# where each command can be told to write instead (its options), for the fix of a full or read-only
# disk; a command not named writes where it was pointed (osteo calibrate: the run's folder)
ELSEWHERE = {
    "cmd_train": "--runs (make's RUNS=), or OSTEO_CACHE= for the image cache",
    "cmd_study": "--runs (make's RUNS=), or OSTEO_CACHE= for the image cache",
    "cmd_eval": "--out, or OSTEO_CACHE= for the image cache",
    "cmd_audit": "--out, or OSTEO_CACHE= for the image cache",
    "cmd_split": "--out",
    "cmd_report": "--out",
    "cmd_predict": "--out and --gradcam",
    "cmd_export": "--out",
    "cmd_phantom": "another output folder, the command's first argument",
}


def describe_os_error(e: OSError, command: str | None = None) -> str:
    """One line for an error of the machine (disk full, read-only, permissions), with the fix;
    ``command`` (a ``cmd_*`` function's name) says where else that command can write."""
    import errno
    import re

    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    # one line: h5py's messages span lines and carry the system's errno in their text
    what = " ".join((e.strerror or str(e)).split())[:300] or type(e).__name__
    code = e.errno
    if code is None and (found := re.search(r"errno = (\d+)", str(e))):
        code = int(found.group(1))
    elsewhere = ELSEWHERE.get(command or "")
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
        # out of inodes reads the same: free files, not only bytes
        fix = "free some disk space" + (f", or write elsewhere ({elsewhere})" if elsewhere else "")
    elif code == errno.EFBIG:
        fix = ("a file size limit was reached (the shell's ulimit -f, or the file system's largest file): "
               "raise it" + (f", or write elsewhere ({elsewhere})" if elsewhere else ""))
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        from osteo.runs import CvDir, RunDir

        run = None
        with contextlib.suppress(TypeError, ValueError, OSError):  # a file name osteo cannot place is no run's
            run = RunDir.owner_of(e.filename) if isinstance(e.filename, str | os.PathLike) else None
        if run is not None:  # eval, calibrate, a resume: a run's results are written in its own folder
            kind = "cross-validation" if isinstance(run, CvDir) else "run"
            fix = (f"make the {kind}'s folder {run.path} writable (not immutable: lsattr shows it): its results are "
                   "kept there" + (" (eval --data: or give --out outside it)" if command == "cmd_eval" else ""))
        else:
            fix = (f"choose a folder you can write to ({elsewhere})" if elsewhere else
                   "make that file and its folder writable (not immutable: lsattr shows it)")
    elif code == errno.ENAMETOOLONG:
        fix = "shorten the path: a file or folder name is at most 255 bytes on most file systems"
    else:
        fix = "check the file and the disk, then run the command again"
    return f"{what}{where}; {fix}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="osteo", description="Train, compare and audit knee X-ray classifiers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_data_parser(sub)
    _add_train_parser(sub)
    _add_calibrate_parser(sub)
    _add_export_parser(sub)
    _add_study_parser(sub)
    _add_eval_parser(sub)
    _add_report_parser(sub)
    _add_predict_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from osteo import _lean, _quiet

    # TensorFlow's C++ start-up chatter (oneDNN notices, CPU feature lists) would drown the
    # one-line errors and progress osteo prints; `osteo --debug` or OSTEO_TF_LOGS=1 keep it.
    # Here, not on `import osteo`: a program that imports the library keeps its own stderr.
    _quiet.install()
    # Keras' optional scikit-learn, pandas and matplotlib stay unloaded until osteo needs them
    # (about 150 MB of a training process at its peak); likewise only in osteo's own processes
    _lean.install()
    parser = build_parser()
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    lead = given[: next((i for i, a in enumerate(given) if not a.startswith("-")), len(given))]
    odd = [a for a in lead if a not in ("--debug", "-h", "--help")]
    if odd:  # argparse would only say that the command is missing
        print(f"osteo: error: unknown option {odd[0]}: options go after the command, as in "
              "osteo train --help (see 'osteo --help')", file=sys.stderr)
        return 2
    _Parser.given = tuple(given)
    try:
        args, extra = parser.parse_known_args(given)
        if extra:  # named by the command that did not know them, not by osteo's top level
            print(f"osteo: error: unrecognized arguments: {' '.join(extra)}{_dashed_file_hint(extra)} "
                  f"(see '{args.help_of} --help')",
                  file=sys.stderr)
            return 2
    except SystemExit as e:  # a usage error (one line, already printed) or --help
        return e.code if isinstance(e.code, int) else 2
    named = {"out": "predictions.csv", "gradcam": "gradcam", "runs": "runs", "cv": "cv-1"}  # an example of each
    dashed = [name for name in named if getattr(args, name, None) == "-"]
    if dashed:  # many tools read "-" as standard output; osteo writes files and folders
        print(f"osteo: error: --{dashed[0]} - is not standard output here: osteo writes files; give a name, e.g. "
              f"--{dashed[0]} {named[dashed[0]]}", file=sys.stderr)
        return 2
    if args.debug:  # TensorFlow's start-up logs too (osteo._quiet)
        os.environ["OSTEO_TF_LOGS"] = "1"
    _warnings_as_lines()
    previous = _stop_on_sigterm()
    try:
        if getattr(args, "run", None) and args.func in (cmd_eval, cmd_predict, cmd_export):
            from osteo.runs import use_backend_of

            note = use_backend_of([args.run], set_aside=True)
            if note:
                _warn(note)
        return args.func(args) or 0
    except OsteoError as e:
        if args.debug:
            raise
        print(f"osteo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not osteo: one line, like a user error
        if args.debug:
            raise
        print(f"osteo: error: {describe_os_error(e, args.func.__name__)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"osteo: interrupted; {_after_stop(args)}", file=sys.stderr)
        return 130
    except Stopped:
        print(f"osteo: stopped by SIGTERM; {_after_stop(args)}", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended
    finally:
        import signal

        signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """SIGTERM raises :class:`osteo.errors.Stopped` (Python's default ends the process where it
    is, and Ray's exits 1 with its crash report); returns the handler it replaces."""
    import signal

    def stop(signum, frame):
        raise Stopped

    return signal.signal(signal.SIGTERM, stop)


def _after_stop(args) -> str:
    """How to continue a command SIGTERM or Ctrl-C stopped."""
    if args.func is cmd_study or (args.func is cmd_train and (args.folds or args.cv or args.resume)):
        return "run the same command again to continue"
    if args.func is cmd_train:
        trainer = getattr(args, "trainer", None)
        if trainer is None or trainer.run_dir is None:  # stopped before its run folder was made
            return "no run folder was made yet: run the same command again"
        if not trainer.run_dir.path.is_dir():  # stopped before its first epoch: the empty run was removed
            return "no epoch had ended, and its empty run folder is removed: run the same command again"
        import shlex

        return f"continue the run with: osteo train --resume {shlex.quote(str(trainer.run_dir))}"
    return "its outputs are the previous ones or the new ones, whole: run the command again"


if __name__ == "__main__":
    sys.exit(main())
