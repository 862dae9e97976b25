"""``osteo predict`` converts colour to gray exactly as training did: one conversion, one resize."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osteo import CLASSES
from osteo.cli import main
from osteo.runs import RunDir
from osteo.trainer import Trainer

P = [f"p_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def colour_dir(tmp_path_factory):
    """60 phantom knees of 64 px as colour images, half PNG, half JPEG (tinted: the channels
    differ, so the gray conversion matters)."""
    from osteo.data.phantom import write_phantom

    src = tmp_path_factory.mktemp("gray") / "ph"
    write_phantom(src, n=60, size=64, seed=5)
    out = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for i, f in enumerate(sorted(src.rglob("*.png"))):
        g = np.asarray(Image.open(f), dtype=np.float32)
        rgb = np.stack([g, 0.7 * g + rng.uniform(0, 60, g.shape), 255 - 0.8 * g], axis=-1)
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        (out / f.parent.name).mkdir(exist_ok=True)
        img.save(out / f.parent.name / f"{f.stem}.{'png' if i % 2 else 'jpg'}", quality=90)
    return out


def test_predict_reproduces_validation_probabilities_of_colour_png_and_jpeg(colour_dir, tmp_path, tiny_recipe):
    run = RunDir(Trainer(tiny_recipe(colour_dir, tmp_path / "runs", epochs=1, bootstrap=20)).run())
    with open(run.predictions_path, newline="", encoding="utf-8") as f:
        val = {r["path"]: r for r in csv.DictReader(f) if r["split"] == "val"}
    assert {Path(p).suffix for p in val} == {".png", ".jpg"}
    out = tmp_path / "raw.csv"
    assert main(["predict", str(run), *(str(colour_dir / p) for p in val), "--out", str(out), "--no-calibration"]) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(val) and all(r["status"] == "ok" for r in rows)
    got = np.array([[float(r[c]) for c in P] for r in rows])
    want = np.array([[float(val[str(Path(r["path"]).relative_to(colour_dir))][c]) for c in P] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-4)
