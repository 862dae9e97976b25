"""Reading the metadata of HDF5 weights files (Keras' formats) before any tensor of them.

Shared by both engines: Keras' layers read Keras' files (:mod:`osteo.backbones.keras_apps`);
the timm engine reads the state dict that a Keras file of a timm run holds for its PyTorch
module (:func:`torch_state_group`), and :func:`osteo.device.keras_weights_file` tells the two apart.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from osteo.errors import short

KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # a .keras archive's weights, in Keras' own HDF5 layout


def datasets(group, bad: Callable[[str], Exception]) -> Iterator[tuple[str, object]]:
    """(path, dataset) of every dataset under ``group``, metadata only, each group entered once
    (a group linked into itself is no endless walk); a link to another file is refused wherever
    it sits (``bad(reason)`` is raised), read or not."""
    import h5py

    stack, seen = [("", group)], {group.id}
    while stack:
        prefix, g = stack.pop()
        for name in g:
            link = g.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                raise bad(f"links to another file ({link.filename})")
            obj = g.get(name)
            if isinstance(obj, h5py.Group) and obj.id not in seen:
                seen.add(obj.id)
                stack.append((f"{prefix}{name}/", obj))
            elif isinstance(obj, h5py.Dataset):
                yield f"{prefix}{name}", obj


def torch_state_group(f, bad: Callable[[str], Exception]) -> str | None:
    """The path of the group in which a Keras weights file holds a wrapped PyTorch module's state
    dict (Keras' ``TorchModuleWrapper`` stores it under the state dict's own names, ``stem.0.weight``;
    a timm run's checkpoint), or None where it holds none (Keras' layers name their tensors
    ``0``, ``1`` ...). More than one such module is refused."""
    found = {path.rpartition("/")[0] for path, _ in datasets(f, bad) if "." in path.rpartition("/")[2]}
    if len(found) > 1:
        raise bad(f"holds {len(found)} PyTorch modules' state dicts ({', '.join(sorted(found)[:3])}); save "
                  "the backbone's alone")
    return found.pop() if found else None


def holds_torch_state(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a Keras weights file (or a ``.keras`` archive) holding a
    PyTorch module's state dict (False for anything else, a file that is not there or cannot be
    read included). Asked several times while a run is planned: answered once per file version
    (a ``.keras`` archive is extracted to find out)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return _holds_torch_state(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _holds_torch_state(path: str, size: int, mtime_ns: int) -> bool:
    try:
        import h5py

        with weights_of(path, 2**34, ValueError) as inner, h5py.File(inner, "r") as f:
            return torch_state_group(f, ValueError) is not None
    except Exception:
        return False


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def first_bytes(path: str | os.PathLike, n: int = 8) -> bytes:
    """The first ``n`` bytes of the file at ``path`` (b"" where it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def pytorch_file(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is, by its first bytes, in torch.save's format, which the
    timm engine's reader takes whatever the file's name (``model_best.pth.tar``): its zip (a
    ``data.pkl`` inside, unlike a ``.keras`` zip) or its pickle; False where it cannot be read.
    (A ``.safetensors`` file is told by its name, as the reader tells it.)"""
    import zipfile

    head = first_bytes(path, 4)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("/data.pkl") for n in z.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    return head.startswith(b"\x80")


# the HDF5 attribute in which osteo's weights files say the input scaling their backbone was trained under
SCALING_ATTR = "osteo_preprocessing"


def scaling_attrs(model) -> dict[str, str]:
    """The attributes with which a checkpoint of osteo's classifier ``model`` says the input scaling
    its backbone is trained under (:func:`input_scaling`), for ``osteo.files.save_weights``: a new
    run started from the file scales its input alike (:func:`recorded_scaling`)."""
    mode = input_scaling(model)
    return {SCALING_ATTR: mode} if mode else {}


def input_scaling(model) -> str | None:
    """The input scaling osteo's classifier ``model`` gives its backbone: its ``preprocess`` layer's
    mode (``osteo.classifier.Preprocess``), ``timm`` where the timm layer scales its own input,
    None for a model of neither."""
    layers = getattr(model, "layers", [])
    for layer in layers:
        if layer.name == "preprocess" and isinstance(getattr(layer, "mode", None), str):
            return layer.mode
    if any(getattr(layer, "normalize", False) and hasattr(layer, "timm_name") for layer in layers):
        return "timm"
    return None


def recorded_scaling(path: str | os.PathLike | None) -> str | None:
    """The input scaling the weights in the file at ``path`` were trained under, where osteo wrote
    it down: the file's own attribute (osteo's checkpoints), a ``.keras`` archive's model config
    (its ``Preprocess`` layer, or a timm layer that scales its own input: ``timm``), or, for a run's
    ``best.weights.h5`` written before checkpoints said it, its run's ``recipe.json``. None for
    any other file (keras.applications' downloads, timm's), or one that cannot be read."""
    try:
        st = os.stat(path) if path else None
    except (OSError, ValueError):
        return None
    if st is None:
        return None
    mode = _recorded_scaling(os.path.abspath(path), st.st_size, st.st_mtime_ns)
    recipe = Path(path).with_name("recipe.json")
    if mode is None and Path(path).name == "best.weights.h5" and recipe.is_file():
        try:
            mode = json.loads(recipe.read_text(encoding="utf-8")).get("model", {}).get("preprocessing")
        except Exception:  # not a run's recipe
            return None
        return mode if isinstance(mode, str) and mode != "auto" else None
    return mode


@functools.lru_cache(maxsize=16)
def _recorded_scaling(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        archive = keras_archive(path)
        if archive is not None:
            with archive:
                return _scaling_in_config(json.loads(archive.read("config.json")))
        import h5py

        with h5py.File(path, "r") as f:
            mode = f.attrs.get(SCALING_ATTR)
        return None if mode is None else mode.decode() if isinstance(mode, bytes) else str(mode)
    except Exception:  # not osteo's, or unreadable: what reads the weights says why
        return None


def _scaling_in_config(config) -> str | None:
    """The input scaling a saved Keras model's config gives its backbone (see :func:`recorded_scaling`)."""
    stack, timm = [config], None
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            inner = node.get("config")
            if node.get("class_name") == "Preprocess" and isinstance(inner, dict) and isinstance(inner.get("mode"), str):
                return inner["mode"]
            if node.get("class_name") == "TimmLayer" and isinstance(inner, dict) and inner.get("normalize"):
                timm = "timm"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return timm


def keras_archive(path: str | os.PathLike):
    """``path``'s zip if it is a ``.keras`` archive (one holding :data:`KERAS_ARCHIVE_WEIGHTS`;
    torch.save's zips hold none), else None; a damaged zip is None too (read as HDF5, which
    says what it is not)."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else None
    except Exception:
        return None
    if archive is not None and KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
        archive.close()
        return None
    return archive


@contextlib.contextmanager
def weights_of(path: str | os.PathLike, limit: int, bad: Callable[[str], Exception]) -> Iterator[Path]:
    """The HDF5 weights file ``path`` is: itself, or a ``.keras`` archive's weights extracted to a
    temporary folder (at most ``limit`` bytes; removed after). A damaged archive, or one that
    cannot be extracted (a full or missing TMPDIR), is ``bad(reason)``."""
    archive = keras_archive(path)
    if archive is None:
        if str(path).lower().endswith(".keras") and Path(path).is_file():
            raise bad("is a damaged .keras archive (not a whole zip: truncated?)")
        yield Path(path)
        return
    with archive:
        member = archive.getinfo(KERAS_ARCHIVE_WEIGHTS)
        if member.file_size > limit:
            raise bad(f"holds {member.file_size / 2**30:.1f} GiB of weights, more than osteo extracts from a "
                      f".keras archive for this model ({limit / 2**30:.1f} GiB)")
        with scratch(bad) as tmp:
            inner = tmp / KERAS_ARCHIVE_WEIGHTS
            try:
                with archive.open(member) as src, open(inner, "wb") as dst:
                    shutil.copyfileobj(src, dst, 2**20)
            except OSError as e:
                if e.errno is None:  # the decompressor's, not the disk's
                    raise bad(f"is a damaged .keras archive ({short(e)})") from None
                raise bad(f"cannot be extracted to {tmp} ({e.strerror or short(e)}); set TMPDIR to a folder "
                          "with room") from None
            except Exception as e:  # encrypted, an unknown method, a corrupt stream: the archive's fault
                raise bad(f"is a damaged .keras archive ({short(e)})") from None
            yield inner


# the start of the names of scratch's folders, in TMPDIR
SCRATCH = "osteo-weights-"


@contextlib.contextmanager
def scratch(bad: Callable[[str], Exception]) -> Iterator[Path]:
    """A temporary folder for a copy of (part of) a weights file, removed after; ``bad(reason)``
    naming TMPDIR where none can be made. Its name says its writer (``osteo-weights-<pid>@<host>-``):
    such folders that a kill -9 left (of processes no longer running) are removed first."""
    from osteo.files import owned_prefix, sweep_temporaries

    sweep_temporaries(tempfile.gettempdir(), pattern=f"{SCRATCH}*@*")  # an older osteo's, unnamed, are left
    try:
        tmp = tempfile.mkdtemp(prefix=owned_prefix(SCRATCH))
    except OSError as e:
        raise bad(f"needs a temporary folder, which cannot be made in {tempfile.gettempdir()} "
                  f"({e.strerror or short(e)}); set TMPDIR to a writable folder with room") from None
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
