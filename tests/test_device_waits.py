"""osteo's training step on PyTorch makes no device tensor from host data after the first steps.

On a GPU, PyTorch copies a Python number or a NumPy array handed to an op to the device and
waits for that copy, i.e. for every kernel queued before it: a step with such copies keeps
the GPU idle while the host prepares the next one (osteo.classifier.Model). This machine
has no GPU, so the test counts the places where a GPU run would copy: tensors made from
host data during ``fit`` (``torch.as_tensor`` / ``torch.tensor`` of anything not already a
tensor), and host reads of device values on the main thread (``.item()``, ``bool()``, NumPy).
"""

import os
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND") != "torch", reason="the PyTorch backend's step")


def _count_host_data(monkeypatch):
    import torch

    counts = {"made": [], "read": []}
    main = threading.main_thread()

    def watch(fn, kind):
        def wrapped(data, *a, **k):
            if not isinstance(data, torch.Tensor) and threading.current_thread() is main:
                counts[kind].append(type(data).__name__)
            return fn(data, *a, **k)
        return wrapped

    monkeypatch.setattr(torch, "as_tensor", watch(torch.as_tensor, "made"))
    monkeypatch.setattr(torch, "tensor", watch(torch.tensor, "made"))
    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__

    def read(fn):
        def wrapped(self, *a, **k):
            if threading.current_thread() is main:
                counts["read"].append(fn.__name__)
            return fn(self, *a, **k)
        return wrapped

    monkeypatch.setattr(torch.Tensor, "item", read(item))
    monkeypatch.setattr(torch.Tensor, "__bool__", read(to_bool))
    monkeypatch.setattr(torch.Tensor, "__array__", read(torch.Tensor.__array__))  # NumPy of a device tensor
    return counts


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_fit_steps_make_no_device_tensor_from_host_data(monkeypatch, tmp_path, schedule):
    import keras

    from osteo.callbacks import HistoryCSV, NonFiniteLoss, callback_list
    from osteo.classifier import Classifier, SparseCrossEntropy, default_metrics
    from osteo.data.feed import TorchFeed
    from osteo.optim import make_optimizer
    from osteo.recipe import AugmentConfig

    clf = Classifier("tiny", image_size=32, weights="none", freeze_bn=False,
                     augment=AugmentConfig(flip=False, zoom=0.0, shear=0.0))
    model = clf.build()
    lr = 1e-3 if schedule == "constant" else keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=20, warmup_target=1e-3, warmup_steps=4)
    model.compile(make_optimizer("adamw", lr, 1e-4), SparseCrossEntropy(label_smoothing=0.1),
                  metrics=default_metrics())
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 65535, (24, 32, 32, 1), dtype=np.uint16)
    # class weights and MixUp as osteo train gives them (Keras' own class_weight reads the labels back)
    feed = TorchFeed(levels, np.arange(24) % 3, 8, training=True, mixup=0.2, class_weight={0: 0.5, 1: 2.0, 2: 1.0})
    nonfinite = NonFiniteLoss()

    def callbacks(steps):  # the per-batch ones osteo train adds, listed as osteo train lists them
        return callback_list([nonfinite, HistoryCSV(tmp_path / "history.csv", images_per_epoch=24)], model,
                             epochs=1, steps=steps)

    model.fit(feed, steps_per_epoch=2, epochs=1, verbose=0, callbacks=callbacks(2))  # built, first reads done
    per_fit = {}
    for steps in (2, 7):
        counts = _count_host_data(monkeypatch)
        model.fit(feed, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=callbacks(steps))
        monkeypatch.undo()
        per_fit[steps] = counts
    # what Keras does once per fit (resetting its metrics to Python zeros, the epoch's logs) is
    # the same for 2 and 7 steps; five more steps add nothing
    assert per_fit[7] == per_fit[2], per_fit
    assert nonfinite.stopped_at is None


@pytest.mark.parametrize("warmup", [0, 5])
def test_the_cosine_schedule_on_the_host_is_keras_own(warmup):
    import keras

    from osteo.optim import cosine_on_host

    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else 3e-4, decay_steps=17, alpha=0.1, warmup_target=3e-4 if warmup else None,
        warmup_steps=warmup)
    for step in range(0, 30):
        expected = float(keras.ops.convert_to_numpy(schedule(step)))
        assert cosine_on_host(schedule, step) == pytest.approx(expected, rel=1e-6, abs=1e-12), step


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_the_feeds_sample_weights_are_keras_class_weights(mixup):
    """TorchFeed weighs its batches as Keras' fit(class_weight=...) would (argmax of soft labels)."""
    from keras.src.trainers.data_adapters.data_adapter_utils import class_weight_to_sample_weights

    from osteo.data.feed import TorchFeed

    weights = {0: 0.5, 1: 2.0, 2: 1.25}
    levels = np.random.default_rng(1).integers(0, 65535, (20, 8, 8, 1), dtype=np.uint16)
    feed = TorchFeed(levels, np.arange(20) % 3, 6, training=True, mixup=mixup, class_weight=weights)
    for i in range(5):
        _, y, sw = feed[i]
        np.testing.assert_array_equal(sw.numpy(), class_weight_to_sample_weights(y.numpy(), weights))
