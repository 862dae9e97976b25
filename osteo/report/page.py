"""The report's page, ``index.html``, and :func:`write_report`, which writes the whole report."""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from osteo import CLASSES, killpoints
from osteo.errors import OsteoError
from osteo.evaluate import HEADLINE, METRICS, listed
from osteo.files import (
    OwnedFolder,
    all_or_none,
    folder_lock,
    owned_prefix,
    replace_folder,
    sweep_temporaries,
    write_csv,
    write_text,
)
from osteo.report.load import Run, load_runs, oracle_runs
from osteo.report.plots import (
    plot_bars,
    plot_confusions,
    plot_curves,
    plot_gradcam,
    plot_reliability,
    plot_roc,
    plot_samples,
    run_colours,
)
from osteo.report.tables import (
    COMPARISON_COLUMNS,
    FOLD_COLUMNS,
    PER_CLASS_COLUMNS,
    POINT_COLUMNS,
    cell_text,
    comparison_rows,
    fold_rows,
    per_class_rows,
    point_rows,
    to_float,
)
from osteo.report.verdict import verdict
from osteo.runs import check_output_place

STAGE_PREFIX = ".report-"  # the staging folder inside --out while a report is written


def write_report(run_dirs: list, out: str | os.PathLike, split: str = "auto", n_boot: int = 1000,
                 seed: int = 0, warn: Callable[[str], None] | None = None) -> Path:
    """Write the CSVs, plots, ``verdict.txt`` and ``index.html`` for ``run_dirs`` to ``out``; return
    the page. ``split`` (``auto``: each run's test split where it has one, else validation;
    ``val``; ``test``) is what single runs are reported on.

    A run that cannot be read (damaged files, another class set) is skipped with one
    ``warn`` line and named on the page. Everything is first written to a staging
    folder inside ``out`` and moved into place with ``index.html`` last, so a report
    killed while it computes (nearly all of its time) leaves the previous one whole. Its
    files are renamed in one after another, not at once (``out`` may hold files of other
    tools, so it cannot be swapped whole): a kill in those milliseconds
    (``report.replacing``) leaves every file whole, some of them new beside the previous
    page, until the next report.
    """
    import matplotlib

    matplotlib.use("Agg")
    if n_boot < 0:
        raise OsteoError(f"the number of bootstrap resamples must be 0 or more, got {n_boot}; e.g. --bootstrap 1000")
    out = Path(out)
    check_output_place(out, "--out", "choose a folder outside it, e.g. --out reports", folder=True)
    runs, skipped = load_runs(run_dirs, split, n_boot, seed, warn)
    for data in {r.recipe.get("data", {}).get("dir") for r in runs} - {None, ""}:  # nor in a run's images
        check_output_place(out, "--out", "choose a folder outside it, e.g. --out reports", data=data)
    if not runs:
        raise OsteoError(f"none of the {len(skipped)} run(s) could be reported; each warning above says why, and "
                         "what to do")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OsteoError(f"cannot create {out}: {e.strerror}; choose a writable --out folder") from None
    sweep_temporaries(out)
    owned = OwnedFolder(out, "--out")  # a report replaces only what an earlier one wrote
    owned.check(removes=_files_under(out, "plots"))  # plots/ is replaced whole: checked before the work
    stage = Path(tempfile.mkdtemp(prefix=owned_prefix(STAGE_PREFIX), suffix=".tmp", dir=out))
    try:
        oracles = oracle_runs(runs, n_boot, seed)
        rows = comparison_rows(runs, oracles, n_boot, seed)
        write_csv(stage / "comparison.csv", rows, COMPARISON_COLUMNS)
        said = verdict(rows)
        write_text(stage / "verdict.txt", "\n\n".join(said) + "\n")
        write_csv(stage / "per_class.csv", per_class_rows(runs), PER_CLASS_COLUMNS)
        write_csv(stage / "folds.csv", fold_rows(runs), FOLD_COLUMNS)
        points = point_rows(runs)
        write_csv(stage / "operating_points.csv", points, POINT_COLUMNS)
        plots_dir = stage / "plots"
        colours = run_colours(runs)
        plots = {
            "bars": plot_bars(runs, colours, plots_dir, oracles),
            "curves": plot_curves(runs, colours, plots_dir),
            "confusion": plot_confusions(runs, plots_dir),
            "roc": plot_roc(runs, colours, plots_dir),
            "reliability": plot_reliability(runs, colours, plots_dir),
            "samples": plot_samples(runs, plots_dir),
        }
        plots["gradcam"], gradcam_notes = plot_gradcam(runs, plots_dir)
        page = render_html(runs, rows, plots, said, skipped, n_boot, points, gradcam_notes)
        write_text(stage / "index.html", page)
        tables = ("comparison.csv", "per_class.csv", "folds.csv", "operating_points.csv", "verdict.txt")
        # the work above is staged; the folder is held from the claim on: another report there waits, and its
        # record of what it owns is not written over this one's. A file that cannot be replaced (immutable)
        # stops the renames before the first; one failing among them puts the tables back
        with folder_lock(out, "a report"):
            owned.claim([f.relative_to(stage).as_posix() for f in stage.rglob("*") if not f.is_dir()],
                        removes=_files_under(out, "plots"))
            with all_or_none([out / name for name in (*tables, "index.html")]):
                for name in tables:
                    os.replace(stage / name, out / name)
                killpoints.reached("report.replacing")
                # the page last: it appears only when all is there; if it cannot, the previous plots come back
                replace_folder(plots_dir, out / "plots",
                               then=lambda: os.replace(stage / "index.html", out / "index.html"))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out / "index.html"


def _files_under(out: Path, sub: str) -> list[str]:
    """The files in ``out/sub``, relative to ``out`` (replacing the folder removes them all)."""
    folder = out / sub
    return [f.relative_to(out).as_posix() for f in folder.rglob("*") if not f.is_dir()] if folder.is_dir() else []


def render_html(runs: list[Run], rows: list[dict], plots: dict[str, Path], said: list[str],
                skipped: list[str] = (), n_boot: int = 1000, points: list[dict] = (),
                gradcam_notes: list[str] = ()) -> str:
    e = html.escape
    cols = ["model", "run_id", "evaluated_on", "chose", "folds", "weights", "precision", "image_size", "epochs",
            "best_epoch", "n_train", "n", *(m.name for m in METRICS), "probabilities", "ece_calibrated",
            "majority_accuracy", "majority_balanced_accuracy", "balanced_accuracy_diff", "mcnemar_p", "mcnemar_p_holm",
            "train_images_per_sec"]
    headers = {m.name: f"{m.label} {'↑' if m.higher_is_better else '↓'}" for m in METRICS}
    table_rows = _with_intervals(rows, [m.name for m in METRICS if m.interval])
    warnings = [w for r, row in zip(runs, rows) for w in failures(r, row)]
    warn_html = "".join(f'<p class="warn">{e(w)}</p>' for w in [*warnings, *skipped])
    sections = [
        ("Headline metrics", "bars", f"{listed([m.label for m in METRICS if m.headline])} with 95% bootstrap "
                                     "intervals; over each bar, red dashes: the run's majority-class baseline, green dots (on the "
                                     "phantom): the oracle's ceiling, both on the run's own images"),
        ("Training curves", "curves", "dashed: training, solid: validation; dotted: the start of fine-tuning"),
        ("Confusion matrices", "confusion", ""),
        ("ROC curves", "roc", "one class against the rest"),
        ("Calibration", "reliability", "a calibrated model lies on the diagonal, on each row's images; right: "
                                       "after each run's temperature scaling (fitted on its validation predictions, "
                                       "so measured on validation it is optimistic); a cross-validation's ensemble "
                                       "on another folder averages its folds' calibrated probabilities, so it is "
                                       "drawn on the right only"),
        ("Sample predictions", "samples", "on each row's images"),
        ("Where the models look (Grad-CAM)", "gradcam", "the most confident correct (green) and wrong (red) "
                                                        "images of each row, heat on the layer named beside it"),
    ]
    body = ["<h1>osteo: model comparison</h1>", "<h2>Verdict</h2>", *(f'<p class="verdict">{e(p)}</p>' for p in said),
            warn_html,
            "<h2>Comparison</h2>",
            "<p>Each row names the images its numbers were measured on (evaluated on) and what those images were "
            "used to choose (chose): nothing for a test split, a nested cross-validation's held-out folds and "
            "another folder; the checkpoint, temperature and thresholds for a validation split, whose numbers are "
            "optimistic.</p>",
            _table(table_rows, cols, [headers.get(c, c.replace("_", " ")) for c in cols]),
            f"<p>Intervals: stratified bootstrap, {n_boot:,} resamples, 95% percentile; a group the split keeps "
            "together (duplicates, a patient's images) is drawn whole. Against the best run on the "
            "same images, the best chosen by balanced accuracy on each run's validation images where every run "
            "has them (best chosen by, in comparison.csv: the images compared choose nothing, not even the "
            "best): the difference in balanced accuracy (paired bootstrap) and "
            "McNemar's test on the images only one of the two got right (exact; where images come in groups, "
            "an exact sign-flip test over the groups, each counted once), its p-value raw and Holm-adjusted for the "
            "comparisons made on those images.</p>"]
    for title, key, caption in sections:
        if key in plots:
            body.append(f"<h2>{e(title)}</h2><p>{e(caption)}</p>{_img(plots[key], title)}")
        if key == "gradcam" and gradcam_notes:  # which layer, of how many cells, each row's maps are of
            body.append("<ul>" + "".join(f"<li>{e(note)}</li>" for note in gradcam_notes) + "</ul>")
    if points:
        body.append("<h2>Operating points</h2><p>Thresholds chosen on each run's validation split (after "
                    "calibration) for a screening sensitivity or specificity, and what they give on every data "
                    "the run was scored on, with 95% bootstrap intervals: on validation, where they were chosen, "
                    "the sensitivity asked for is met by construction; the other rows chose nothing. A "
                    "cross-validation's are pooled over its held-out folds, each at its own fold's threshold; its "
                    "ensemble on another folder uses the mean of its folds' thresholds, which no image set chose "
                    "(threshold from).</p>"
                    + _table(_with_intervals(points, ["sensitivity", "specificity"]),
                             [c for c in POINT_COLUMNS if not c.endswith(("_lo", "_hi"))]))
    folds = fold_rows(runs)
    if folds:
        body.append("<h2>Cross-validation folds</h2><p>Each fold's metrics on its held-out images; the comparison "
                    "table shows the pooled out-of-fold predictions, and the mean and SD over the folds in "
                    "comparison.csv.</p>" + _table(folds, list(FOLD_COLUMNS)))
    body.append("<h2>Data audit</h2>" + _audit_section(runs))
    body.append("<h2>Runs</h2>")
    for r in runs:
        body.append(f"<details><summary>{e(r.label)}: recipe and environment</summary>"
                    f"<pre>{e(json.dumps(r.recipe, indent=2))}</pre><pre>{e(json.dumps(r.env, indent=2))}</pre></details>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>osteo report</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def failures(run: Run, row: dict) -> list[str]:
    """Why ``run`` has failed, one sentence each; none for a run that beats the majority baseline.

    Written to survive the runs it exists to flag: a NaN or None metric is itself a
    failure, never an exception or a silently passed comparison.
    """
    who = f"{row['model']} ({row['run_id']})"
    split = row["evaluated_on"]
    out = []
    if row.get("n_nonfinite"):
        out.append(f"{who}: {row['n_nonfinite']} of {row['n']} {split} predictions are not finite (NaN or "
                   "infinite): the model diverged, and ROC-AUC and calibration are left out.")
    bad_history = [k for k in (run.history[0] if run.history else {})
                   if any(_nonfinite(h.get(k)) for h in run.history)]
    if bad_history:
        out.append(f"{who}: history.csv holds NaN or infinite {', '.join(map(str, bad_history))}: training diverged.")
    bad_metrics = [k for k in HEADLINE if not np.isfinite(to_float(row.get(k)))]
    if bad_metrics:
        out.append(f"{who}: {', '.join(bad_metrics)} not finite: the run cannot be compared.")
    classes = sorted({CLASSES[i] for i in run.y})
    ba, base = to_float(row.get("balanced_accuracy")), to_float(row.get("majority_balanced_accuracy"))
    if len(classes) == 1:
        # every model equals the baseline here, so the margin test below would blame the model
        out.append(f"{who}: its {split} split holds only {classes[0]} images: balanced accuracy cannot tell a "
                   "model from always answering one class.")
    elif np.isfinite(ba) and np.isfinite(base) and ba - base < 0.05:
        out.append(f"{who}: balanced accuracy {ba:.3f} is within 0.05 of always answering {row['majority_class']} "
                   f"({base:.3f}): it has not learned the task.")
    return out


def _nonfinite(v) -> bool:
    """A cell that reads as a number but is NaN or infinite (a blank cell is only missing)."""
    try:
        return not np.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _audit_section(runs: list[Run]) -> str:
    e = html.escape
    parts = []
    # a folder's audit once, naming the runs it is the data of (runs of one folder audited alike: one
    # block, not one per split reported); an external folder's once per run scored on it (what it left
    # out is that run's data)
    shown: dict[tuple, list[Run]] = {}
    for r in runs:
        a, record = r.audit, r.external_record
        if a:
            key = record.get("data_dir") or a.get("data_dir")  # an external folder: where it was scored from
            seen_as = (key, r.evaluated_on, r.run_id) if record else (key, json.dumps(a, sort_keys=True, default=str))
            shown.setdefault(seen_as, []).append(r)
    for (key, *_), alike in shown.items():
        r = alike[0]
        a, record = r.audit, r.external_record
        groups = a.get("duplicate_groups", [])
        conflicts = [g for g in groups if g.get("conflict")]
        rows = [{"class": c, "readable images": a.get("classes", {}).get(c)} for c in CLASSES]
        whose = sorted({f"{x.model} {x.run_id}" for x in alike})
        parts.append(f"<h3>data: {e(str(key))}" + (f" ({e(r.evaluated_on)}, scored by {e(r.model)} {e(r.run_id)})"
                                                    if record else f" (the data of {e(', '.join(whose))})") + "</h3>")
        parts.append(_table(rows, ["class", "readable images"]))
        counts = (f"{a.get('n_files', 0)} image files, {a.get('n_ok', 0)} readable, {len(a.get('unreadable', []))} "
                  f"unreadable, {len(a.get('ignored', []))} ignored; {len(groups)} duplicate groups "
                  f"({sum(g['kind'] == 'exact' for g in groups)} exact, {sum(g['kind'] == 'near' for g in groups)} near)")
        if record:  # a folder scored by osteo eval: what it left out of the score, and why
            overlap, near = record.get("excluded_training_overlap", 0), record.get("excluded_near_copies", 0)
            parts.append(
                f"<p>{counts}. Scored: {len(r.y)} images. Left out: {overlap} also in the run's own data (its "
                f"training, validation or test images{f', {near} of them re-encoded or resized copies' if near else ''}), "
                f"{record.get('excluded_label_conflicts', 0)} filed under two classes (their label is unknown), "
                f"{record.get('unreadable', 0)} unreadable.</p>")
        else:
            parts.append(f"<p>{counts}, {len(conflicts)} filed under two classes and excluded from the split "
                         f"({r.env.get('excluded_conflicts', 0)} images).</p>")
        if conflicts:
            items = "".join(f"<li>{e(', '.join(g['paths']))} ({e(', '.join(g['labels']))})</li>" for g in conflicts[:50])
            parts.append(f"<details><summary>conflicting duplicate groups</summary><ul>{items}</ul></details>")
        if a.get("unreadable"):
            items = "".join(f"<li>{e(u['path'])}: {e(u['reason'])}</li>" for u in a["unreadable"][:50])
            parts.append(f"<details><summary>unreadable files</summary><ul>{items}</ul></details>")
    return "".join(parts) or "<p>no audit recorded</p>"


def _with_intervals(rows, keys: list[str]) -> list[dict]:
    """The rows with each of ``keys`` written with its interval, ``x [lo, hi]``, where it has one."""
    out = []
    for row in rows:
        t = dict(row)
        for k in keys:
            if row.get(f"{k}_lo") is not None:
                t[k] = f"{cell_text(row[k])} [{cell_text(row[f'{k}_lo'])}, {cell_text(row[f'{k}_hi'])}]"
        out.append(t)
    return out


def _table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers or columns)
    body = "".join("<tr>" + "".join(f"<td>{e(cell_text(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}.warn{color:#a00;font-weight:bold}
details{margin:.5em 0}.scroll{overflow-x:auto}.verdict{font-size:15px;max-width:60em}"""
