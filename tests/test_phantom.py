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
