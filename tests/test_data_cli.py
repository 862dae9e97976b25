"""The data side as the CLI shows it: warnings and errors as single lines, nothing else on stderr."""

import subprocess
import sys

from osteo.cli import main


def _osteo(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "osteo.cli", *map(str, argv)], cwd=cwd, capture_output=True, text=True)


def _audit_said(folder, tmp_path) -> list[str]:
    """``osteo data audit FOLDER``'s stderr lines, once it has exited 0."""
    proc = _osteo("data", "audit", folder, "--out", tmp_path / "audit", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


def test_extra_class_folder_is_one_warning_line_and_a_file_is_named_a_file(tmp_path):
    assert main(["data", "phantom", str(tmp_path / "ph"), "--n", "6", "--size", "32"]) == 0
    extra = tmp_path / "ph" / "severe"
    extra.mkdir()
    (extra / "a.png").write_bytes(next((tmp_path / "ph" / "normal").iterdir()).read_bytes())
    assert _audit_said(tmp_path / "ph", tmp_path) == [
        f"osteo: warning: ignoring severe/ (1 image) in {tmp_path / 'ph'}: not a class folder (normal, osteopenia, "
        "osteoporosis); rename it to one of them, or move it out of the data folder"]
    proc = _osteo("data", "audit", extra / "a.png", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"osteo: error: {extra / 'a.png'} is a file, not a folder; pass the folder that holds the class "
        f"sub-folders (normal, osteopenia, osteoporosis), e.g. {tmp_path / 'ph'}"]


def test_training_on_a_folder_of_nothing_readable_names_a_file_and_its_reason(tmp_path):
    for c in ("normal", "osteopenia"):
        (tmp_path / "junk" / c).mkdir(parents=True)
        (tmp_path / "junk" / c / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)  # a PNG's signature, no image
    proc = _osteo("train", "tiny", "--data", tmp_path / "junk", "--runs", tmp_path / "runs", "--image-size", "32",
                  "--weights", "none", cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"osteo: error: no readable images in {tmp_path / 'junk'}; e.g. normal/scan.png: ")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_images_in_a_format_osteo_does_not_read_are_one_warning_line(tmp_path):
    import numpy as np
    from PIL import Image

    assert main(["data", "phantom", str(tmp_path / "ph"), "--n", "6", "--size", "32"]) == 0
    for i, c in enumerate(("normal", "normal", "osteopenia")):
        Image.fromarray(np.full((32, 32), 90 + i, "uint8")).save(tmp_path / "ph" / c / f"scan{i}.gif")
    Image.fromarray(np.full((32, 32), 9, "uint8")).save(tmp_path / "ph" / "osteoporosis" / "scan.webp")
    (tmp_path / "ph" / "normal" / "notes.txt").write_text("not an image: ignored without a word")
    Image.fromarray(np.full((32, 32), 7, "uint8")).save(tmp_path / "ph" / "logo.gif")  # outside the classes
    assert _audit_said(tmp_path / "ph", tmp_path) == [
        "osteo: warning: 4 file(s) in the class folders are images in a format osteo does not read (3 .gif, 1 .webp) "
        "and are left out; convert them to PNG (or DICOM) to include them"]


def test_images_unlike_a_radiograph_in_size_or_shape_are_one_warning_line(tmp_path):
    import numpy as np
    from PIL import Image

    assert main(["data", "phantom", str(tmp_path / "ph"), "--n", "6", "--size", "32"]) == 0
    Image.fromarray(np.array([[0, 255]], "uint8")).save(tmp_path / "ph" / "normal" / "dot.png")
    Image.fromarray(np.add.outer(np.arange(20), np.arange(400)).astype("uint8")).save(
        tmp_path / "ph" / "osteopenia" / "strip.png")
    assert _audit_said(tmp_path / "ph", tmp_path) == [
        "osteo: warning: 2 image(s) are under 8 px on a side or over 8x as long as wide, unlike a radiograph: "
        "normal/dot.png (2 x 1), osteopenia/strip.png (400 x 20); each is resized and trained on all the same: "
        "check them, or move them out"]


def test_blank_images_of_any_depth_are_one_warning_line_and_listed_in_audit_json(tmp_path):
    """An image whose every pixel holds one value (a failed export, a placeholder) has no picture of a
    knee; a 16-bit one decodes to black, since its range is empty. One pixel that differs is a picture."""
    import json

    import numpy as np
    from PIL import Image

    from osteo.data.phantom import dicom_bytes

    assert main(["data", "phantom", str(tmp_path / "ph"), "--n", "6", "--size", "32"]) == 0
    Image.fromarray(np.full((40, 40), 90, "uint8")).save(tmp_path / "ph" / "normal" / "grey.png")
    Image.fromarray(np.full((40, 40), 3000, "uint16")).save(tmp_path / "ph" / "osteopenia" / "grey16.png")
    (tmp_path / "ph" / "osteoporosis" / "grey.dcm").write_bytes(dicom_bytes(np.full((40, 40), 700, "uint16")))
    corner = np.full((40, 40), 90, "uint8")
    corner[39, 0] = 91  # the middle row is one value too: only the whole image tells
    Image.fromarray(corner).save(tmp_path / "ph" / "normal" / "corner.png")
    assert _audit_said(tmp_path / "ph", tmp_path) == [
        "osteo: warning: 3 image(s) are blank, every pixel one gray level (a failed export, a placeholder?): "
        "normal/grey.png, osteopenia/grey16.png, osteoporosis/grey.dcm; each is trained on all the same and teaches nothing "
        'of its class: check them, or move them out (audit.json lists them under "blank")']
    info = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert info["blank"] == ["normal/grey.png", "osteopenia/grey16.png", "osteoporosis/grey.dcm"]


def test_images_with_transparent_pixels_are_one_warning_line_and_listed_in_audit_json(tmp_path):
    """Transparency (an alpha channel, a palette entry, a colour key) is dropped and the pixels read by
    their colour, as Keras' loaders read them; where some pixel is not opaque, a viewer may show
    something else: said, and listed. An alpha channel that is opaque everywhere, or a transparent
    palette entry no pixel uses, is not transparency."""
    import json

    import numpy as np
    from PIL import Image

    assert main(["data", "phantom", str(tmp_path / "ph"), "--n", "6", "--size", "32"]) == 0
    ph = tmp_path / "ph"

    def ramp(k: int) -> np.ndarray:  # a picture of its own (no duplicate of another)
        return (np.add.outer(np.arange(40) * k, np.arange(40)) % 256).astype("uint8")

    rgba = np.dstack([ramp(1), ramp(1), ramp(1), np.full((40, 40), 255, "uint8")])
    Image.fromarray(rgba).save(ph / "osteopenia" / "opaque.png")
    rgba = np.dstack([ramp(2), ramp(2), ramp(2), np.full((40, 40), 255, "uint8")])
    rgba[:5, :5, 3] = 0  # a corner cut out
    Image.fromarray(rgba).save(ph / "normal" / "cut.png")
    Image.fromarray(np.dstack([ramp(3), np.full((40, 40), 128, "uint8")]), "LA").save(ph / "normal" / "gray-alpha.png")
    palette = Image.fromarray(ramp(4) // 16).convert("P")  # 16 levels
    palette.save(ph / "osteoporosis" / "used.png", transparency=int(np.asarray(palette)[0, 0]))
    Image.fromarray(ramp(5) // 16).convert("P").save(ph / "osteoporosis" / "unused.png", transparency=255)
    key = np.dstack([ramp(6)] * 3)
    Image.fromarray(key).save(ph / "osteopenia" / "key.png", transparency=tuple(int(v) for v in key[0, 0]))
    deep = ramp(7).astype("uint16") * 257  # 16-bit gray, a level keyed out (the usual radiograph PNG)
    Image.fromarray(deep).save(ph / "osteoporosis" / "key16.png", transparency=int(deep[3, 3]))
    Image.fromarray(deep + 1).save(ph / "normal" / "key16-unused.png", transparency=2)  # no pixel holds 2
    (line,) = _audit_said(ph, tmp_path)
    assert line == (
        "osteo: warning: 5 image(s) have transparent pixels: normal/cut.png, normal/gray-alpha.png, osteopenia/key.png "
        "and 2 more; each is read by its colours with the transparency dropped, as Keras' loaders read it, which may "
        "not be what a viewer shows: flatten them onto the background you mean (e.g. convert IN -background black "
        '-alpha remove OUT.png), or check them (audit.json lists them under "transparent")')
    info = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert info["transparent"] == ["normal/cut.png", "normal/gray-alpha.png", "osteopenia/key.png",
                                   "osteoporosis/key16.png", "osteoporosis/used.png"]
    assert not info["unreadable"] and not info["blank"]
