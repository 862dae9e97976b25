"""The demo recipe learns: on a small phantom, clearly above the majority-class rate."""

import json

import pytest

from osteo.data.phantom import write_phantom
from osteo.recipe import load_recipe, set_total_epochs
from osteo.trainer import Trainer


@pytest.mark.heavy
def test_demo_recipe_learns_on_a_small_phantom(tmp_path):
    data = tmp_path / "phantom"
    write_phantom(data, n=480, size=64, seed=11)
    r = load_recipe("demo", backbone="vgg16")
    assert r.model.backbone == "vgg16" and r.model.weights == "none"
    r.data.dir, r.runs_dir, r.train.bootstrap = str(data), str(tmp_path / "runs"), 200
    set_total_epochs(r, 3)
    run = Trainer(r).run()
    m = json.loads((run / "metrics.json").read_text())["val"]
    base = m["majority_baseline"]
    assert base["balanced_accuracy"] == 1 / 3
    # clearly above always answering the majority class, and not by luck of one class
    assert m["balanced_accuracy"] >= base["balanced_accuracy"] + 0.15, m
    assert m["balanced_accuracy_ci"][0] > base["balanced_accuracy"], m
    assert min(pc["recall"] for pc in m["per_class"].values()) > 0.0


def test_the_default_phantom_is_written_on_first_use_where_the_recipe_names_it(tmp_path, monkeypatch):
    """`osteo train` without --data (make train, make demo) trains on data/phantom, written on first
    use; a resolved recipe names the folder as an absolute path, which ensure_phantom must still
    know as data/phantom of the working folder (it wrote nothing, and the run found no folder)."""
    from osteo.session import TrainOptions, build_recipe, ensure_phantom

    monkeypatch.chdir(tmp_path)
    said = []
    recipe = build_recipe("finetune", "tiny", TrainOptions(weights="none",
                                                           overrides=("data.phantom_n=12", "data.phantom_size=32")))
    assert recipe.data.dir == str(tmp_path / "data" / "phantom")
    ensure_phantom(recipe, said.append)
    assert sorted(p.name for p in (tmp_path / "data" / "phantom").iterdir() if p.is_dir()) == [
        "normal", "osteopenia", "osteoporosis"]
    assert len(list((tmp_path / "data" / "phantom").rglob("*.png"))) == 12 and len(said) == 1
    recipe.data.dir = str(tmp_path / "elsewhere" / "phantom")  # not data/ of the working folder: not osteo's to write
    ensure_phantom(recipe, said.append)
    assert not (tmp_path / "elsewhere").exists() and len(said) == 1
