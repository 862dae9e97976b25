"""The report renders from two small runs made here, escapes hostile names, and loads in a browser."""

import csv
import html
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from osteo import CLASSES
from osteo.cli import main
from osteo.data.phantom import make_image
from osteo.report import write_report
from osteo.report.tables import COMPARISON_COLUMNS
from osteo.trainer import Trainer

HOSTILE = "<img src=x onerror=alert(1)> \"q'\u00e9 ü"


@pytest.fixture(scope="module")
def hostile_data(tmp_path_factory):
    """A small phantom in which file names carry markup, quotes, spaces and non-ASCII.

    One of them is unreadable: the page names files only in the audit's lists.
    """
    root = tmp_path_factory.mktemp("hostile")
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(16):
            img = (make_image(c, size=48, seed=9, index=i) * 255).astype(np.uint8)
            name = f"{HOSTILE} {i}.png" if (c == "normal" and i < 8) else f"{c}_{i}.png"
            Image.fromarray(img).save(root / c / name)
    (root / "normal" / f"{HOSTILE} broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def two_runs(hostile_data, tmp_path_factory, tiny_recipe):
    runs = tmp_path_factory.mktemp("runs")
    return [Trainer(tiny_recipe(hostile_data, runs, epochs=epochs, bootstrap=200)).run() for epochs in (2, 1)]


def test_report_files_and_contents(two_runs, tmp_path):
    page = write_report(two_runs, tmp_path / "rep", n_boot=200)
    with open(tmp_path / "rep" / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and set(COMPARISON_COLUMNS) <= set(rows[0])
    assert {r["engine"] for r in rows} == {"keras"}  # which backbone implementation each row trained
    assert not any(r["model"] == "oracle" for r in rows)  # no latents.csv here: no ceiling to show
    for r in rows:
        assert float(r["accuracy_lo"]) <= float(r["accuracy"]) <= float(r["accuracy_hi"])
        assert 0 <= float(r["majority_balanced_accuracy"]) <= 1
    # same split: the second run is paired with the best one
    assert sum(r["mcnemar_vs"] == "(best)" for r in rows) == 1
    assert any(r["mcnemar_p"] not in ("", None) for r in rows)
    with open(tmp_path / "rep" / "per_class.csv", newline="") as f:
        long = list(csv.DictReader(f))
    assert {r["class"] for r in long} == set(CLASSES) and {"recall", "specificity"} <= {r["metric"] for r in long}
    plots = {p.name for p in (tmp_path / "rep" / "plots").glob("*.png")}
    assert plots == {"curves.png", "confusion.png", "roc.png", "reliability.png", "samples.png", "metrics.png",
                     "gradcam.png"}
    text = page.read_text(encoding="utf-8")
    assert "<table>" in text and text.count("data:image/png;base64,") == 7
    assert "http://" not in text and "https://" not in text  # self-contained


def test_hostile_names_survive_audit_training_and_report(two_runs, hostile_data, tmp_path):
    # training saw them: they are in the predictions and the split
    for name in ("predictions.csv", "split.csv"):
        with open(two_runs[0] / name, newline="", encoding="utf-8") as f:
            paths = {r["path"] for r in csv.DictReader(f)}
        assert any(HOSTILE in p for p in paths), name
    page = write_report(two_runs, tmp_path / "rep", n_boot=50).read_text(encoding="utf-8")
    assert "<img src=x" not in page and "onerror=alert(1)>" not in page  # no markup injected
    # the audit's list of unreadable files shows the name, escaped
    assert f"<li>{html.escape(f'normal/{HOSTILE} broken.png')}: " in page


def test_report_command_and_bad_run_dir(two_runs, tmp_path, capsys, monkeypatch):
    runs_dir = two_runs[0].parent.parent
    monkeypatch.delenv("COLUMNS", raising=False)  # a log or a pipe, as in CI: rich took 80 columns and wrapped numbers
    assert main(["report", "--runs", str(runs_dir), "--out", str(tmp_path / "r"), "--bootstrap", "50"]) == 0
    said = capsys.readouterr()
    assert "index.html" in said.out
    with open(tmp_path / "r" / "comparison.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1  # the latest run of each model
    # and the other run, left out, is said to be
    assert "left out 1 older finished run(s) of the same models" in said.err and "--all" in said.err
    assert main(["report", "--all", "--runs", str(runs_dir), "--out", str(tmp_path / "r2"), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out  # two runs of one model: each row says which
    assert all(f"tiny {run.name}" in printed for run in two_runs), printed
    with open(tmp_path / "r2" / "comparison.csv", newline="") as f:
        cells = [f"{float(r[k]):.3f}" for r in csv.DictReader(f) for k in ("balanced_accuracy", "accuracy", "macro_f1")]
    table = printed[printed.index("┏"):printed.index("┘") + 1]  # after the verdict
    # each number whole and the table whole, its right border on every line (at 80 columns the McNemar
    # column was cut off, and with more rows numbers wrapped mid-digit)
    assert all(c in table for c in cells) and all(line[-1] in "┓┃┩│┘" for line in table.splitlines()), table
    # their one data folder, audited alike: its audit once, naming both runs (it was once per run)
    page = (tmp_path / "r2" / "index.html").read_text(encoding="utf-8")
    names = ", ".join(sorted(f"tiny {run.name}" for run in two_runs))
    assert page.count("<h3>data: ") == 1 and f"(the data of {names})</h3>" in page
    # one run given twice (and once more through another path): one row, not a model compared with itself
    # (the verdict's McNemar found no best and ended in a traceback)
    one, again = str(two_runs[0]), os.path.relpath(two_runs[0])
    capsys.readouterr()
    assert main(["report", one, one + "/", again, "--out", str(tmp_path / "r5"), "--bootstrap", "50"]) == 0
    with open(tmp_path / "r5" / "comparison.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert capsys.readouterr().err.count("given before: reported once") == 2
    (tmp_path / "notarun").mkdir()
    assert main(["report", str(tmp_path / "notarun"), "--out", str(tmp_path / "r3")]) == 2
    assert "not an osteo run directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "notarun")]) == 2
    # a run of validation only, asked for its test split: the fix is the split it has
    assert main(["report", str(two_runs[0]), "--split", "test", "--out", str(tmp_path / "r4")]) == 2
    err = capsys.readouterr().err
    assert f"run {two_runs[0]} has no test predictions (test split); report it with --split val" in err
    assert err.strip().splitlines()[-1].endswith("could be reported; each warning above says why, and what to do")
    assert main(["eval", str(two_runs[0]), "--bootstrap", "100"]) == 0
    assert "balanced accuracy" in capsys.readouterr().out


def test_eval_without_resamples_keeps_the_intervals_of_the_same_predictions(two_runs, tmp_path):
    """``osteo eval RUN --bootstrap 0`` recomputes the point estimates; the intervals already in
    metrics.json were drawn from the same predictions, so they stay. Other predictions: gone."""
    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    assert main(["eval", str(run), "--bootstrap", "60"]) == 0
    drawn = json.loads((run / "metrics.json").read_text())
    split = drawn["headline"]
    assert drawn[split]["ci"]["resamples"] == 60 and "balanced_accuracy_ci" in drawn[split]
    assert main(["eval", str(run), "--bootstrap", "0"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == drawn
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = next(r for r in rows if r["split"] == split)
    first["p_normal"], first["p_osteoporosis"] = first["p_osteoporosis"], first["p_normal"]
    with open(run / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert main(["eval", str(run), "--bootstrap", "0"]) == 0
    now = json.loads((run / "metrics.json").read_text())
    assert "ci" not in now[split] and "balanced_accuracy_ci" not in now[split]
    assert not any(k.endswith("_ci") for row in now[split]["per_class"].values() for k in row)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no Chromium installed")
def test_page_loads_in_headless_chromium(two_runs, tmp_path):
    page = write_report(two_runs, tmp_path / "rep", n_boot=50)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    # its profile and caches in tmp_path, not the user's ~/.config and ~/.cache
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--no-first-run", "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}"]
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert dom.returncode == 0, dom.stderr[-1000:]
    assert "<table>" in dom.stdout and "balanced accuracy" in dom.stdout
    shot = tmp_path / "shot.png"
    drawn = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1400,2000", page.as_uri()],
                           capture_output=True, text=True, timeout=120, env=env)
    assert drawn.returncode == 0, drawn.stderr[-1000:]
    assert shot.exists() and Image.open(shot).size == (1400, 2000)
    assert np.asarray(Image.open(shot).convert("L")).std() > 10  # not a blank page


def test_the_gradcam_grid_draws_real_maps(two_runs):
    """The grid's panels are Grad-CAM maps of the run's own model, not its fallback note."""
    from osteo.report.load import load_run
    from osteo.report.plots import _gradcam_sample

    run = load_run(two_runs[0], n_boot=0)
    sample, images, maps, picked, target = _gradcam_sample(run, 3)
    assert target.layer == target.last == "tiny_block2_relu"  # 8x8 at 32 px: the last stage itself
    assert sample is run and 1 <= len(picked) <= 6 and images.shape[0] == maps.shape[0] == len(picked)
    assert maps.shape[1:] == (32, 32) and maps.min() >= 0 and maps.max() == 1.0


def test_a_last_stage_below_7x7_is_said_and_a_finer_layer_drawn(two_runs, hostile_data, tmp_path, tiny_recipe):
    """At 16 px the tiny backbone's last stage is 4x4: one blur per quarter of the knee. The page
    says so and draws the deepest layer with 7x7 cells; at 32 px the last stage has 8x8."""
    r = tiny_recipe(hostile_data, tmp_path / "runs", epochs=1, bootstrap=0)
    r.data.image_size = 16
    small = Trainer(r).run()
    page = write_report([small, two_runs[0]], tmp_path / "rep", n_boot=0).read_text(encoding="utf-8")
    notes = page[page.index("Where the models look"):]
    # validation chose these runs' checkpoints: every plot's name says optimistic
    assert (f"<li>tiny ({small.name}, validation), optimistic: the last stage (tiny_block2_relu) is 4x4 at 16 px, too coarse to show where "
            "the model looked; heat on tiny_block1_relu (8x8 cells), the deepest layer with at least 7x7</li>") in notes
    assert f"<li>tiny ({two_runs[0].name}, validation), optimistic: heat on tiny_block2_relu, the last stage (8x8 cells at 32 px)</li>" in notes


def test_every_curve_names_the_images_it_is_on(two_runs, tmp_path, monkeypatch):
    """Two models, one on its validation split (which chose its checkpoint and temperature) and
    one on its test split: each curve's legend says which, and the bars' labels too."""
    import dataclasses

    from osteo.report import plots
    from osteo.report.load import load_runs

    (first, second), _ = load_runs(two_runs, n_boot=0)  # these small runs have no test split: one is said to
    test_run = dataclasses.replace(first, evaluated_on="test", chose="nothing")
    val_run = dataclasses.replace(second, recipe={**second.recipe, "model": {**second.recipe["model"],
                                                                            "backbone": "vgg16"}})
    runs = [test_run, val_run]
    assert [r.model for r in runs] == ["tiny", "vgg16"] and [r.evaluated_on for r in runs] == ["test", "validation"]
    said = {}

    def keep(fig, path):
        said[path.name] = [t.get_text() for ax in fig.axes for t in (*ax.get_xticklabels(), *(
            ax.get_legend().get_texts() if ax.get_legend() else []))]
        return path

    monkeypatch.setattr(plots, "_save", keep)
    colours = plots.run_colours(runs)
    plots.plot_reliability(runs, colours, tmp_path)
    plots.plot_roc(runs, colours, tmp_path)
    plots.plot_bars(runs, colours, tmp_path)
    for name in ("reliability.png", "roc.png", "metrics.png"):
        texts = said[name]
        assert any(t.startswith("tiny (test)") for t in texts), (name, texts)
        assert any(t.startswith("vgg16 (validation)") for t in texts), (name, texts)
        assert not any(t.startswith(("tiny ", "vgg16 ")) and "(" not in t for t in texts), (name, texts)
        # validation chose vgg16's checkpoint and temperature: its name says optimistic, the test run's not
        assert all(("optimistic" in t) == t.startswith("vgg16") for t in texts if t.startswith(("tiny", "vgg16")))


def test_the_bars_draw_each_ceiling_over_its_own_runs_and_the_legend_over_no_bar(two_runs, tmp_path, monkeypatch):
    """The oracle's ceiling is of one split's images: it is drawn over the runs scored on that split
    only, never across an external folder's bar; the legend lies outside every plot."""
    import dataclasses

    import matplotlib.collections

    from osteo.report import plots
    from osteo.report.load import load_runs

    (first, second), _ = load_runs(two_runs, n_boot=0)
    external = dataclasses.replace(second, path=second.path / "eval" / "other", evaluated_on="external other")
    ceiling = {k: 0.9 for k in first.metrics if not k.endswith("_ci")}
    oracle = dataclasses.replace(first, path=first.path / "oracle", metrics=ceiling,
                                 recipe={"model": {"backbone": "oracle"}, "data": first.recipe["data"]})
    runs = [first, external]
    assert oracle.is_oracle and (oracle.data_dir, oracle.split_id) == (first.data_dir, first.split_id)
    drawn = {}

    def keep(fig, path):
        fig.canvas.draw()
        drawn["fig"] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_bars(runs, plots.run_colours(runs), tmp_path, [oracle])
    fig = drawn["fig"]
    for ax in fig.axes:
        green = [c for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)
                 and c.get_color()[0][1] > 0.4 and c.get_color()[0][0] < 0.1]  # the oracle's green
        assert len(green) == 1
        (segment,) = green[0].get_segments()  # over the first bar (x = 0) only, at the oracle's value
        assert np.allclose(segment[:, 0], [-0.4, 0.4]) and np.allclose(segment[:, 1], 0.9)
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert {t.get_text() for t in legend.get_texts()} == {
        "majority class, on each run's images", "oracle (the phantom's true latents), on each run's images"}
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)


def test_the_verdict_quotes_the_oracle_of_its_own_images(two_runs):
    """Two folders whose files have the same names share a split_id: each paragraph quoted the first
    folder's oracle, not that of the images it is about (upgrade probe: 0.889 for 0.944)."""
    import dataclasses

    from osteo.report.load import load_runs
    from osteo.report.tables import comparison_rows
    from osteo.report.verdict import verdict

    (first, second), _ = load_runs(two_runs, n_boot=0)
    other = dataclasses.replace(second, images_id=f"{second.images_id}-elsewhere")  # another folder's images

    def oracle(run, value):
        return dataclasses.replace(run, path=run.path / "oracle", recipe={"model": {"backbone": "oracle"},
                                                                          "data": run.recipe["data"]},
                                   metrics={**run.metrics, "balanced_accuracy": value})

    assert other.split_id == first.split_id
    said = verdict(comparison_rows([first, other], [oracle(first, 0.123), oracle(other, 0.789)], 0, 0))
    ceilings = [p.split("scores ")[-1] for p in said if "oracle" in p]
    assert ceilings == ["0.123: the ceiling.", "0.789: the ceiling."], said  # and a closing line on the two sets
