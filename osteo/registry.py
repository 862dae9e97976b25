"""The backbone registry: model name = registry key = recipe file name.

    >>> from osteo.registry import get_backbone, list_backbones
    >>> "convnext_tiny" in list_backbones()
    True
    >>> get_backbone("vgg16").preprocessing
    'caffe'

Specs register themselves when :mod:`osteo.backbones` is imported; this module imports
it lazily so that listing names stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from osteo.errors import OsteoError

if TYPE_CHECKING:
    from osteo.backbones import BackboneSpec

_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load() -> None:
    import osteo.backbones  # noqa: F401  (registers the specs)


def list_backbones(*, include_test: bool = False) -> list[str]:
    """Registered names, sorted; the tiny test backbone only on request."""
    _load()
    return sorted(n for n, s in _REGISTRY.items() if include_test or not s.test_only)


def get_backbone(name: str) -> BackboneSpec:
    """The spec for ``name``; an unknown name lists the valid ones."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OsteoError(
            f"unknown model {name!r}; choose one of: {', '.join(list_backbones(include_test=True))}"
        ) from None
