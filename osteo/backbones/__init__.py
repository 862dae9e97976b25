"""The backbones: one interface (:mod:`.base`), two engines (:mod:`.keras_apps`, :mod:`.timm_torch`).

Keras-free on import: an engine's module (and with it Keras, or PyTorch and timm) is
imported only when a model is built (:func:`osteo.backbones.base.create`).
"""
