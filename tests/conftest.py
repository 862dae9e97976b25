"""Shared test setup: tiny synthetic data, a private cache, no downloads."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("OSTEO_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow; run with OSTEO_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OSTEO_CACHE", str(tmp_path_factory.getbasetemp() / "osteo-cache"))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """120 phantom images of 64 px, shared by the tests that only read them."""
    from osteo.data.phantom import write_phantom

    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, n=120, size=64, seed=3)
    return out


@pytest.fixture(scope="session")
def tiny_recipe():
    """Builder of the tests' recipe: the study protocol on a backbone (tiny by default)
    from scratch, 32 px, batch 16, two epochs, no TensorBoard; ``**train`` sets train.*."""

    def make(data_dir, runs, backbone="tiny", **train):
        from osteo.recipe import study_protocol

        r = study_protocol(backbone)
        r.model.weights, r.data.dir, r.data.image_size, r.data.batch_size = "none", str(data_dir), 32, 16
        r.runs_dir, r.train.epochs, r.train.tensorboard = str(runs), 2, False
        for k, v in train.items():
            setattr(r.train, k, v)
        return r

    return make
