"""Shared test setup: tiny synthetic data, a private cache, no downloads."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:  # the fuzz tests (tests/test_reliability.py)
    from hypothesis import settings as _hypothesis

    # "fixed" (make test, CI): the same generated inputs every run, so a landing passes or
    # fails on the code, not on the draw; "explore" (make test-all, or OSTEO_HYPOTHESIS=explore):
    # new inputs each run, to find what the fixed ones miss (a failure found so becomes a
    # test of its own)
    _hypothesis.register_profile("fixed", derandomize=True)
    _hypothesis.register_profile("explore", derandomize=False)
    _hypothesis.load_profile(os.environ.get("OSTEO_HYPOTHESIS", "fixed"))
except ImportError:
    pass


# what a test run writes goes under its own temporary folder, set before a test module imports the
# libraries that read these (at collection): osteo's cache, Keras' folder (keras.json, downloads),
# Matplotlib's, Hypothesis' and TorchInductor's. A module's fixtures (a trained run) had filled the
# user's ~/.cache/osteo, where a later run could find entries an older osteo wrote
_WRITES = {"OSTEO_CACHE": "osteo-cache", "KERAS_HOME": "keras", "MPLCONFIGDIR": "matplotlib",
           "HYPOTHESIS_STORAGE_DIRECTORY": "hypothesis", "TORCHINDUCTOR_CACHE_DIR": "torchinductor"}


@pytest.hookimpl(trylast=True)  # after pytest's own configure has made the base temporary folder
def pytest_configure(config):
    base = config._tmp_path_factory.getbasetemp()
    for name, folder in _WRITES.items():
        os.environ[name] = str(base / folder)


def pytest_collection_modifyitems(config, items):
    """Three tiers: ``make test`` (under 15 minutes with its install on a 2-core CPU of either
    class), ``heavy`` on top where ``OSTEO_CI`` is set (CI's ``.ci/run`` sets it), and ``slow``
    on top of both with ``OSTEO_SLOW`` (``make test-all``)."""
    slow = bool(os.environ.get("OSTEO_SLOW"))
    heavy = slow or bool(os.environ.get("OSTEO_CI"))
    skip_slow = pytest.mark.skip(reason="slow; run with OSTEO_SLOW=1 (make test-all)")
    skip_heavy = pytest.mark.skip(reason="heavy (one of the longest tests); CI runs it: OSTEO_CI=1 make test, "
                                         "or make test-all")
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)
        elif "heavy" in item.keywords and not heavy:
            item.add_marker(skip_heavy)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """120 phantom images of 64 px, shared by the tests that only read them."""
    from osteo.data.phantom import write_phantom

    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, n=120, size=64, seed=3)
    return out


@pytest.fixture(scope="session")
def other_hospital_dir(tmp_path_factory):
    """60 phantom images of another seed: no run of the tests has seen them, as an external
    validation needs (osteo eval --data leaves out every image of the run's own split)."""
    from osteo.data.phantom import write_phantom

    out = tmp_path_factory.mktemp("other-hospital")
    write_phantom(out, n=60, size=64, seed=11)
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


@pytest.fixture(scope="module")
def run(phantom_dir, tmp_path_factory, tiny_recipe):
    """A finished tiny run (one epoch, 20 bootstrap resamples), trained once per test module
    that asks for it; a module that needs other settings defines its own ``run``."""
    from osteo.runs import RunDir
    from osteo.trainer import Trainer

    return RunDir(Trainer(tiny_recipe(phantom_dir, tmp_path_factory.mktemp("runs"), epochs=1, bootstrap=20)).run())


@pytest.fixture
def fails_fast_offline(monkeypatch):
    """``check(host, build)``: on a network that reaches nothing (every connection refused at once,
    no name resolved, so the test is the same online and offline), ``build()`` (ImageNet weights, an
    empty cache) raises a one-line OsteoError naming both ways out, having tried ``host``, and every
    connection it tried had osteo's bounded timeout (no clock is read: the bound is what makes it fast
    where the network hangs)."""
    import errno

    from osteo.backbones.base import DOWNLOAD_TIMEOUT
    from osteo.errors import OsteoError

    def check(host: str, build) -> None:
        tried = []

        def unreachable(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, *args, **kwargs):
            tried.append((address[0], socket.getdefaulttimeout() if timeout is socket._GLOBAL_DEFAULT_TIMEOUT
                          else timeout))
            raise OSError(errno.ENETUNREACH, f"{address[0]} is unreachable (the test's network)")

        def no_names(*args, **kwargs):
            raise socket.gaierror(socket.EAI_NONAME, "no name resolves (the test's network)")

        with monkeypatch.context() as m:
            m.setattr(socket, "create_connection", unreachable)
            m.setattr(socket, "getaddrinfo", no_names)
            with pytest.raises(OsteoError) as e:
                build()
        assert tried and {h for h, _ in tried} == {host}, tried
        assert all(t is not None and t <= DOWNLOAD_TIMEOUT for _, t in tried), tried
        assert "WEIGHTS=none" in str(e.value) and "WEIGHTS=/path/to/file" in str(e.value)
        assert "\n" not in str(e.value)

    return check
