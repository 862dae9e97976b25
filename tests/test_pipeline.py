from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from osteo.data.decode import Gray, ImageInfo, decode_gray
from osteo.data.pipeline import (
    SCALE,
    Entry,
    ImageCache,
    box_factor,
    jpeg_ratio,
    load_levels,
    resize_gray,
)
from osteo.data.scan import audit
from osteo.data.tfdata import make_dataset


def _entries(root):
    return [
        (Entry.from_row(root, r), r.label)
        for r in audit(root).ok()
    ]


def _gray(px: np.ndarray) -> Gray:
    return Gray(px, ImageInfo("png", px.shape[1], px.shape[0], 8), "u8" if px.dtype == np.uint8 else "float")


def test_box_filter_antialiases_like_area_resampling():
    # a one-pixel checkerboard must average to grey, not alias into stripes
    board = ((np.arange(64)[:, None] + np.arange(64)[None, :]) % 2 * 255).astype(np.uint8)
    np.testing.assert_allclose(resize_gray(_gray(board), size=24, resize="stretch"), 127.5, atol=1.0)
    assert box_factor(512, 400, 224, "pad") == 2 and box_factor(512, 400, 224, "stretch") == 1


def test_jpeg_ratio_never_undershoots_the_target():
    assert jpeg_ratio(2500, 2000, 224, "pad") == 8
    assert jpeg_ratio(2500, 2000, 224, "stretch") == 8
    assert jpeg_ratio(800, 600, 224, "stretch") == 2
    assert jpeg_ratio(300, 300, 224, "pad") == 1
    # no coarser than the audit's scale (128 px across), so the audit's decode serves the cache
    assert jpeg_ratio(800, 600, 32, "pad") == 4


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_resize_is_tf_image_resize_arithmetic(mode):
    """Bilinear with half-pixel centres after the box filter, as tf.image.resize(_with_pad) computes it."""
    img = np.random.default_rng(0).uniform(0, 255, (150, 240)).astype(np.float32)
    ours = resize_gray(_gray(img), size=32, resize=mode)
    box = box_factor(240, 150, 32, mode)
    small = tf.reduce_mean(tf.reshape(img[: 150 // box * box, : 240 // box * box, None],
                                      (150 // box, box, 240 // box, box, 1)), axis=[1, 3])
    ref = (tf.image.resize_with_pad(small, 32, 32) if mode == "pad" else tf.image.resize(small, (32, 32))).numpy()
    assert ours.shape == (32, 32) and box == (7 if mode == "pad" else 4)
    np.testing.assert_allclose(ours, ref[..., 0], atol=1e-3)
    if mode == "pad":  # aspect kept: black bars top and bottom
        assert ours[0].max() == 0.0 and ours[16].max() > 0


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_is_decoded_once_at_the_cache_scale(mode, tmp_path):
    """The audit's decode (128 px across) serves a 32 px cache: the entry equals load_levels'."""
    from osteo.data import scan

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (600, 800), dtype=np.uint8)).convert(mode)
    (tmp_path / "normal").mkdir()
    img.save(tmp_path / "normal" / "a.jpg", quality=90)
    data = (tmp_path / "normal" / "a.jpg").read_bytes()
    assert decode_gray(data, scan.audit_scale).scale == 4 == jpeg_ratio(800, 600, 32)
    cache = ImageCache(32)
    (rec,) = audit(tmp_path, cache=cache).ok()
    np.testing.assert_array_equal(np.round(cache.load(rec.sha256) * SCALE), load_levels(data, 32)[0])


def test_cache_fill_matches_reference_decode_and_is_reused(phantom_dir):
    entries = _entries(phantom_dir)
    cache = ImageCache(size=32)
    assert cache.fill([e for e, _ in entries]) == []
    assert cache.missing([e for e, _ in entries]) == []
    e = entries[0][0]
    cached = cache.load(e.sha256)
    ref = resize_gray(decode_gray(Path(e.path).read_bytes()), 32)
    np.testing.assert_allclose(cached[..., 0], ref, atol=0.5 / SCALE)
    before = cache.path(e.sha256).stat().st_mtime_ns
    cache.fill([e])  # nothing to do
    assert cache.path(e.sha256).stat().st_mtime_ns == before


def test_other_formats_go_through_the_python_decoder(tmp_path):
    root = tmp_path / "d"
    (root / "normal").mkdir(parents=True)
    img = (np.linspace(0, 65535, 40 * 60).reshape(40, 60)).astype(np.uint16)
    Image.fromarray(img).save(root / "normal" / "a.tif")
    Image.fromarray((img // 257).astype(np.uint8)).convert("CMYK").save(root / "normal" / "b.jpg")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    entries = [e for e, _ in _entries(root)]
    assert {e.format for e in entries} == {"tiff", "jpeg"}
    cache = ImageCache(size=16, resize="stretch")
    assert cache.fill(entries) == []
    # a file that breaks after the audit is reported, not fatal
    ghost = Entry(str(root / "normal" / "broken.png"), "0" * 64, "png", 10, 10, 1)
    assert cache.fill([ghost]) == [ghost]


def test_dataset_shapes_ranges_and_order(phantom_dir):
    entries = _entries(phantom_dir)
    cache = ImageCache(size=32)
    cache.fill([e for e, _ in entries])
    files = [str(cache.path(e.sha256)) for e, _ in entries]
    labels = list(range(len(files)))  # label = position: shows the order
    val = make_dataset(files, labels, size=32, batch_size=16, training=False)
    batches = list(val)
    x, y = batches[0]
    assert x.dtype == tf.float32 and x.shape == (16, 32, 32, 1) and y.dtype == tf.int32
    got = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_array_equal(got, labels)  # evaluation keeps the given order
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 255.0
    assert float(tf.reduce_max(x)) > 100  # [0, 255], not [0, 1]


def test_training_epochs_are_shuffled_reproducibly_and_resumable(phantom_dir):
    entries = _entries(phantom_dir)
    cache = ImageCache(size=32)
    cache.fill([e for e, _ in entries])
    files = [str(cache.path(e.sha256)) for e, _ in entries]
    n, bs = len(files), 32
    steps = -(-n // bs)

    def epochs(start, count):
        ds = make_dataset(files, list(range(n)), size=32, batch_size=bs, training=True, seed=4, start_epoch=start)
        it = iter(ds)
        return [np.concatenate([next(it)[1].numpy() for _ in range(steps)]) for _ in range(count)]

    e0, e1, e2 = epochs(0, 3)
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))  # each epoch: every image once
    assert list(e0) != list(range(n)) and list(e0) != list(e1)  # shuffled, differently each epoch
    np.testing.assert_array_equal(epochs(0, 1)[0], e0)  # same seed, same order
    np.testing.assert_array_equal(epochs(2, 1)[0], e2)  # resumed at epoch 2 = uninterrupted epoch 2


THIN_SHAPES = [(1, 1), (1, 5000), (5000, 1), (3, 2000), (2000, 3), (2, 17), (17, 2)]


@pytest.fixture(scope="module")
def thin_images(tmp_path_factory):
    """Every extreme shape as PNG and JPEG (the graph decoder) and TIFF and BMP (the Python one)."""
    root = tmp_path_factory.mktemp("thin") / "d"
    (root / "normal").mkdir(parents=True)
    for h, w in THIN_SHAPES:
        img = Image.fromarray(np.full((h, w), 200, np.uint8))
        for ext in ("png", "jpg", "tif", "bmp"):
            img.save(root / "normal" / f"{h}x{w}.{ext}")
    entries = [e for e, _ in _entries(root)]
    assert len(entries) == 4 * len(THIN_SHAPES)
    return entries


@pytest.mark.parametrize("mode", ["pad", "stretch"])
@pytest.mark.parametrize("size", [16, 32, 64, 224])
def test_extreme_aspect_ratios_never_leave_an_empty_side(thin_images, size, mode):
    cache = ImageCache(size=size, resize=mode)
    assert cache.fill(thin_images) == []
    for e in thin_images:
        out = cache.load(e.sha256)
        assert out.shape == (size, size, 1), e.path
        assert out.max() > 150, e.path  # the image is there, not only padding
        if mode == "stretch":
            assert out.min() > 150, e.path
        elif e.width != e.height:  # a band across the middle, padding on both sides of it
            across = out.max(axis=1 if e.width > e.height else 0)[:, 0]
            assert across[0] == 0 and across[-1] == 0, e.path


def test_a_cache_begun_beside_an_older_decodings_entries_names_them_once(tmp_path, caplog):
    from osteo.data.pipeline import CACHE_VERSION, ImageCache

    (tmp_path / "32-pad-v3" / "ab").mkdir(parents=True)  # an older osteo's entries, which nothing reads now
    (tmp_path / "32-pad-vx").mkdir()  # not a version: not named
    (tmp_path / "48-pad-v3").mkdir()  # another size's: said when that size's cache is begun
    with caplog.at_level("WARNING", logger="osteo"):
        ImageCache(32, root=tmp_path)
        ImageCache(32, root=tmp_path)  # an audit's and a pipeline's, before the first entry: said once
        ImageCache(32, root=tmp_path).dir.mkdir()
    assert [r.getMessage() for r in caplog.records] == [
        f"image cache: building {tmp_path / f'32-pad-{CACHE_VERSION}'} beside 32-pad-v3, an older osteo's image "
        f"decoding, which nothing reads any more; remove {tmp_path / '32-pad-v3'} to free its space"]


def test_every_change_of_image_decoding_says_which_images_it_touches():
    from osteo.data.pipeline import (
        CACHE_VERSION,
        DECODING_CHANGES,
        DECODING_TOUCHES,
        decoding_touches,
    )

    assert set(DECODING_TOUCHES) == set(DECODING_CHANGES) and max(DECODING_CHANGES, key=lambda v: int(v[1:])) == \
        CACHE_VERSION  # a new version says what it changed, and for which images
    jpeg = {"path": "normal/a.jpg", "format": "jpeg", "bit_depth": "8", "status": "ok"}
    assert decoding_touches("v3", [jpeg]) and not decoding_touches("v4", [jpeg])  # v4: EXIF; v5: not JPEGs
    assert decoding_touches("v4", [jpeg, {**jpeg, "format": "png"}])  # a 16-bit colour PNG was recorded as 8-bit
    assert decoding_touches("v4", [{**jpeg, "path": "normal/@eaDir/a.jpg"}, jpeg])
    assert not decoding_touches("v4", [{**jpeg, "format": "dicom", "status": "unreadable"}, jpeg])
    assert decoding_touches("v4", [])  # no manifest: unknown
