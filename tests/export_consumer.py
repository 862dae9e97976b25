"""What the export tests of both engines share: image files of each kind osteo reads, and an
export's ``predict.py`` run as its consumer runs it (no osteo, Keras, TensorFlow or PyTorch)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from osteo import CLASSES
from osteo.export import isolated

P = [f"p_{c}" for c in CLASSES]
TOLERANCE = 1e-4

# Runs the script as ``python predict.py ARGS`` would (``__file__`` is the script).
RUN_AS_MAIN = """
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_image_files(folder: Path) -> list[Path]:
    """An 8-bit gray PNG, a colour JPEG, a 16-bit PNG and a DICOM file (MONOCHROME1, windowed,
    with a modality LUT), none square, each shrunk by a box filter at 32 px."""
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, 90)[None, :] * np.linspace(0.2, 1, 70)[:, None]
    gray = np.clip(ramp * 255 + rng.normal(0, 12, ramp.shape), 0, 255).astype(np.uint8)
    Image.fromarray(gray).save(folder / "gray8.png")
    colour = np.stack([gray, np.roll(gray, 9, axis=1), 255 - gray], axis=-1)
    Image.fromarray(colour, "RGB").save(folder / "colour.jpg", quality=90)
    deep = np.clip(ramp.T * 65535 + rng.normal(0, 3000, ramp.T.shape), 0, 65535).astype(np.uint16)
    Image.fromarray(deep).save(folder / "gray16.png")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.WindowCenter, ds.WindowWidth = 100, 600
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(folder / "knee.dcm")
    return [folder / n for n in ("gray8.png", "colour.jpg", "gray16.png", "knee.dcm")]


def run_script(script: Path, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(isolated(RUN_AS_MAIN, script, *args), capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def probabilities(csv_text: str) -> dict[str, list[float]]:
    """{path: [p_normal, p_osteopenia, p_osteoporosis]} of a CSV with those columns."""
    return {r["path"]: [float(r[c]) for c in P] for r in csv.DictReader(io.StringIO(csv_text)) if r.get(P[0])}


def max_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    assert a.keys() == b.keys() and a
    return max(float(np.abs(np.subtract(a[k], b[k])).max()) for k in a)


# Run in a fresh interpreter: the export's outputs on the saved images, with no osteo.
CONSUMER = r"""
import json, sys
import numpy as np
kind, model, images, out = sys.argv[1:]
x = np.load(images)
u8, f32 = x["uint8"], x["float"]
if kind == "onnx":
    import onnxruntime as ort
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (i,), (o,) = s.get_inputs(), s.get_outputs()
    io = {"input": [i.name, i.type, [str(d) for d in i.shape]], "output": [o.name, [str(d) for d in o.shape]]}
    run = lambda a: s.run([o.name], {i.name: a})[0]
    got = {"uint8": run(u8.astype(np.float32)), "float": run(f32), "one": run(f32[:1])}
else:
    import tensorflow as tf
    m = tf.saved_model.load(model)
    io = {"signatures": sorted(m.signatures)}
    f, u = m.signatures["serving_default"], m.signatures["serve_uint8"]
    got = {"uint8": u(image=tf.constant(u8))["probabilities"].numpy(),
           "uint8_cast": f(image=tf.constant(u8.astype(np.float32)))["probabilities"].numpy(),
           "float": f(image=tf.constant(f32))["probabilities"].numpy()}
np.savez(out, **got)
print(json.dumps({"osteo_imported": any(n == "osteo" or n.startswith("osteo.") for n in sys.modules), **io}))
"""


def consume(kind: str, model: Path, images: dict, tmp_path: Path) -> tuple[dict, dict]:
    """``kind``'s (``onnx`` or ``savedmodel``) outputs on ``images`` (``uint8`` and ``float``), and what it
    declares, from :data:`CONSUMER` in an interpreter that never imports osteo."""
    np.savez(tmp_path / "images.npz", **images)
    out = tmp_path / "out.npz"
    # a consumer's own environment: not the PyTorch pass's KERAS_BACKEND (TensorFlow's loader imports
    # Keras, and PyTorch beside TensorFlow can crash)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", CONSUMER, kind, str(model), str(tmp_path / "images.npz"), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info.pop("osteo_imported") is False
    with np.load(out) as got:
        return info, dict(got)
