import io

import numpy as np
import pytest
from PIL import Image

from osteo.data.decode import DecodeError, decode_bytes, decode_cost, decode_file, sniff_format

pydicom_data = pytest.importorskip("pydicom.data")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


GRAY = (np.arange(48 * 40).reshape(40, 48) % 251).astype(np.uint8)


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "BMP"), ("RGB", "BMP"),
     ("L", "TIFF"), ("RGB", "TIFF"), ("CMYK", "TIFF"), ("L", "JPEG"), ("RGB", "JPEG"), ("CMYK", "JPEG")],
)
def test_every_colour_mode_becomes_one_gray_channel(mode, fmt):
    img = Image.fromarray(GRAY).convert(mode)
    arr, info = decode_bytes(_encode(img, fmt))
    assert arr.shape == (40, 48, 1) and arr.dtype == np.float32
    assert (info.width, info.height) == (48, 40)
    assert info.format == {"PNG": "png", "BMP": "bmp", "TIFF": "tiff", "JPEG": "jpeg"}[fmt]
    assert arr.min() >= 0 and arr.max() <= 255
    if fmt != "JPEG" and mode != "P":  # lossless: the gray values come back
        np.testing.assert_allclose(arr[..., 0], GRAY, atol=1.0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_keeps_its_dynamic_range(fmt):
    raw = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    arr, info = decode_bytes(_encode(Image.fromarray(raw), fmt))
    assert info.bit_depth == 16
    np.testing.assert_allclose(arr[..., 0], raw / 257.0, rtol=1e-6)
    assert len(np.unique(arr)) > 256


@pytest.mark.parametrize(("low", "high", "dtype", "fmt"), [
    (0, 4080, np.uint16, "PNG"),  # 12-bit data in a 16-bit file: at 1/257 it was 0-16 of 255, near black
    (1000, 1200, np.uint16, "TIFF"),  # a narrow window
    (-5000, 1_000_000, np.int32, "TIFF"),  # 32-bit integers: clipped at 65535 and 0 before
])
def test_more_than_eight_bits_are_stretched_from_the_images_minimum_to_its_maximum(low, high, dtype, fmt):
    raw = np.linspace(low, high, 64 * 64).reshape(64, 64).astype(dtype)
    arr, info = decode_bytes(_encode(Image.fromarray(raw), fmt))
    assert info.bit_depth == (16 if dtype == np.uint16 else 32)
    want = (raw.astype(np.float64) - raw.min()) / (raw.max() - raw.min()) * 255
    np.testing.assert_allclose(arr[..., 0], want, atol=1e-3)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_an_exif_orientation_is_applied_as_a_viewer_shows_the_image(orientation):
    upright = np.tile(np.linspace(0, 255, 48), (32, 1)).astype(np.uint8)  # 32 x 48, dark to bright
    upright[:8] = 255  # and a bright top
    stored = {3: np.rot90(upright, 2), 6: np.rot90(upright, 1), 8: np.rot90(upright, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation  # what the viewer turns the stored pixels by
    arr, info = decode_bytes(_encode(Image.fromarray(np.ascontiguousarray(stored)), "PNG", exif=exif))
    assert (info.width, info.height) == (48, 32)
    np.testing.assert_allclose(arr[..., 0], upright, atol=1.0)


def test_the_content_decides_the_format_not_the_name(tmp_path):
    path = tmp_path / "actually_a_jpeg.png"
    path.write_bytes(_encode(Image.fromarray(GRAY), "JPEG"))
    _, info = decode_file(path)
    assert info.format == "jpeg"
    assert sniff_format(b"hello world") is None


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty"), (b"not an image at all", "signature"),
     (_encode(Image.fromarray(GRAY), "PNG")[:-40], "decode failed")],
)
def test_unreadable_bytes_raise_decode_error_with_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_bytes(data)


def _dicom(name):
    return pydicom_data.get_testdata_file(name, download=False)


@pytest.mark.parametrize("name,shape", [("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64))])
def test_real_dicom_files_decode(name, shape):
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    arr, info = decode_file(_dicom(name))
    assert info.format == "dicom" and info.bit_depth == 16
    assert arr.shape == (*shape, 1)
    assert arr.min() == 0 and arr.max() == 255
    # the result is a stretch of the modality-LUT values, windowed where the file says so
    ds = pydicom.dcmread(_dicom(name))
    hu = apply_modality_lut(ds.pixel_array, ds)
    if "WindowCenter" in ds:
        hu = apply_voi_lut(hu, ds)
    hu = hu.astype(np.float64)
    expected = (hu - hu.min()) / (hu.max() - hu.min()) * 255
    np.testing.assert_allclose(arr[..., 0], expected, atol=1e-3)


def test_compressed_and_multiframe_dicom():
    arr, info = decode_file(_dicom("MR_small_RLE.dcm"))
    ref, _ = decode_file(_dicom("MR_small.dcm"))
    np.testing.assert_allclose(arr, ref, atol=1e-3)  # RLE is lossless
    arr, info = decode_file(_dicom("JPEG2000.dcm"))
    assert arr.shape[-1] == 1 and info.format == "dicom"
    arr, info = decode_file(_dicom("SC_rgb_rle_2frame.dcm"))
    assert info.frames == 2 and arr.shape == (100, 100, 1)


def test_monochrome1_is_inverted(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_dicom("MR_small.dcm"))
    normal, _ = decode_file(_dicom("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    inverted, _ = decode_file(path)
    np.testing.assert_allclose(inverted, 255 - normal, atol=1e-3)


def test_window_centre_width_is_applied(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 80  # a narrow soft-tissue window saturates bone
    path = tmp_path / "windowed.dcm"
    ds.save_as(path)
    windowed, _ = decode_file(path)
    plain, _ = decode_file(_dicom("CT_small.dcm"))
    assert (windowed == 255).mean() > 5 * max((plain == 255).mean(), 1e-4)


@pytest.mark.parametrize("implicit", [True, False])
def test_a_dicom_data_set_without_preamble_decodes_as_the_file_with_one(tmp_path, implicit):
    """ACR-NEMA files and some old exports are the data set alone: no 128-byte preamble, no
    "DICM", no file meta (so no transfer syntax either)."""
    import pydicom

    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    bare = pydicom.Dataset()
    bare.update(ds)
    path = tmp_path / "IM0001"
    bare.save_as(path, implicit_vr=implicit, little_endian=True)
    data = path.read_bytes()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    arr, info = decode_file(path)
    want, _ = decode_file(_dicom("CT_small.dcm"))
    assert info.format == "dicom" and info.patient_id == str(ds.PatientID)
    np.testing.assert_array_equal(arr, want)
    with open(path, "rb") as f:
        assert decode_cost(f)[:2] == (128, 128)


@pytest.mark.parametrize("head", [b"\x08\x00\x05\x00\x0b\x00\x00\x00odd length", b"\x08\x01\x05\x00CS\x0a\x00",
                                  b"\x10\x00\x10\x00PN\x04\x00", b"\x08\x00\x00\x01UL\x04\x00", b"\x08\x00",
                                  b"GIF89a\x08\x00\x05\x00"])
def test_other_bytes_are_not_taken_for_a_dicom_without_preamble(head):
    with pytest.raises(DecodeError, match="unknown file signature"):
        decode_bytes(head + bytes(200))


def test_truncated_dicom_is_unreadable():
    with pytest.raises(DecodeError, match="dicom"):
        decode_file(_dicom("MR_truncated.dcm"))


# --------------------------------------------------------------------------- hostile files


def _png_bytes(arr) -> bytes:
    return _encode(Image.fromarray(arr), "PNG")


def _in_thread(fn, timeout=20):
    """Run fn in a daemon thread: a regression that blocks fails the test, never hangs it."""
    import threading

    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still blocked after {timeout}s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match=r"not a regular file \(named pipe\)"):
        _in_thread(lambda: decode_file(fifo))


def test_a_device_or_folder_is_refused(tmp_path):
    with pytest.raises(DecodeError, match=r"not a regular file \(character device\)"):
        _in_thread(lambda: decode_file("/dev/zero"))
    with pytest.raises(DecodeError, match=r"not a regular file \(folder\)"):
        decode_file(tmp_path)


def test_a_path_swapped_for_a_pipe_after_the_check_does_not_block(tmp_path, monkeypatch):
    """The race between stat and open: the descriptor is opened non-blocking and checked."""
    import os

    from osteo.data import decode

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    monkeypatch.setattr(decode.os, "stat", lambda p, *a, **k: regular)  # the check saw a regular file
    with pytest.raises(DecodeError, match="named pipe"):
        _in_thread(lambda: decode.read_file(fifo))


def test_link_loops_and_broken_links_are_named(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    with pytest.raises(DecodeError, match="symbolic link loop"):
        decode_file(tmp_path / "a.png")
    with pytest.raises(DecodeError, match="broken symbolic link"):
        decode_file(tmp_path / "gone.png")
    (tmp_path / "real.png").write_bytes(_png_bytes(GRAY))
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert decode_file(tmp_path / "link.png")[0].shape == (40, 48, 1)


def test_pixel_limit_is_checked_from_the_header(monkeypatch):
    from osteo.data import decode

    monkeypatch.setattr(decode, "MAX_PIXELS", 1000)
    with pytest.raises(DecodeError, match=r"1,920 pixels \(48 x 40\) exceeds osteo's limit of 1,000 "
                                          r"\(MAX_PIXELS\); downscale it"):
        decode_bytes(_png_bytes(GRAY))
    with pytest.raises(DecodeError, match="MAX_PIXELS"):
        decode_file(_dicom("CT_small.dcm"))  # 128 x 128
    assert decode_bytes(_png_bytes(GRAY[:20, :40]))[0].shape == (20, 40, 1)


def test_pillow_bomb_limits_give_our_message(monkeypatch):
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses from 200 pixels
    with pytest.raises(DecodeError, match=r"1,920 pixels exceeds osteo's limit"):
        decode_bytes(_png_bytes(GRAY))
    # and an export's predict.py says it in the same words (it passed on Pillow's "decompression bomb")
    from osteo import export_predict

    with pytest.raises(export_predict.Unreadable, match=r"^1,920 pixels exceeds osteo's limit of 67,108,864 "):
        export_predict.decode(_png_bytes(GRAY))


def test_file_size_limit(tmp_path, monkeypatch):
    from osteo.data import decode

    path = tmp_path / "a.png"
    path.write_bytes(_png_bytes(GRAY))
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 100)
    with pytest.raises(DecodeError, match="MAX_FILE_BYTES"):
        decode_file(path)


@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (700, 1), (2, 3)])
def test_any_shape_decodes(shape):
    arr = (np.arange(shape[0] * shape[1]) % 256).astype(np.uint8).reshape(shape)
    out, info = decode_bytes(_png_bytes(arr))
    assert out.shape == (*shape, 1) and (info.height, info.width) == shape
    np.testing.assert_array_equal(out[..., 0], arr)


def test_float_tiff_with_nan_and_inf_stays_finite():
    raw = np.linspace(0, 1, 40 * 48, dtype=np.float32).reshape(40, 48)
    raw[0, :3] = [np.nan, np.inf, -np.inf]
    arr, info = decode_bytes(_encode(Image.fromarray(raw), "TIFF"))
    assert info.bit_depth == 32 and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 255


def test_gray_blocks_convert_like_the_whole_image():
    """decode_gray keeps the decoder's pixels; any block converts to the same float32."""
    from osteo.data.decode import decode_gray

    raw16 = np.linspace(0, 65535, 40 * 48).reshape(40, 48).astype(np.uint16)
    for data in (_png_bytes(GRAY), _png_bytes(raw16), _encode(Image.fromarray(GRAY).convert("RGB"), "JPEG")):
        gray = decode_gray(data)
        whole, _ = decode_bytes(data)
        np.testing.assert_array_equal(np.concatenate([gray.as_float(gray.pixels[:7]),
                                                      gray.as_float(gray.pixels[7:])]), whole[..., 0])
        np.testing.assert_array_equal(gray.as_float(gray.pixels[:, 5:9].T).T, whole[:, 5:9, 0])


def test_a_dicom_in_a_transfer_syntax_without_a_decoder_says_which_and_how_to_convert_it():
    pytest.importorskip("pydicom")
    from osteo.data.phantom import dicom_bytes

    # MPEG2: no decoder in osteo's packages
    data = dicom_bytes(np.zeros((16, 16), np.uint8), syntax="1.2.840.10008.1.2.4.100", fragments=[b"\0" * 64])
    with pytest.raises(DecodeError, match=r"dicom pixel data in MPEG2 Main Profile / Main Level, a transfer syntax "
                                          r"with no decoder here; convert it to uncompressed DICOM, e.g. gdcmconv"):
        decode_bytes(data)


def test_a_decoders_message_over_several_lines_is_one_line_of_reason():
    """pydicom's error for JPEG-LS pixel data it cannot decode runs over two lines (one per
    plugin): the reason, printed as a one-line error by train and eval, is folded to one line."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import JPEGLSLossless

    from osteo.data.phantom import dicom_bytes

    # a JPEG-LS start, then nothing valid
    data = dicom_bytes(np.zeros((32, 32), np.uint16), syntax=JPEGLSLossless, fragments=[b"\xff\xd8\xff\xf7" + b"\x00" * 60],
                       PatientID="P1")
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == JPEGLSLossless
    with pytest.raises(DecodeError) as e:
        decode_bytes(data)
    assert str(e.value).startswith("dicom ") and "\n" not in str(e.value)


def _dx(pixels: np.ndarray, **elements) -> bytes:
    """A DX DICOM file of ``pixels`` (12 bits stored), MONOCHROME2 unless ``elements`` say otherwise."""
    pytest.importorskip("pydicom")
    from osteo.data.phantom import dicom_bytes

    return dicom_bytes(pixels, **elements)


KNEE12 = (np.add.outer(np.arange(24), np.arange(32)) * 40 + 300).astype(np.uint16)  # 300-2140 of 4095


def test_dicom_padding_is_left_out_of_the_stretch_and_shown_black():
    """A DX with a padded border (PixelPaddingValue): the image inside decodes as the same image
    without the border does, and the border is black; the script of an ONNX export reads it alike."""
    from osteo import export_predict

    padded = np.pad(KNEE12, ((0, 0), (8, 0)), constant_values=4095)
    want, _ = decode_bytes(_dx(KNEE12))
    for elements in ({"PixelPaddingValue": 4095}, {"PixelPaddingValue": 4000, "PixelPaddingRangeLimit": 4095}):
        data = _dx(padded, **elements)
        got, _ = decode_bytes(data)
        np.testing.assert_allclose(got[:, 8:], want, atol=1e-3)
        assert (got[:, :8] == 0).all()
        np.testing.assert_array_equal(export_predict.decode(data).to_float(), got[..., 0])
    got, _ = decode_bytes(_dx(padded))  # without the element the border is image: the knee is darker
    assert got[:, 8:].max() < 0.6 * want.max()


def test_an_inverse_presentation_lut_is_shown_as_a_viewer_shows_it():
    """MONOCHROME2 with PresentationLUTShape INVERSE is shown inverted; a DX's MONOCHROME1 says
    INVERSE too, which is one inversion, not two."""
    plain, _ = decode_bytes(_dx(KNEE12))
    stored_inverted = (4095 - KNEE12).astype(np.uint16)
    for elements in ({"PresentationLUTShape": "INVERSE"}, {"PhotometricInterpretation": "MONOCHROME1"},
                     {"PhotometricInterpretation": "MONOCHROME1", "PresentationLUTShape": "INVERSE"}):
        got, _ = decode_bytes(_dx(stored_inverted, **elements))
        np.testing.assert_allclose(got, plain, atol=1e-3, err_msg=str(elements))


def test_a_palette_colour_dicom_is_read_through_its_palette():
    """PALETTE COLOR: the stored values index a palette (here a reversed gray ramp); the image is
    the palette's colours, not the indices."""
    lut = np.arange(255, -1, -1, dtype=np.uint16) * 257  # index i -> gray 255 - i, 16-bit entries
    gray = (KNEE12 // 16).astype(np.uint8)
    elements = {"PhotometricInterpretation": "PALETTE COLOR", "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7}
    for c in ("Red", "Green", "Blue"):
        elements[f"{c}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        elements[f"{c}PaletteColorLookupTableData"] = lut.tobytes()
    got, _ = decode_bytes(_dx(255 - gray, **elements))
    want, _ = decode_bytes(_dx(gray, BitsAllocated=8, BitsStored=8, HighBit=7))
    np.testing.assert_allclose(got, want, atol=0.01)


def test_a_window_of_no_width_is_not_applied_and_a_dicom_without_pixels_says_what_it_is():
    plain, _ = decode_bytes(_dx(KNEE12))
    got, _ = decode_bytes(_dx(KNEE12, WindowCenter=1000, WindowWidth=0))  # the standard wants a width >= 1
    np.testing.assert_array_equal(got, plain)
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(io.BytesIO(_dx(KNEE12)))
    del ds.PixelData, ds.Rows, ds.Columns
    ds.Modality = "SR"
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DecodeError, match=r"^a DICOM file without an image \(modality SR\), e\.g\. a structured "
                                          r"report or a key object; leave it out of the image folders$"):
        decode_bytes(buf.getvalue())


def test_a_dicom_whose_transfer_syntax_pydicom_does_not_know_is_one_line():
    """A transfer syntax UID pydicom has no name for (JPEG XL, in pydicom 3.0) is said as the UID,
    with the fix, by osteo and by an export's script alike; nothing raises past the decoder."""
    from osteo import export_predict

    pytest.importorskip("pydicom")

    # JPEG baseline, then a UID pydicom does not know: pydicom writes no syntax it does not know; a PACS of a
    # newer standard does
    data = _dx(KNEE12, syntax="1.2.840.10008.1.2.4.50", fragments=[b"\0" * 64])
    buf = io.BytesIO(data.replace(b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.98"))
    reason = ("dicom pixel data in 1.2.840.10008.1.2.4.98, a transfer syntax with no decoder here; convert it to "
              "uncompressed DICOM, e.g. gdcmconv --raw IN OUT")
    with pytest.raises(DecodeError) as e:
        decode_bytes(buf.getvalue())
    assert str(e.value) == reason
    with pytest.raises(export_predict.Unreadable) as e:
        export_predict.decode(buf.getvalue())
    assert str(e.value) == reason


def test_a_resumed_run_knows_which_of_its_images_decode_otherwise_since_its_version():
    """By the decoded pixels' hash the run's manifest kept against the audit's now (exact: a padded
    DICOM none of whose pixels is padding decodes as before); a manifest without hashes by what v4
    changed."""
    from types import SimpleNamespace

    from osteo.data.decode import decode_gray
    from osteo.data.pipeline import decodes_otherwise
    from osteo.data.scan import _pixel_hash

    now = {name: _pixel_hash(decode_gray(data)) for name, data in {
        "plain": _dx(KNEE12), "padded-but-no-pixel-is": _dx(KNEE12, PixelPaddingValue=0),
        "padded": _dx(KNEE12, PixelPaddingValue=300), "inverse": _dx(KNEE12, PresentationLUTShape="INVERSE")}.items()}
    assert now["padded-but-no-pixel-is"] == now["plain"] and len({now["plain"], now["padded"], now["inverse"]}) == 3
    dicom = lambda name: SimpleNamespace(format="dicom", bit_depth=16, width=32, height=24, pixel_sha256=now[name])
    began = {"pixel_sha256": now["plain"]}  # as v4 decoded each of them
    assert [decodes_otherwise("v4", began, dicom(n)) for n in now] == [False, False, True, True]
    png16 = SimpleNamespace(format="png", bit_depth=16, width=32, height=24, pixel_sha256="a" * 64)
    assert decodes_otherwise("v3", {}, png16) and not decodes_otherwise("v4", {}, png16)  # no hash kept: by version
    assert decodes_otherwise("v3", {"pixel_sha256": "a" * 64}, png16) is False


def _raw_png(samples: np.ndarray, colour_type: int, width: int | None = None) -> bytes:
    """A PNG of 16-bit ``samples`` (H, W, C) written byte by byte (Pillow writes no 16-bit colour)."""
    import struct
    import zlib

    h, w = samples.shape[:2]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body
                                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", w if width is None else width, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("colour_type,channels,kind", [(2, 3, "colour"), (4, 2, "gray with alpha"),
                                                       (6, 4, "colour with alpha")])
def test_a_16_bit_colour_png_is_refused_not_read_by_its_high_bytes(colour_type, channels, kind):
    """Pillow reads a 16-bit colour PNG's high bytes only: 12-bit data came out 0-15 of 255, near
    black, said to be 8-bit. It is refused with the fix, by osteo and by an export's script."""
    from osteo import export_predict

    data = _raw_png(np.repeat(KNEE12[..., None], channels, axis=2), colour_type)
    reason = (f"a 16-bit {kind} PNG, of whose samples only the high byte can be read here; save it as a 16-bit "
              "grayscale PNG (e.g. convert IN -colorspace gray -alpha off -depth 16 OUT.png)")
    with pytest.raises(DecodeError) as e:
        decode_bytes(data)
    assert str(e.value) == reason
    with pytest.raises(export_predict.Unreadable) as e:
        export_predict.decode(data)
    assert str(e.value) == reason
    arr, info = decode_bytes(_raw_png(KNEE12[..., None], 0))  # 16-bit gray: read, and stretched
    assert info.bit_depth == 16 and arr.max() == 255


def test_a_reason_names_no_memory_address():
    """Pillow names the in-memory file it was given (``<_io.BytesIO object at 0x7f...>``): the
    reason says "the file"."""
    with pytest.raises(DecodeError) as e:
        decode_bytes(_raw_png(KNEE12[..., None], 0, width=0))
    assert "0x" not in str(e.value) and "BytesIO" not in str(e.value), str(e.value)


def test_a_padding_element_left_empty_or_listing_two_values_is_read_not_refused():
    """An empty PixelPaddingValue (or range limit) is no padding; one listing two values pads with
    the first: such files decoded before padding was read, and still do."""
    padded = np.pad(KNEE12, ((0, 0), (8, 0)), constant_values=4095)
    want, _ = decode_bytes(_dx(padded, PixelPaddingValue=4095))
    for elements, expected in (({"PixelPaddingValue": None}, decode_bytes(_dx(padded))[0]),
                               ({"PixelPaddingValue": 4095, "PixelPaddingRangeLimit": None}, want),
                               ({"PixelPaddingValue": [4095, 4000]}, want)):
        got, _ = decode_bytes(_dx(padded, **elements))
        np.testing.assert_array_equal(got, expected, err_msg=str(elements))


def test_a_dicomdir_named_is_said_to_be_an_index():
    """A DICOMDIR given by name (a folder's is skipped) is said to be a medium's index, not a report."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(io.BytesIO(_dx(KNEE12)))
    del ds.PixelData, ds.Rows, ds.Columns
    ds.DirectoryRecordSequence = [Dataset()]
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DecodeError, match=r"^a DICOMDIR, a DICOM medium's index of its files \(no image\); pass the "
                                          r"folder that holds the images instead$"):
        decode_bytes(buf.getvalue())
