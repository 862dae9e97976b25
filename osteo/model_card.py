"""A run's ``MODEL_CARD.md``, written from its own files (no Keras)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from osteo.device import get_engine
from osteo.errors import OsteoError
from osteo.evaluate import (
    CHOSE,
    METRICS,
    SPLIT_NAMES,
    external_label,
    external_points,
    headline_split,
    provenance,
)
from osteo.files import sweep_temporaries, temporaries_of, write_text
from osteo.registry import names_a_file
from osteo.runs import RunDir


def _weights_hash(env: dict) -> str:
    """`` (sha256 …)`` of the weights file the run started from, where its env.json records it."""
    sha = env.get("weights_sha256")
    return f" (sha256 {sha[:16]}…)" if isinstance(sha, str) and sha else ""


def _named(place: str) -> str:
    """A data folder or weights file as the card names it: by its name, not by where it was on the
    machine that trained (a card is shared; ``recipe.json`` keeps the whole path); ``imagenet`` and
    ``none`` as they are."""
    return Path(place).name or place if names_a_file(place) else place


def _command(command: str) -> str:
    """The command that trained (``env.json``'s, each word quoted as a shell would), its program and
    every absolute path in it by name (``osteo train vgg16 --data …/knees``), as the card names the
    data and weights; a command recorded unquoted (before osteo quoted it) is split at spaces."""
    import shlex

    try:
        words = shlex.split(command)
    except ValueError:  # an unquoted command with a quote in a path
        words = command.split()
    if not words:
        return ""
    program = Path(words[0]).name
    words = ["osteo" if program in ("osteo", "__main__.py") else program, *map(_named_if_absolute, words[1:])]
    return " ".join(shlex.quote(w) if any(c.isspace() for c in w) else w for w in words)


def _named_if_absolute(word: str) -> str:
    """``/home/a/knees`` as ``…/knees``, also after ``--data=``; any other word as it is."""
    option, eq, value = word.partition("=") if word.startswith("--") and "=" in word else ("", "", word)
    return f"{option}{eq}…/{Path(value).name}" if value.startswith("/") and Path(value).name else word


def _stopped_early(recipe, env: dict) -> str:
    """``; 6 trained: early stopping (patience 2) ended a phase`` where it did (history.csv has each epoch)."""
    planned, run = recipe.train.epochs + recipe.train.fine_tune_epochs, env.get("epochs_run")
    return (f"; {run} trained: early stopping (patience {recipe.train.early_stopping}) ended a phase"
            if isinstance(run, int) and run < planned else "")


def _kept_whole(run: RunDir) -> str:
    """The split's groups of two or more images kept on one side (split.csv's ``group``): a
    patient's (DICOM PatientID, ``--group-regex``, ``--groups``) and copies of one image."""
    try:
        sizes = Counter(r.get("group") or r["path"] for r in run.read_split())
    except (OsteoError, KeyError):
        return "- kept whole by the split: unknown (split.csv cannot be read)"
    whole = [n for n in sizes.values() if n > 1]
    return (f"- kept whole by the split, each on one side: {len(whole)} groups of images (a patient's, or copies of "
            f"one image), {sum(whole)} images in all" if whole else
            "- kept whole by the split: no group of two or more images")


def write_model_card(run_dir) -> Path:
    """``MODEL_CARD.md`` of one run: what it is for and not, its data, recipe, results and environment.

    Rewritten whenever something it reports changes (training, ``osteo calibrate``,
    ``osteo eval --data``), from the run's own files.
    """
    run = RunDir(run_dir)
    sweep_temporaries(run.path, pattern=temporaries_of(run.model_card_path))  # a killed writer's, whoever it was
    recipe, env, audit = run.read_recipe(), run.read_env(), run.read_audit()
    metrics, calibration = run.read_metrics(), run.read_calibration()
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    ci = lambda m, k: (f"{fmt(m.get(k))} [{fmt(m[k + '_ci'][0])}, {fmt(m[k + '_ci'][1])}]"
                       if m.get(f"{k}_ci") else fmt(m.get(k)))
    lines = [
        f"# Model card: {recipe.model.backbone} ({run.name})", "",
        "## Intended use and limits", "",
        "Research on knee radiographs: sorting them into normal, osteopenia and osteoporosis, to compare",
        "models and study what they learn. **Not a medical device and not for diagnosis**: bone mineral",
        "density is measured by DXA; a radiograph classifier has not been validated for any clinical",
        "decision. Its numbers hold for images like its training data (same scanners, protocol,",
        "population); check them on your own images first (`osteo eval RUN --data FOLDER`).", "",
        "## Training data", "",
        f"- folder: `{_named(audit.get('data_dir', recipe.data.dir))}` (its path is in `recipe.json`); "
        f"{audit.get('n_files', '?')} files, "
        f"{audit.get('n_ok', '?')} readable, {len(audit.get('unreadable', []))} unreadable",
        "- classes: " + ", ".join(f"{c} {n}" for c, n in audit.get("classes", {}).items()),
        f"- duplicate groups: {len(audit.get('duplicate_groups', []))}; images excluded as filed under two "
        f"classes: {env.get('excluded_conflicts', 0)}",
        f"- split: {env.get('n_train', '?')} train / {env.get('n_val', '?')} validation / "
        f"{env.get('n_test', 0)} test (seed {recipe.train.seed}; "
        + (f"fold {recipe.data.fold + 1} of {recipe.data.folds} held out as test, "
           f"{recipe.data.inner_val:.0%} of the other folds validating)" if recipe.data.folds and recipe.data.inner_val
           else f"fold {recipe.data.fold + 1} of {recipe.data.folds} validating)" if recipe.data.folds else
           f"{recipe.data.val:.0%} validation, {recipe.data.test:.0%} test)"),
        _kept_whole(run), "",
        "## Recipe", "",
        f"`{recipe.name}`: {recipe.model.backbone} on the {recipe.model.impl} engine ({get_engine(recipe.model.impl).describes}), "
        f"weights {_named(recipe.model.weights)}{_weights_hash(env)}, {recipe.data.image_size} px, "
        f"preprocessing {recipe.model.preprocessing}, {recipe.train.epochs} + {recipe.train.fine_tune_epochs} "
        f"epochs (frozen + fine-tuned{_stopped_early(recipe, env)}), {recipe.train.optimizer} lr {recipe.train.lr:g} / "
        f"{recipe.train.fine_tune_lr:g}, batch {recipe.data.batch_size}, best checkpoint by {recipe.train.monitor}"
        f" (epoch {metrics.get('best_epoch', '?')}). The full recipe is `recipe.json`.", "",
        "## Results (95% stratified bootstrap intervals; duplicates and a patient's images drawn as one)", "",
        _headline_sentence(metrics, recipe), "",
        # the run's own probabilities (its calibration is the section below): ROC-AUC, log loss, Brier, ECE
        f"| split | chose | n | {' | '.join(x.label + (' (uncalibrated)' if x.of_probabilities else '') for x in METRICS)}"
        " | majority class (bal. acc.) |",
        f"| --- | --- | ---: | {' | '.join('---' if x.interval else '---:' for x in METRICS)} | --- |",
    ]

    def result(name: str, chose: str, m: dict) -> str:
        base = m.get("majority_baseline", {})
        return (f"| {name} | {chose} | {m.get('n')} | {' | '.join(ci(m, x.name) for x in METRICS)} | "
                f"{base.get('class', '-')} ({fmt(base.get('balanced_accuracy'))}) |")

    lines += [result(SPLIT_NAMES[name], CHOSE[name], metrics[name]) for name in ("test", "val") if metrics.get(name)]
    paths = sorted(run.eval_path.glob("*/metrics.json")) if run.eval_path.is_dir() else []
    externals = {path: RunDir(path.parent)._read(path) for path in paths}  # read once: rows and points
    for path, record in externals.items():
        lines.append(result(external_label(path.parent.name, record), CHOSE["external"], record.get("external", {})))
    lines += ["", "## Calibration and operating points", ""]
    if calibration:
        on_test = calibration.get("test")
        lines.append(f"Temperature {fmt(calibration.get('temperature'))}, fitted on validation. Expected calibration "
                     "error before and after scaling: "
                     + (f"on test (which chose nothing) {fmt(on_test['ece_before'])} -> {fmt(on_test['ece_after'])}; "
                        if on_test else "")
                     + f"on validation (which chose the temperature: optimistic) {fmt(calibration.get('ece_before'))} "
                     f"-> {fmt(calibration.get('ece_after'))}."
                     + (f" {calibration['error']}" if calibration.get("error") else ""))
        for point in calibration.get("operating_points", []):
            if point.get("error"):
                lines.append(f"- {point['name']} ({point['target']} {point['value']}): {point['error']}")
                continue
            lines.append(f"- {point['name']}: threshold {fmt(point['threshold'])}, chosen on validation for "
                         f"{point['target']} >= {point['value']}")
            measured, stale = [("test (chose nothing)", point.get("test"))], []
            for path, record in externals.items():
                fresh, old = external_points(record, calibration)
                label = external_label(path.parent.name, record).removeprefix("external: ")
                measured += [(f"{label} (external: chose nothing)", e) for e in fresh
                             if e.get("name") == point["name"]]
                stale += [f"  - on {path.parent.name}: measured at an earlier calibration (threshold "
                          f"{fmt(e.get('threshold'))}); run `osteo eval` on that folder again"
                          for e in old if e.get("name") == point["name"]]
            measured.append(("validation (chose this threshold: optimistic by construction)", point["val"]))
            lines += [f"  - on {where}: sensitivity {ci(m, 'sensitivity')}, specificity {ci(m, 'specificity')}"
                      for where, m in measured if m] + stale
        earlier = calibration.get("earlier_goals")
        if isinstance(earlier, list) and earlier:
            before = "; then ".join(", ".join(map(str, g)) if isinstance(g, list) else str(g) for g in earlier)
            lines.append(f"- Calibrated for other goals before these, oldest first ({before})" + (
                ": each `osteo calibrate` shows the test split's figures, so a goal chosen after an earlier one "
                "was chosen with test in view, and the test figures above are then optimistic too." if on_test
                else "."))
    else:
        lines.append("Not calibrated (`osteo calibrate RUN_DIR`).")
    record = run.export_path / RunDir.EXPORT_RECORD
    e = run._read(record) if record.is_file() else None
    if isinstance(e, dict):
        parity = e.get("parity") if isinstance(e.get("parity"), dict) else {}
        diff = parity.get("max_abs_diff")
        lines += ["", "## Export", "",
                  f"`{RunDir.EXPORT}/{e.get('file')}`: {e.get('format')} opset {e.get('opset')} ({e.get('exporter')}), "
                  f"from pixels in [0, 255] to the {'calibrated ' if e.get('calibrated') else ''}probabilities; "
                  f"max |difference| from `osteo predict` {f'{diff:.1e}' if isinstance(diff, float) else '-'} on "
                  f"{parity.get('images')} {parity.get('source')} images ({parity.get('runtime')}, no osteo, "
                  f"Keras or PyTorch loaded); `{RunDir.EXPORT}/predict.py` reads image files as osteo does."]
    saved = run.export_path / RunDir.SAVEDMODEL / RunDir.PORT_RECORD  # a SavedModel's record, either engine's
    p = run._read(saved) if saved.is_file() else None
    if isinstance(p, dict):
        parity = p.get("parity") if isinstance(p.get("parity"), dict) else {}
        diffs = [parity.get(k) for k in ("max_abs_diff", "max_abs_diff_uncalibrated")]
        shown = [f"{d:.1e}" if isinstance(d, float) else "-" for d in diffs]
        what = (f"a TensorFlow SavedModel of this timm run, its weights ported into {p.get('ported_to')}"
                if p.get("ported_to") else "a TensorFlow SavedModel")
        uncalibrated = (f", {shown[1]} uncalibrated (the Keras model it was written from)"
                        if "max_abs_diff_uncalibrated" in parity else "")
        lines += ([] if isinstance(e, dict) else ["", "## Export"]) + [
            "", f"`{RunDir.EXPORT}/{RunDir.SAVEDMODEL}/`: {what}; max |difference| from `osteo predict` {shown[0]} "
            f"calibrated (the SavedModel as loaded back){uncalibrated}, on {parity.get('images')} "
            f"{parity.get('source')} images ({parity.get('runtime')})."]
    kept = run.export_path / (RunDir.KERAS_EXPORT + RunDir.KERAS_RECORD_SUFFIX)  # a .keras export's record
    k = run._read(kept) if kept.is_file() else None
    if isinstance(k, dict):
        parity = k.get("parity") if isinstance(k.get("parity"), dict) else {}
        diff = parity.get("max_abs_diff")
        lines += ([] if isinstance(e, dict) or isinstance(p, dict) else ["", "## Export"]) + [
            "", f"`{RunDir.EXPORT}/{RunDir.KERAS_EXPORT}`: the whole Keras model with osteo's layers "
            f"({k.get('load')}), calibrated; max |difference| from `osteo predict` "
            f"{f'{diff:.1e}' if isinstance(diff, float) else '-'} as loaded back, on {parity.get('images')} "
            f"{parity.get('source')} images ({parity.get('runtime')})."]
    lines += ["", "## Environment", "",
              f"osteo {env.get('git_commit', '?')[:12]}, Keras {env.get('keras', '?')}, backend "
              f"{env.get('backend', '?')} on {env.get('device', {}).get('runs_on', '?')}, precision "
              f"{env.get('precision', '?')}; {_command(env.get('command', ''))}", ""]
    write_text(run.model_card_path, "\n".join(lines))
    return run.model_card_path


def _headline_sentence(metrics: dict, recipe) -> str:
    """Which split the headline numbers are on, and what it chose."""
    split = metrics.get("headline") or headline_split(metrics)
    where = provenance(SPLIT_NAMES[split], CHOSE[split])
    chosen = (f"the checkpoint (epoch {metrics.get('best_epoch', '?')}, best {metrics.get('monitor', recipe.train.monitor)}),"
              " the temperature and the operating points' thresholds were chosen on validation")
    if split == "test":
        return f"Headline: {where}; {chosen}."
    return (f"Headline: {where}. {chosen[0].upper()}{chosen[1:]}, and there is no test split: hold one out "
            "(`--set data.test=0.15`; make: `SET=data.test=0.15`) or cross-validate (`osteo train --folds 5`) for numbers that chose nothing.")
