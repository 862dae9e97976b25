"""Reading the metadata of HDF5 weights files (Keras' formats) before any tensor of them.

Shared by both engines: Keras' layers read Keras' files (:mod:`osteo.backbones.keras_apps`);
the timm engine reads the state dict that a Keras file of a timm run holds for its PyTorch
module (:func:`torch_state_group`), and :func:`osteo.device.keras_weights_file` tells the two apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator


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
    """Whether the file at ``path`` is a Keras weights file holding a PyTorch module's state dict
    (False for anything else, a file that is not there or cannot be read included)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return torch_state_group(f, ValueError) is not None
    except Exception:
        return False
