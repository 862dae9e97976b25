import io

import numpy as np
import pytest
from PIL import Image

from osteo.data.decode import DecodeError, decode_bytes, decode_file, sniff_format

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


def test_truncated_dicom_is_unreadable():
    with pytest.raises(DecodeError, match="dicom"):
        decode_file(_dicom("MR_truncated.dcm"))
