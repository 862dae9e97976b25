import numpy as np
import pytest
from PIL import Image

from osteo import CLASSES
from osteo.data.phantom import class_counts, make_image, write_phantom
from osteo.errors import OsteoError


def test_class_counts_follow_proportions():
    assert class_counts(1947) == [780, 374, 793]
    assert sum(class_counts(100)) == 100
    assert class_counts(100, (1, 1, 2)) == [25, 25, 50]
    with pytest.raises(OsteoError, match="proportions"):
        class_counts(10, (1, 2))


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = make_image("osteopenia", size=64, seed=5, index=2)
    b = make_image("osteopenia", size=64, seed=5, index=2)
    c = make_image("osteopenia", size=64, seed=6, index=2)
    assert a.dtype == np.float32 and a.shape == (64, 64)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.01
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_write_phantom_is_deterministic(tmp_path):
    write_phantom(tmp_path / "a", n=9, size=48, seed=1)
    write_phantom(tmp_path / "b", n=9, size=48, seed=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 9
    assert {f.parts[0] for f in files} == set(CLASSES)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_sixteen_bit_keeps_range(tmp_path):
    write_phantom(tmp_path, n=3, size=48, seed=0, bit_depth=16)
    img = Image.open(next(tmp_path.rglob("*.png")))
    arr = np.asarray(img)
    assert img.mode.startswith("I") and arr.max() > 255
    assert len(np.unique(arr)) > 256  # more levels than 8 bits could hold


def _trabecular_statistic(img: np.ndarray) -> float:
    """Mean brightness of the bone relative to the soft tissue around it.

    Bone density in the phantom, as in a radiograph, shows as how much brighter bone
    is than tissue; the statistic is invariant to the exposure scaling per image.
    """
    centre = img[img.shape[0] // 4 : 3 * img.shape[0] // 4, :]
    hi, lo = np.percentile(centre, 90), np.percentile(centre, 40)
    return float(hi - lo)


def test_class_signal_orders_class_means():
    stats = {
        c: np.mean([_trabecular_statistic(make_image(c, size=96, seed=0, index=i)) for i in range(40)])
        for c in CLASSES
    }
    assert stats["normal"] > stats["osteopenia"] > stats["osteoporosis"]


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(OsteoError, match="bit depth"):
        write_phantom(tmp_path, n=3, bit_depth=12)
    with pytest.raises(OsteoError, match="too small"):
        write_phantom(tmp_path, n=3, size=8)


def test_sizes_and_counts_out_of_bounds_are_refused_before_any_work(tmp_path):
    with pytest.raises(OsteoError, match="image size 100000 is too large; use 16 to 2048 px"):
        write_phantom(tmp_path / "a", n=3, size=100_000)
    with pytest.raises(OsteoError, match="too large"):
        make_image("normal", size=100_000)
    with pytest.raises(OsteoError, match="at least 3"):
        write_phantom(tmp_path / "a", n=2, size=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [(["--size", "100000"], "too large"), (["--n", "2"], "at least 3"),
                                          (["--n", "-5"], "at least 3")])
def test_cli_refuses_bad_bounds_in_one_line(tmp_path, argv, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "osteo.cli", "data", "phantom", str(tmp_path / "ph"), *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "ph").exists()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_generation_stopped_half_way_leaves_nothing(tmp_path, monkeypatch, error):
    from osteo.data import phantom

    calls = []
    real = phantom.make_sample

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise error("stopped")
        return real(*args, **kw)

    monkeypatch.setattr(phantom, "make_sample", failing)
    with pytest.raises(error):
        write_phantom(tmp_path / "ph", n=9, size=16)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary


def test_an_existing_folder_is_only_used_when_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    assert write_phantom(tmp_path / "empty", n=3, size=16) == {c: 1 for c in CLASSES}
    assert len(list((tmp_path / "empty").rglob("*.png"))) == 3
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(OsteoError, match="exists and is not an empty folder"):
        write_phantom(tmp_path / "full", n=3, size=16)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OsteoError, match="not an empty folder"):
        write_phantom(tmp_path / "file", n=3, size=16)


def test_temporaries_of_a_killed_run_are_swept(tmp_path):
    """A later process's run for the same folder removes the staging folders of killed runs, and
    keeps those of runs in progress (here: this test's process, which began before them), and
    another host's on a shared folder; names from before the host was in them count the same."""
    import os
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    from osteo.files import host_tag, owned_prefix

    stale = tmp_path / f".ph.{dead}@{host_tag()}-abc123.tmp"
    (stale / "normal").mkdir(parents=True)
    (stale / "normal" / "normal_0000.png").write_bytes(b"")
    live = tmp_path / f"{owned_prefix('.ph.')}def456.tmp"
    elsewhere = tmp_path / f".ph.{dead}@another_host-0a1b2c.tmp"  # another host's, on a shared folder
    before = tmp_path / f".ph.tmp-{dead}-fe9876"  # named as before the host was in the name
    before_live = tmp_path / f".ph.tmp-{os.getpid()}-ab1234"
    touched = time.time() - 2  # after this process began, before the one that sweeps
    for p in (stale, live, elsewhere, before, before_live):
        p.mkdir(exist_ok=True)
        os.utime(p, (touched, touched))
    subprocess.run([sys.executable, "-c", "import sys; from osteo.data.phantom import write_phantom; "
                    "write_phantom(sys.argv[1], n=3, size=16)", str(tmp_path / "ph")], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ph", live.name, elsewhere.name, before_live.name])


def test_latents_are_written_and_overlap_only_moves_the_class_signal(tmp_path):
    import csv

    from osteo.data.phantom import LATENTS_FILE, make_sample

    write_phantom(tmp_path / "ph", n=9, size=32, seed=4)
    with open(tmp_path / "ph" / LATENTS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(
        str(p.relative_to(tmp_path / "ph")) for p in (tmp_path / "ph").glob("*/*.png"))
    assert {"mineral_density", "trabecular_fraction", "cortical_thickness", "exposure", "noise_sd"} <= set(rows[0])
    a_img, a, a_mask = make_sample("osteopenia", size=32, seed=4, index=1, overlap=1.0)
    b_img, b, b_mask = make_sample("osteopenia", size=32, seed=4, index=1, overlap=3.0)
    signal = ("mineral_density", "trabecular_fraction", "cortical_thickness")
    assert any(a[k] != b[k] for k in signal)
    assert all(a[k] == b[k] for k in a if k not in signal)  # the nuisance is the same knee's
    assert a_mask.dtype == bool and 0.1 < a_mask.mean() < 0.7
    assert (a_mask == b_mask).all() and np.abs(a_img - b_img).max() > 0.01  # same knee, other bone
    with pytest.raises(OsteoError, match="overlap"):
        make_sample("normal", size=32, overlap=0)
