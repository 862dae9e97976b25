"""The study at scale: the backbones x folds x seeds grid as trials, on Ray Tune when installed.

    osteo study --models vgg16,densenet169 --recipe demo --folds 2 --data data/phantom-demo
    osteo study --models vgg16 --search train.fine_tune_lr=1e-5:1e-3:log --trials 8
    osteo study --address ray://head:10001 --gpus-per-trial 1 ...    # a Ray cluster

Each (backbone, seed, fold) is a *trial*: one ``osteo train`` process that trains fold I
of the cross-validation ``RUNS/<model>/<study-id>-seed<S>``, exactly the command a person
would type, so each trial picks its own Keras backend and can be resumed by hand. A
trial's output goes to ``<cv>/fold-I.log``. A trial whose process fails or is killed is
retried (up to :data:`RETRIES` times) from its last completed epoch with ``osteo train
--resume``; one that still fails is reported (a warning, ``study.json``, and the report
names its cross-validation as left out) and the others go on. A user error (exit code 2,
an :class:`OsteoError`) is not retried: it would fail the same way again.

Ray Tune runs the trials (``pip install 'osteo[study]'``): on a local Ray with this
machine's cores, or on the cluster at ``address``; without Ray they run one after another.

``search`` (``KEY=LO:HI[:log]``) first searches a hyper-parameter with ASHA, as nested
cross-validation: for every outer fold, ``trials`` values are trained on the inner split
of that fold's training images (:func:`osteo.data.split.split_rows` with ``data.inner_val``:
the outer fold held out as ``test``, validation carved from the rest) and ranked by their
best validation macro F1; the winner trains that outer fold, whose trial chooses its
checkpoint, temperature and thresholds on the same inner split (every fold trial does, search
or not: :func:`osteo.session.cross_validate`), so the outer fold chooses nothing. One value per
backbone for all folds could not be honest: with k folds every image is some fold's held-out image.

``external`` folders (other hospitals' labelled images) are scored last, each by every
backbone's final model: for each backbone and seed, its K fold models as one ensemble
(:class:`osteo.predict.Ensemble`: the mean of their calibrated probabilities, an operating
point at the mean of their thresholds), by ``osteo eval CV --data FOLDER`` as a trial of its
own. Each fold model chose its checkpoint, temperature and thresholds on its own training
folds, so neither the outer folds nor an external folder chose anything, and no model is
trained again: a final model retrained on all the images would need a checkpoint chosen on
images of its own, and a learning rate where each outer fold chose its own. Images of an
external folder that are, by content, in the study's data are left out and counted.

``study.json`` in ``out`` records the trials, their status, retries, run directories, times
and the Ray node each ran on, the search's values and the external scorings; written first
when the study starts, it lets the same command continue a study that was stopped (SIGTERM,
Ctrl-C, a lost machine): finished trials and scorings are kept, the others resume;
``out/index.html`` is :func:`osteo.report.write_report` of the cross-validations (pooled
out-of-fold predictions, one row per backbone and seed) beside their ensembles' rows on each
external folder (``evaluated_on`` ``external: <folder name>``). Each trial's end is a line
with the trials left and an estimate of the time they take, from the pace so far.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import datetime
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osteo import killpoints
from osteo.data.split import INNER_VAL
from osteo.errors import OsteoError, Stopped
from osteo.files import folder_lock, read_json, unreachable, write_json
from osteo.runs import CvDir, RunDir, check_output_place
from osteo.session import TrainOptions, audited_rows, build_recipe, check_folds, ensure_phantom

RETRIES = 2  # per trial, each from its last completed epoch
METRIC = "val_macro_f1"  # what the search ranks, per epoch from history.csv
POLL_SECONDS = 1.0  # how often a searched trial's history.csv is read
ASHA_REDUCTION = 3  # ASHA keeps the best third at each rung (epochs 1, 3, 9, ...)
LOCAL_OBJECT_STORE = 256 * 2**20  # bytes
# what a trial's outcome holds (Tune's results hold its bookkeeping too); "node": its Ray node's id
OUTCOME = ("status", "attempts", "retries", "run", "wall_seconds", "error", METRIC, "host", "node", "kept", "scored",
           "left_out")

Say = Callable[[str], None]


@dataclass
class StudyConfig:
    models: list[str]
    recipe: str = "finetune"
    folds: int = 5
    seeds: int = 1
    address: str | None = None  # a Ray cluster (or $RAY_ADDRESS); None: Ray on this machine
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    out: str = "reports/study"
    runs: str = "runs"
    options: TrainOptions = field(default_factory=TrainOptions)  # every trial's `osteo train` options
    search: str | None = None  # KEY=LO:HI:log
    trials: int = 8
    mlflow: bool = False
    external: list[str] = field(default_factory=list)  # labelled folders each final model is scored on


@dataclass(frozen=True)
class Search:
    key: str
    low: float
    high: float
    log: bool

    def values(self, n: int, seed: list[int]) -> list[float]:
        """``n`` values, one from each of ``n`` equal slices of the range (in random order), so
        a few trials still cover it; 3 significant digits, as a person would write them."""
        rng = np.random.default_rng(seed)
        u = (rng.permutation(n) + rng.random(n)) / n
        lo, hi = (math.log(self.low), math.log(self.high)) if self.log else (self.low, self.high)
        raw = lo + u * (hi - lo)
        return [float(f"{(math.exp(v) if self.log else v):.3g}") for v in raw]


def parse_search(text: str) -> Search:
    """``KEY=LO:HI`` or ``KEY=LO:HI:log`` -> :class:`Search`."""
    fix = "write it as KEY=LO:HI[:log], e.g. --search train.fine_tune_lr=1e-5:1e-3:log"
    key, _, spec = text.partition("=")
    parts = spec.split(":")
    if not key.strip() or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
        raise OsteoError(f"cannot read --search {text!r}; {fix}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise OsteoError(f"cannot read the range of --search {text!r}; {fix}") from None
    log = len(parts) == 3 and parts[2] == "log"
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or (log and low <= 0):
        raise OsteoError(f"--search {text!r} needs LO < HI (and LO > 0 on a log scale); {fix}")
    return Search(key.strip(), low, high, log)


# --------------------------------------------------------------------------- one trial


def run_trial(spec: dict, on_epoch: Callable[[int, float], None] | None = None) -> dict:
    """Run one trial to its end: its ``osteo train`` process, retried from the last completed epoch.

    ``spec`` (JSON-able, built by the study) names the command, the run directory (or, for
    a search trial, the folder its run is made in), the log file and the retries allowed.
    ``on_epoch(epoch, val_macro_f1)`` is called once per new epoch in ``history.csv`` (the
    search reports them to ASHA, which may stop the trial by raising from it: the
    process is then killed). Returns the outcome: status ``ok`` or ``failed``, attempts,
    retries, run directory, wall seconds, the last error, the best validation macro F1, the
    host it ran on, and ``kept``: its run was finished before it started (by an earlier run
    of the study).
    """
    log = Path(spec["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    attempts = _attempts_made(log)
    seen, error, status = 0, "", "failed"
    first = _trial_run(spec)
    kept = first is not None and first.is_finished()  # by an earlier run of the study, stopped later
    while True:
        run = _trial_run(spec)
        if run is not None and run.is_finished():
            status, error = "ok", ""
            break
        if attempts > spec["retries"]:
            break
        # a run with recipe.json and split.csv resumes (from epoch 0 if it saved no state);
        # a run that failed before its first epoch was removed by osteo: start it again
        args = ["train", spec["recipe"], "--resume", str(run.path)] if run is not None and run.is_run() \
            else spec["args"]
        attempts += 1
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n== attempt {attempts} of {spec['retries'] + 1}: osteo {' '.join(args)}\n")
        rc, seen = _run_process(args, spec, log, on_epoch, seen)
        if rc == 0:
            continue
        error = _failure(rc, log)
        if rc == 2:
            break
    run = _trial_run(spec)
    if status == "failed" and not error:
        error = "its run did not finish"
    return {"status": status, "attempts": attempts, "retries": max(0, attempts - 1),
            "run": str(run.path) if run is not None else "", "wall_seconds": round(time.monotonic() - t0, 1),
            "error": error, METRIC: _best(run), "host": platform.node(), "kept": kept}


STOPPED_MARK = "\n== stopped: the process was killed\n"  # an attempt cut short by a stop, not failed


def _attempts_made(log: Path) -> int:
    """The attempts a trial (or scoring) already used, by its log: a trial Ray started again (its
    worker was lost) counts them; one cut short by the user's stop (SIGTERM, Ctrl-C: the study
    killed it) or by the scheduler spent none of its retries."""
    if not log.exists():
        return 0
    text = log.read_text(encoding="utf-8", errors="replace")
    return max(0, text.count("\n== attempt ") - text.count(STOPPED_MARK))


def _mark_stopped(specs: list[dict]) -> None:
    """After the user's stop of a study on Ray: each unfinished trial's last attempt is marked as cut
    short (Ray may end a trial's worker without the mark ``_run_process`` writes), so it spends no
    retry when the same command continues the study."""
    for spec in specs:
        log = Path(spec["log"])
        with contextlib.suppress(OSError):
            text = log.read_text(encoding="utf-8", errors="replace")
            done = _scoring(spec) is not None if spec["kind"] == "external" else \
                (run := _trial_run(spec)) is not None and run.is_finished()
            if not done and text.rfind("\n== attempt ") > text.rfind(STOPPED_MARK):
                with open(log, "a", encoding="utf-8") as f:
                    f.write(STOPPED_MARK)


def _trial_run(spec: dict) -> RunDir | None:
    """The trial's run directory: the fold's, or the one run a search trial made in its folder."""
    if spec["run"]:
        run = RunDir(spec["run"])
        return run if run.path.is_dir() else None
    return next((RunDir(p) for p in sorted(Path(spec["root"]).glob("*/*")) if RunDir(p).is_run()), None)


def _best(run: RunDir | None) -> float | None:
    values = [v for v in (_number(r.get(METRIC)) for r in _history(run)) if v is not None]
    return max(values) if values else None


def _history(run: RunDir | None) -> list[dict]:
    try:
        return run.read_history() if run is not None else []
    except OsteoError:  # being replaced this instant: read it at the next poll
        return []


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: the trial's process is killed when the thread that started it dies (a Ray worker
    torn down after ASHA stopped its trial), so no training outlives its trial."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)
    return lambda: prctl(pr_set_pdeathsig, sigkill)


def _run_process(args: list[str], spec: dict, log: Path, on_epoch, seen: int) -> tuple[int, int]:
    """One attempt: ``python -m osteo.cli ARGS`` with its output in ``log``; (exit code, epochs seen)."""
    with open(log, "a", encoding="utf-8") as out:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "osteo.cli", *args], cwd=spec["cwd"],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=_die_with_parent())
        except OSError as e:  # on a cluster: a node that does not see the study's folder
            out.write(f"osteo: error: cannot start the trial on {platform.node()} in {spec['cwd']}: "
                      f"{e.strerror}; every Ray node must see this folder at the same path\n")
            return 2, seen
        try:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=POLL_SECONDS if on_epoch else None)
                if on_epoch is not None:
                    for row in _history(_trial_run(spec)):
                        epoch, value = int(row["epoch"]), _number(row.get(METRIC))
                        if epoch > seen and value is not None:
                            seen = epoch
                            on_epoch(epoch, value)
                if proc.returncode is not None:
                    return proc.returncode, seen
        finally:
            if proc.poll() is None:  # stopped by the scheduler, or interrupted
                proc.kill()
                proc.wait()
                out.write(STOPPED_MARK)


def _failure(rc: int, log: Path) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if not ln.startswith("== ")), "")
    return f"exit code {rc}: {last[:300]}"


def run_scoring(spec: dict) -> dict:
    """Score a final model on an external folder: ``osteo eval CV --data FOLDER --out OUT``,
    retried as a trial is (a scoring starts again: it has no epochs). A scoring already in ``OUT``
    (an earlier run of the same study, stopped later) is kept: status ``ok``, no attempt."""
    log = Path(spec["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    attempts = _attempts_made(log)
    error, kept = "", _scoring(spec) is not None
    while _scoring(spec) is None and attempts <= spec["retries"]:
        attempts += 1
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n== attempt {attempts} of {spec['retries'] + 1}: osteo {' '.join(spec['args'])}\n")
        rc, _ = _run_process(spec["args"], spec, log, None, 0)
        error = "" if rc == 0 else _failure(rc, log)
        if rc == 2:
            break
    metrics = _scoring(spec)
    if metrics is None and not error:
        error = f"it wrote no complete scoring to {spec['run']}"
    return {"status": "ok" if metrics is not None else "failed", "attempts": attempts,
            "retries": max(0, attempts - 1), "run": spec["run"], "wall_seconds": round(time.monotonic() - t0, 1),
            "error": "" if metrics is not None else error, "host": platform.node(), "kept": kept,
            "scored": (metrics or {}).get("external", {}).get("n"),
            "left_out": (metrics or {}).get("excluded_training_overlap")}


def _scoring(spec: dict) -> dict | None:
    """The scoring's ``metrics.json`` if ``osteo eval`` finished it (its predictions, metrics and
    audit all written) on this very folder, else None."""
    out = Path(spec["run"])
    try:
        metrics = read_json(out / RunDir.METRICS)
    except (OSError, ValueError):  # not written yet, or half a file of a killed process
        return None
    done = all((out / f).is_file() for f in (RunDir.PREDICTIONS, RunDir.AUDIT)) and isinstance(metrics, dict)
    return metrics if done and Path(str(metrics.get("data_dir"))).resolve() == Path(spec["folder"]).resolve() \
        else None


def _run_spec(spec: dict, on_epoch: Callable[[int, float], None] | None = None) -> dict:
    return run_scoring(spec) if spec["kind"] == "external" else run_trial(spec, on_epoch)


# --------------------------------------------------------------------------- running trials


def _label(spec: dict) -> str:
    if spec["kind"] == "external":
        return f"{spec['model']} seed {spec['seed']} on {spec['name']}"
    where = f"{spec['model']} seed {spec['seed']} fold {spec['fold']}"
    return f"search {where} ({spec['set']})" if spec["kind"] == "search" else where


def _start_line(spec: dict) -> str:
    return f"{_label(spec)}: started (log {spec['log']})"


def _end_line(spec: dict, outcome: dict) -> str:
    if spec["kind"] == "external" and outcome["status"] == "ok":
        how = "kept from an earlier run" if outcome["kept"] else f"scored in {outcome['wall_seconds']:.0f}s"
        return (f"{_label(spec)}: {how}, {outcome['scored']} images ({outcome['left_out']} also in the study's "
                "data left out)")
    best = outcome.get(METRIC)
    # on the fold's inner validation images, which chose the checkpoint: optimistic, not the study's result
    score = (f"best macro F1 {best:.3f} on its inner validation (which chose the checkpoint)" if best is not None
             else "no epoch finished")
    retries = outcome.get("retries", 0)
    again = f", after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else ""
    if outcome["status"] == "ok" and outcome.get("kept"):
        return f"{_label(spec)}: kept from an earlier run, {score}"
    if outcome["status"] == "ok":
        return f"{_label(spec)}: done in {outcome['wall_seconds']:.0f}s, {score}{again}"
    if outcome["status"] == "stopped":
        return f"{_label(spec)}: stopped by ASHA ({score})"
    if outcome["status"] == "interrupted":  # with the study (SIGTERM, Ctrl-C): the same command continues it
        return f"{_label(spec)}: stopped with the study ({score})"
    return f"{_label(spec)}: FAILED{again}: {outcome['error']}"


class _Progress:
    """``(3 of 8 trials, about 3 min left)`` after each trial's end line: the trials still to end
    at the pace of this stage so far (its wall time over the trials that ran, however many run at
    once). Trials kept from an earlier run of the study took no time and set no pace."""

    def __init__(self, specs: list[dict]):
        self.total, self.ended, self.ran, self.t0 = len(specs), 0, 0, time.monotonic()
        self.noun = "scorings" if specs and specs[0]["kind"] == "external" else \
            "search trials" if specs and specs[0]["kind"] == "search" else "trials"

    def ended_one(self, outcome: dict) -> str:
        self.ended += 1
        self.ran += not outcome.get("kept")
        left = self.total - self.ended
        pace = (time.monotonic() - self.t0) / self.ran if self.ran else None
        estimate = f", about {_duration(pace * left)} left" if left and pace is not None else ""
        return f" ({self.ended} of {self.total} {self.noun}{estimate})"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class _Sequential:
    """Without Ray: the trials one after another, each with the whole machine."""

    where = "one after another (Ray is not installed)"

    def run(self, specs: list[dict], say: Say, search: bool = False) -> dict[str, dict]:
        out, progress = {}, _Progress(specs)
        for spec in specs:
            say(_start_line(spec))
            out[spec["id"]] = {**_run_spec(spec), "node": None}
            say(_end_line(spec, out[spec["id"]]) + progress.ended_one(out[spec["id"]]))
            killpoints.reached("study.trial_ended")
        return out

    def close(self) -> None:
        pass


def _tune_trial(config: dict, specs: dict) -> None:
    """The Ray Tune function of a trial: its epochs go to the scheduler, its outcome last."""
    import ray
    from ray import tune

    spec = specs[config["id"]]
    on_epoch = (lambda epoch, value: tune.report({"epoch": epoch, METRIC: value})) \
        if spec["kind"] == "search" else None
    outcome = {**_run_spec(spec, on_epoch), "node": ray.get_runtime_context().get_node_id()}
    # ASHA reads METRIC from every result: report it only when there is one
    tune.report({k: v for k, v in outcome.items() if v is not None})


class _Ray:
    """Trials as Ray Tune trials: local Ray with this machine's cores, or the cluster at ``address``."""

    def __init__(self, cfg: StudyConfig, warn: Say):
        import ray

        self.ray, self.cfg = ray, cfg
        self.tmp = Path(tempfile.mkdtemp(prefix="osteo-ray-"))  # Ray's session logs and Tune's files
        self.owned = not ray.is_initialized()  # a caller's Ray session is left running
        self.stages = 0
        if self.owned:
            quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
            # ray.init makes SIGTERM exit 1 with Ray's crash report: the caller's handler (the CLI's
            # stops the study in one line, exit code 143) is put back
            sigterm = signal.getsignal(signal.SIGTERM)
            try:
                if cfg.address:
                    # a cluster's workers have their node's environment, not this one's
                    ray.init(address=cfg.address, runtime_env={"env_vars": _forwarded_env()}, **quiet)
                else:
                    # trials pass their outcomes only: a small object store starts faster
                    ray.init(address="local", num_cpus=_local_cpus(), object_store_memory=LOCAL_OBJECT_STORE,
                             _temp_dir=str(self.tmp / "ray"), **quiet)
            except (OSError, RuntimeError, ValueError) as e:  # ConnectionError and TimeoutError too
                self.close()
                raise OsteoError(f"cannot start Ray{' at ' + cfg.address if cfg.address else ''}: {_first_line(e)}; "
                                 f"{_connect_fix(e)}") from None
            finally:
                if sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        self.where = f"on {'the Ray cluster at ' + cfg.address if cfg.address else 'local Ray'} " \
                     f"({cpus:g} CPUs, {gpus:g} GPUs; {cfg.cpus_per_trial:g} CPU, {cfg.gpus_per_trial:g} GPU a trial)"
        if cfg.cpus_per_trial > cpus or cfg.gpus_per_trial > gpus:
            self.close()
            raise OsteoError(f"a trial asks for {cfg.cpus_per_trial:g} CPUs and {cfg.gpus_per_trial:g} GPUs, but "
                             f"Ray has {cpus:g} and {gpus:g}; lower --cpus-per-trial / --gpus-per-trial")
        if gpus and not cfg.gpus_per_trial:
            warn(f"Ray has {gpus:g} GPUs but the trials get none (Ray hides them); "
                 "pass --gpus-per-trial 1 (or 0.5 for two trials a GPU)")

    def run(self, specs: list[dict], say: Say, search: bool = False) -> dict[str, dict]:
        from ray import tune

        by_id = {s["id"]: s for s in specs}
        self.stages += 1
        signals = _SignalStopper()
        trainable = tune.with_resources(tune.with_parameters(_tune_trial, specs=by_id),
                                        {"cpu": self.cfg.cpus_per_trial, "gpu": self.cfg.gpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"id": tune.grid_search(list(by_id))},
            tune_config=tune.TuneConfig(
                scheduler=_grouped_asha(by_id) if search else None,
                trial_name_creator=lambda t: t.config["id"], trial_dirname_creator=lambda t: t.config["id"]),
            run_config=tune.RunConfig(
                name=f"stage-{self.stages}", storage_path=str(self.tmp / "tune"), verbose=0,
                callbacks=[_say_callback(by_id, say, _Progress(specs), lambda: bool(signals.signals))],
                # a lost worker runs the trial again; it resumes, and counts the attempts already made
                failure_config=tune.FailureConfig(max_failures=RETRIES),
                stop=signals.stopper(tune)),
        )
        with _legacy_tune_output(), signals.catching():
            try:
                grid = tuner.fit()
            except Exception:
                if signals.signals:  # stopping made Tune fail: the stop is what happened
                    _mark_stopped(specs)
                signals.raise_if_caught()
                raise
        if signals.signals:
            _mark_stopped(specs)
        signals.raise_if_caught()
        return _outcomes(grid, by_id)

    def close(self) -> None:
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _outcomes(results, by_id: dict) -> dict:
    """Each trial's outcome from Tune's results: what it reported, else stopped by ASHA (nothing
    reported) or failed (lost for good). A trial whose worker never started has a result without
    its config (Ray's worker failed to import osteo, say): it failed, with that result's error,
    not a traceback of the study's."""
    out, unnamed = {}, []
    for result in results:
        trial_id = (result.config or {}).get("id")
        if trial_id not in by_id:
            unnamed.append(result)
            continue
        metrics = result.metrics or {}
        if "status" in metrics:
            out[trial_id] = {k: metrics.get(k) for k in OUTCOME}
            continue
        out[trial_id] = _lost_or_stopped(by_id[trial_id], result.error)
    errors = [e for e in (r.error for r in unnamed) if e is not None] or [RuntimeError("its worker did not start")]
    for trial_id in by_id.keys() - out.keys():
        out[trial_id] = _lost_or_stopped(by_id[trial_id], errors[0])
    return out


def _lost_or_stopped(spec: dict, error) -> dict:
    run = _trial_run(spec)  # stopped by ASHA (no outcome reported), or lost for good
    lost = error is not None
    return {"status": "failed" if lost else "stopped", "attempts": None, "retries": None,
            "run": str(run.path) if run is not None else "", "wall_seconds": None,
            "error": _first_line(error) if lost else "", METRIC: _best(run), "node": None}


class _SignalStopper:
    """SIGTERM and Ctrl-C while Tune runs: recorded, and Tune stops every trial at its next step
    (a Stopper's ``stop_all``); the stage then raises :class:`Stopped` or KeyboardInterrupt.
    Raised inside Ray's wait (Cython) instead, they became a SystemError or a result without a
    config, and the study a traceback with exit code 1. Tune's own Ctrl-C handler is kept out
    (``TUNE_DISABLE_SIGINT_HANDLER``), so one handler decides."""

    def __init__(self):
        self.signals: list[int] = []

    def stopper(self, tune):
        signals = self.signals

        class Stop(tune.Stopper):
            def __call__(self, trial_id, result) -> bool:
                return bool(signals)

            def stop_all(self) -> bool:
                return bool(signals)

        return Stop()

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """Outside the main thread (a caller's own Ray session) signals cannot be caught: Tune's
        and the caller's handling stay. A second signal meets the handlers from before (a second
        Ctrl-C interrupts a trial that does not stop)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before: dict[int, object] = {}

        def record(signum, frame):
            self.signals.append(signum)
            for s, handler in before.items():
                signal.signal(s, handler)

        before.update({s: signal.signal(s, record) for s in (signal.SIGTERM, signal.SIGINT)})
        tune_own = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
            if tune_own is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_own

    def raise_if_caught(self) -> None:
        """Tune has stopped its trials: the CLI says how to continue (exit code 143, or 130)."""
        if self.signals:
            raise Stopped if self.signals[0] == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def _legacy_tune_output():
    """Tune's newer console output prints a table per stage even at verbose=0; the older one
    is silent. (Read by Tune when a stage starts; restored after.)"""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old


def _check_reachable(address: str) -> None:
    """A cluster at ``host:port`` (or ``ray://host:port``) accepts a connection, or a one-line error
    in seconds: Ray's own client retried an address nothing answers on for minutes, silently."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():  # "auto", a name Ray resolves itself: Ray's to check
        return
    why = unreachable(host, int(port))
    if why:
        raise OsteoError(f"cannot reach the Ray cluster at {address}: {why}; check --address (or $RAY_ADDRESS): "
                         "the head node's host:port, or leave it out for Ray on this machine")


def _connect_fix(e: BaseException) -> str:
    """What to do when Ray cannot start or connect. A cluster with token authentication (Ray's
    default where a token exists) refuses a study without its token, and says so only in the
    text of an error deep in the chain."""
    texts = []
    while e is not None:
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    if any("AuthenticationError" in t or "InvalidAuthToken" in t for t in texts):
        return ("the cluster wants its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to its token file "
                "(or RAY_AUTH_TOKEN to the token) where the study runs")
    return "check --address (or $RAY_ADDRESS), or leave it out for Ray on this machine"


def _forwarded_env() -> dict[str, str]:
    """The variables a trial on a cluster gets from the study's environment, as a local trial
    would: osteo's own (the cache, MLflow's experiment, kill points), MLflow's and the backend."""
    return {k: v for k, v in os.environ.items() if k.startswith(("OSTEO_", "MLFLOW_")) or k == "KERAS_BACKEND"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _say_callback(by_id: dict, say: Say, progress: _Progress, interrupted: Callable[[], bool] = lambda: False):
    """Tune's callback that says each trial's start and end; a trial ended without its outcome was
    stopped by ASHA, or, when ``interrupted()``, by the user's stop of the whole study."""
    from ray import tune

    class SayLines(tune.Callback):
        """Trial start and end as ``say`` lines, in the driver."""

        def __init__(self, say: Say, progress: _Progress):
            self.say, self.progress = say, progress

        def __getstate__(self) -> dict:  # Tune pickles its settings; ``say`` may hold a console
            return {}

        def __setstate__(self, state: dict) -> None:
            self.say, self.progress = (lambda text: None), _Progress([])

        def on_trial_start(self, iteration, trials, trial, **info):
            self.say(_start_line(by_id[trial.config["id"]]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            spec = by_id[trial.config["id"]]
            result = trial.last_result or {}
            outcome = result if "status" in result else {"status": "interrupted" if interrupted() else "stopped",
                                                          METRIC: _best(_trial_run(spec))}
            self.say(_end_line(spec, outcome) + self.progress.ended_one(outcome))
            killpoints.reached("study.trial_ended")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.say(f"{_label(by_id[trial.config['id']])}: its Ray worker failed")

    return SayLines(say, progress)  # not from the closure: the class is pickled


def _grouped_asha(by_id: dict):
    """ASHA within each group of search trials (one outer fold): trials on another fold's inner
    split saw other data, so their scores must not rank against each other."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    class GroupedASHA(FIFOScheduler):
        def __init__(self):
            super().__init__()
            self.groups: dict[str, AsyncHyperBandScheduler] = {}

        def _of(self, trial) -> AsyncHyperBandScheduler:
            spec = by_id[trial.config["id"]]
            group = spec["group"]
            if group not in self.groups:
                # stop_last_trials=False: a trial that reaches the last epoch finishes its run
                self.groups[group] = AsyncHyperBandScheduler(
                    time_attr="epoch", metric=METRIC, mode="max", max_t=spec["epochs"], grace_period=1,
                    reduction_factor=ASHA_REDUCTION, stop_last_trials=False)
            return self.groups[group]

        def on_trial_add(self, tune_controller, trial):
            self._of(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller, trial, result):
            return self._of(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result):
            self._of(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller, trial):
            self._of(trial).on_trial_remove(tune_controller, trial)

    return GroupedASHA()


def _executor(cfg: StudyConfig, warn: Say, search: Search | None) -> _Sequential | _Ray:
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        if cfg.address or search:
            need = "--address" if cfg.address else "--search (ASHA)"
            raise OsteoError(f"{need} needs Ray Tune, which is not installed; "
                             "pip install 'osteo[study]' (or make study)") from None
        return _Sequential()
    return _Ray(cfg, warn)


# --------------------------------------------------------------------------- the study


@dataclass
class _Plan:
    """The study, checked before any trial starts."""

    id: str
    cwd: Path
    runs: Path
    out: Path
    seeds: list[int]
    recipes: dict  # model -> resolved Recipe (without the search's value)
    search: Search | None
    continued: bool = False  # the study of an earlier, stopped run of the same command
    external: list[Path] = field(default_factory=list)  # each final model is scored on these


def _build_recipe(cfg: StudyConfig, model: str, overrides: list[str]):
    """The resolved recipe of a trial of ``model`` given ``overrides`` (KEY=VALUE) too."""
    options = dataclasses.replace(cfg.options, overrides=(*cfg.options.overrides, *overrides))
    return build_recipe(cfg.recipe, model, options)


def _plan(cfg: StudyConfig) -> _Plan:
    from osteo.registry import get_backbone

    if not cfg.models:
        raise OsteoError("no models to study; pass --models, e.g. --models vgg16,densenet169")
    twice = sorted({m for m in cfg.models if cfg.models.count(m) > 1})
    if twice:
        raise OsteoError(f"--models lists {', '.join(twice)} more than once; for more runs of one model use --seeds")
    for m in cfg.models:
        get_backbone(m)
    if cfg.folds < 2:
        raise OsteoError(f"a study cross-validates: --folds must be 2 or more, got {cfg.folds}")
    if cfg.seeds < 1:
        raise OsteoError(f"--seeds must be 1 or more, got {cfg.seeds}")
    if cfg.cpus_per_trial <= 0 or cfg.gpus_per_trial < 0:
        raise OsteoError("--cpus-per-trial must be above 0 and --gpus-per-trial 0 or more")
    search = parse_search(cfg.search) if cfg.search else None
    recipes = {m: _build_recipe(cfg, m, []) for m in cfg.models}  # each fold's test split is its outer fold
    if search:
        if cfg.trials < 1:
            raise OsteoError(f"--trials must be 1 or more, got {cfg.trials}")
        if search.key.split(".")[0] == "data":  # the split and its images are what every trial is ranked on
            raise OsteoError(f"--search {search.key} would change the images the trials are ranked on; search a "
                             "training setting, such as train.lr or train.fine_tune_lr")
        for m, r in recipes.items():
            t = r.train  # first: a rate no epoch trains with is named as the study's search, not as a --set
            if (search.key == "train.lr" and not t.epochs) or (search.key == "train.fine_tune_lr"
                                                               and not t.fine_tune_epochs):
                raise OsteoError(f"{m}'s recipe trains no epochs with {search.key}; search the other rate "
                                 f"({'train.fine_tune_lr' if search.key == 'train.lr' else 'train.lr'})")
            for bound in (search.low, search.high):  # the key, its type and bounds, and the inner split
                try:
                    tried = _build_recipe(cfg, m, [*_inner_split(cfg.folds, 1), f"{search.key}={bound!r}"])
                except OsteoError as e:  # said of --search, where the recipe's own message names --set
                    raise OsteoError(f"--search {search.key}={bound:g} ({m}): {e}") from None
            value = tried
            for part in search.key.split("."):
                value = getattr(value, part)
            if not isinstance(value, float):
                raise OsteoError(f"--search {search.key} is not a number in the recipe; search one like "
                                 "train.lr or train.fine_tune_lr")
    cwd = Path.cwd()
    external = _check_external(cfg.external, {Path(r.data.dir).resolve() for r in recipes.values()})
    runs = (cwd / cfg.runs).resolve()
    out = (cwd / cfg.out).resolve()
    for data in {r.data.dir for r in recipes.values()}:  # nor where the study's own images are
        check_output_place(out, "--out", "choose a folder outside it, e.g. --out reports/study", data=data, folder=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    seeds = list(range(cfg.seeds))
    study_id = _unfinished_study(out, _config(cfg))  # the same command again continues it
    continued = study_id is not None
    for i in range(1, 0 if continued else 1000):  # a new id: no folder of this study may exist yet
        study_id = f"study-{stamp}" if i == 1 else f"study-{stamp}-{i}"
        paths = [runs / m / f"{study_id}-{tail}" for m in cfg.models for tail in [*(f"seed{s}" for s in seeds),
                                                                                   "search"]]
        if not any(p.exists() for p in paths):
            break
    return _Plan(study_id, cwd, runs, out, seeds, recipes, search, continued, external)


def _config(cfg: StudyConfig) -> dict:
    """What makes two studies the same study (``study.json`` records it)."""
    return {"models": cfg.models, "recipe": cfg.recipe, "folds": cfg.folds, "seeds": cfg.seeds, "runs": cfg.runs,
            "train_args": cfg.options.as_args(), "search": cfg.search, "trials": cfg.trials if cfg.search else None}


def _record_stopped(path: Path, error: BaseException) -> None:
    """``study.json`` says the study stopped, and why (it said running): the same command
    continues it, with its finished trials kept."""
    try:
        study = read_json(path)
    except (OSError, ValueError):
        return
    if isinstance(study, dict):
        why = (str(error) if isinstance(error, OsteoError) else "stopped by SIGTERM" if isinstance(error, Stopped)
               else "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else type(error).__name__)
        write_json(path, {**study, "status": "stopped", "error": why})


def _unfinished_study(out: Path, config: dict) -> str | None:
    """The id of the study ``out/study.json`` records, if it was stopped before its report and
    had this configuration: its finished trials are kept and the others resume."""
    try:
        study = read_json(out / "study.json")
    except (OSError, ValueError):
        return None
    if isinstance(study, dict) and study.get("status") in ("running", "stopped") and study.get("config") == config \
            and isinstance(study.get("id"), str) and re.fullmatch(r"study-[0-9-]+", study["id"]):
        return study["id"]
    return None


def _check_external(folders: list[str], data: set[Path]) -> list[Path]:
    """The external folders, resolved; each a labelled folder of images (class sub-folders) that
    is not the study's data, with a name of its own (its scorings are ``eval/<name>/``)."""
    from osteo.data.scan import list_files

    out = [Path(f).resolve() for f in folders]
    for given, path in zip(folders, out):
        if path in data:
            raise OsteoError(f"--external {given} is the study's own --data; give another hospital's folder")
        try:
            images = list_files(path)[0]
        except OsteoError as e:  # no such folder, or no class folders in it
            raise OsteoError(f"--external {given}: {e}") from None
        if not images:
            raise OsteoError(f"--external {given} holds no images under normal/, osteopenia/ or osteoporosis/; "
                             "give a labelled folder, as for --data")
    names = [p.name for p in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OsteoError(f"two --external folders are named {twice[0]} (the report tells them apart by name); "
                         "give each its own name, e.g. by a symbolic link")
    return out


def _inner_split(folds: int, fold: int) -> list[str]:
    """The overrides of nested cross-validation's inner split of outer fold ``fold`` (1..K), the
    split that fold's trial (osteo.session.cross_validate) chooses its checkpoint on too."""
    return [f"data.folds={folds}", f"data.fold={fold - 1}", f"data.inner_val={INNER_VAL}", "data.test=0"]


def _sets(overrides: list[str]) -> list[str]:
    """``--set KEY=VALUE`` for each override, as ``osteo train`` takes them."""
    return [arg for item in overrides for arg in ("--set", item)]


def _spec(plan: _Plan, cfg: StudyConfig, kind: str, model: str, seed: int, fold: int, args: list[str], **more) -> dict:
    return {"kind": kind, "model": model, "seed": seed, "fold": fold, "recipe": cfg.recipe, "cwd": str(plan.cwd),
            "retries": RETRIES, "run": "", "root": "",
            "args": ["train", cfg.recipe, *cfg.options.as_args(), "--model", model, "--seed", str(seed), *args],
            **more}


def _cv_path(plan: _Plan, model: str, seed: int) -> Path:
    return plan.runs / model / f"{plan.id}-seed{seed}"


def _search_specs(plan: _Plan, cfg: StudyConfig) -> list[dict]:
    s = plan.search
    specs = []
    for m in cfg.models:
        r = plan.recipes[m]
        for seed in plan.seeds:
            for fold in range(1, cfg.folds + 1):
                group = f"{m}-seed{seed}-fold{fold}"
                values = s.values(cfg.trials, [seed, fold, zlib.crc32(m.encode())])
                for t, value in enumerate(values, start=1):
                    root = plan.runs / m / f"{plan.id}-search" / f"seed{seed}-fold{fold}" / f"t{t}"
                    setting = f"{s.key}={value!r}"
                    specs.append(_spec(
                        plan, cfg, "search", m, seed, fold,
                        ["--runs", str(root), *_sets([*_inner_split(cfg.folds, fold), "train.bootstrap=0", setting])],
                        id=f"{group}-t{t}", group=group, value=value, set=setting, root=str(root),
                        log=str(root / "trial.log"), epochs=r.train.epochs + r.train.fine_tune_epochs))
    return specs


def _choose(specs: list[dict], outcomes: dict[str, dict], warn: Say) -> dict[str, dict]:
    """Each outer fold's value: the one whose trial reached the best validation macro F1 on
    the fold's inner split (value None: no trial finished an epoch)."""
    chosen = {}
    for group in dict.fromkeys(s["group"] for s in specs):
        members = [s for s in specs if s["group"] == group]
        first = members[0]
        scored = [(outcomes[s["id"]][METRIC], s) for s in members if outcomes[s["id"]][METRIC] is not None]
        chosen[group] = {"model": first["model"], "seed": first["seed"], "fold": first["fold"], "value": None}
        if not scored:
            warn(f"search {group}: no trial finished an epoch (logs under {Path(first['root']).parent}); "
                 "this fold is not trained")
            continue
        best, spec = max(scored, key=lambda x: x[0])  # the first of equals: trials in order
        chosen[group].update(value=spec["value"], set=spec["set"], trial=spec["id"], **{METRIC: best})
    return chosen


def _record_search(plan: _Plan, cfg: StudyConfig, chosen: dict[str, dict]) -> None:
    """Each cross-validation's cv.json says what its search chose for each fold, on the fold's inner
    split: the report says it beside the pooled numbers (which that choice did not see)."""
    for m in cfg.models:
        for seed in plan.seeds:
            cv = CvDir(_cv_path(plan, m, seed))
            values = [chosen.get(f"{m}-seed{seed}-fold{fold}", {}).get("value") for fold in range(1, cfg.folds + 1)]
            write_json(cv.manifest_path, {**cv.read(), "searched": {plan.search.key: values}})


def _prune_search_runs(specs: list[dict]) -> None:
    """A search trial's weights and resume state are large and never used again; its
    recipe, split, history and log stay as the search's record."""
    for s in specs:
        for p in Path(s["root"]).glob("*/*"):
            run = RunDir(p)
            shutil.rmtree(run.backup_path, ignore_errors=True)
            run.best_path.unlink(missing_ok=True)


def _fold_specs(plan: _Plan, cfg: StudyConfig, chosen: dict[str, dict] | None) -> tuple[list[dict], list[dict]]:
    """The fold trials to run, and those not run (their search failed)."""
    specs, skipped = [], []
    for m in cfg.models:
        for seed in plan.seeds:
            cv = _cv_path(plan, m, seed)
            for fold in range(1, cfg.folds + 1):
                group = f"{m}-seed{seed}-fold{fold}"
                value = chosen[group] if chosen is not None else None
                extra = ["--set", value["set"]] if value and value["value"] is not None else []
                spec = _spec(plan, cfg, "fold", m, seed, fold,
                             ["--folds", str(cfg.folds), "--fold", str(fold), "--cv", str(cv), *extra],
                             id=group, run=str(CvDir(cv).fold(fold).path), log=str(cv / f"fold-{fold}.log"),
                             set=" ".join(extra[1:]))
                (skipped if value and value["value"] is None else specs).append(spec)
    return specs, skipped


def _external_specs(plan: _Plan, cfg: StudyConfig) -> list[dict]:
    """A scoring of each finished cross-validation's fold models, as one ensemble, on each
    external folder (``CV/eval/<folder>/``); an unfinished one has no final model to score."""
    specs = []
    for m in cfg.models:
        for seed in plan.seeds:
            cv = CvDir(_cv_path(plan, m, seed))
            if not cv.is_finished():
                continue
            for folder in plan.external:
                out = cv.eval_path / folder.name
                specs.append({
                    "kind": "external", "id": f"{m}-seed{seed}-{folder.name}", "model": m, "seed": seed,
                    "fold": None, "name": folder.name, "folder": str(folder), "cwd": str(plan.cwd),
                    "retries": RETRIES, "run": str(out), "log": str(cv.eval_path / f"{folder.name}.log"),
                    "args": ["eval", str(cv.path), "--data", str(folder), "--out", str(out),
                             "--bootstrap", str(plan.recipes[m].train.bootstrap)]})
    return specs


def _trial_record(spec: dict, outcome: dict) -> dict:
    keep = ("id", "kind", "model", "seed", "fold", "set", "folder", "log")
    return {**{k: spec.get(k) for k in keep}, **outcome,
            "command": "osteo " + " ".join(spec["args"])}


def run_study(cfg: StudyConfig, say: Say, warn: Say) -> Path:
    """Run the study; return its report page (``cfg.out/index.html``). See the module's docstring.

    The study holds its ``--out`` folder: a second study there stops in one line (the two had
    each written study.json and the report, the last one's kept)."""
    started = datetime.datetime.now()
    t0 = time.monotonic()
    plan = _plan(cfg)
    if cfg.address:
        _check_reachable(cfg.address)  # before anything is made, --out included
    with folder_lock(plan.out, "a study's record and report", wait=False):
        if not plan.continued:
            with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
                earlier = read_json(plan.out / "study.json")
                # this process holds the folder: a study recorded as running there was killed
                status = "finished" if earlier["status"] == "finished" else "stopped before it ended"
                warn(f"{plan.out} holds the study {earlier['id']} ({status}, of "
                     f"{'these' if earlier.get('config') == _config(cfg) else 'other'} settings): this starts a "
                     "new study, whose record and report replace its there (its runs stay where they are)")
        return _run_planned(cfg, plan, say, warn, started, t0)


def _run_planned(cfg: StudyConfig, plan: _Plan, say: Say, warn: Say, started: datetime.datetime,
                 t0: float) -> Path:
    from osteo.report import write_report

    search = plan.search
    if cfg.mlflow or os.environ.get("MLFLOW_TRACKING_URI"):
        from osteo import tracking

        # one experiment per study, in one store whatever folder a trial runs in (set before Ray
        # starts its workers, which inherit this environment)
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking.tracking_uri())
        os.environ["OSTEO_MLFLOW_EXPERIMENT"] = f"osteo-study-{plan.id}"
    executor = _executor(cfg, warn, search)
    out = plan.out
    if plan.continued:
        say(f"study {plan.id}: continuing (its finished trials are kept)")
    else:  # recorded before any trial, so a stopped study is continued by the same command
        write_json(out / "study.json", {"id": plan.id, "status": "running", "config": _config(cfg)})

    n_grid = len(cfg.models) * len(plan.seeds) * cfg.folds
    records, chosen, search_specs, scorings, scored = [], None, [], [], {}
    try:
        audited: dict[str, list[dict]] = {}  # one audit per data folder, for every backbone and seed
        for m, r in plan.recipes.items():
            ensure_phantom(r, say)  # here, before concurrent trials race to write it
            for seed in plan.seeds:  # likewise cv.json, once every fold of the seed's split can be scored
                if not CvDir(_cv_path(plan, m, seed)).is_cv():
                    if r.data.dir not in audited:  # at the sizes of every model on the folder
                        audited[r.data.dir] = audited_rows(r, [o for o in plan.recipes.values()
                                                               if o.data.dir == r.data.dir])
                    seeded = copy.deepcopy(r)
                    seeded.train.seed = seed
                    check_folds(seeded, cfg.folds, audited[r.data.dir])
                CvDir(_cv_path(plan, m, seed)).start(folds=cfg.folds, seed=seed, recipe=r.name, model=m, data=r.data.dir)
        if search:
            search_specs = _search_specs(plan, cfg)
            say(f"study {plan.id}: searching {search.key} in [{search.low:g}, {search.high:g}]"
                f"{' (log)' if search.log else ''} with ASHA, {cfg.trials} trials for each of the {n_grid} "
                f"outer folds, on their inner splits, {executor.where}")
            outcomes = executor.run(search_specs, say, search=True)
            records += [_trial_record(s, outcomes[s["id"]]) for s in search_specs]
            chosen = _choose(search_specs, outcomes, warn)
            _record_search(plan, cfg, chosen)
            _prune_search_runs(search_specs)
            for group, c in chosen.items():
                if c["value"] is not None:
                    say(f"search {group}: chose {c['set']} (val macro F1 {c[METRIC]:.3f} on its inner split)")
        specs, skipped = _fold_specs(plan, cfg, chosen)
        say(f"study {plan.id}: {_count(len(specs), 'trial')} ({_count(len(cfg.models), 'model')} x "
            f"{_count(len(plan.seeds), 'seed')} x {cfg.folds} folds) {executor.where}")
        outcomes = executor.run(specs, say)
        scorings = _external_specs(plan, cfg)
        if scorings:
            say(f"study {plan.id}: scoring each backbone's final model (its {cfg.folds} fold models as one "
                f"ensemble) on {', '.join(p.name for p in plan.external)}: {_count(len(scorings), 'scoring')} "
                f"{executor.where}")
            scored = executor.run(scorings, say)
    except BaseException as e:  # a data check, a stop: said in the record, which the same command continues
        _record_stopped(out / "study.json", e)
        raise
    finally:
        executor.close()
    records += [_trial_record(s, outcomes[s["id"]]) for s in specs]
    records += [_trial_record(s, scored[s["id"]]) for s in scorings]
    records += [_trial_record(s, {"status": "failed", "error": "its search trained no epoch", "retries": 0})
                for s in skipped]
    for rec in records:
        if rec["kind"] == "fold" and rec["status"] != "ok":
            warn(f"trial {rec['model']} seed {rec['seed']} fold {rec['fold']} failed: {rec['error']}; "
                 f"its cross-validation is left incomplete (log: {rec['log']})")
        elif rec["kind"] == "external" and rec["status"] != "ok":
            warn(f"scoring {rec['model']} seed {rec['seed']} on {rec['folder']} failed: {rec['error']}; "
                 f"its row is left out of the report (log: {rec['log']})")
    cvs = [CvDir(_cv_path(plan, m, s)) for m in cfg.models for s in plan.seeds]
    summary = {
        "id": plan.id, "started": started.isoformat(timespec="seconds"), "executor": executor.where,
        "address": cfg.address, "models": cfg.models, "recipe": cfg.recipe, "folds": cfg.folds, "seeds": plan.seeds,
        "train_args": cfg.options.as_args(), "retries_allowed": RETRIES,
        "search": None if not search else {
            "key": search.key, "low": search.low, "high": search.high, "log": search.log, "trials": cfg.trials,
            "scheduler": f"ASHA per outer fold: grace 1 epoch, reduction {ASHA_REDUCTION}, on {METRIC}",
            "inner_split": f"outer fold held out as test; {INNER_VAL} of the rest is validation",
            "chosen": list(chosen.values())},
        "cross_validations": [{"path": str(c.path), "finished": c.is_finished()} for c in cvs],
        "external": [str(p) for p in plan.external],
        "final_model": "per backbone and seed, its fold models as one ensemble: the mean of their calibrated "
                       "probabilities, an operating point at the mean of their thresholds (osteo.predict.Ensemble)",
        "trials": records, "status": "running", "config": _config(cfg),
    }

    def write_summary(**more) -> None:
        wall = round(time.monotonic() - t0, 1)
        write_json(out / "study.json", {**summary, "wall_seconds": wall, **more})

    write_summary()  # before the report: a report that fails leaves the record of the trials
    if not any(c.is_finished() for c in cvs):
        raise OsteoError(f"no cross-validation of study {plan.id} finished, so there is nothing to report; "
                         f"see the failed trials in {out / 'study.json'} and their logs")
    page = write_report(cvs, out, warn=warn)  # an unfinished one is named on the page as left out
    write_summary(report=str(page), status="finished")
    if cfg.mlflow or os.environ.get("MLFLOW_TRACKING_URI"):  # the study's report beside its trials' runs
        from osteo import tracking

        tracking.log_report(out, f"{plan.id} report")
    done = sum(r["status"] == "ok" for r in records if r["kind"] == "fold")
    say(f"study {plan.id}: {done} of {n_grid} fold trials done{f', {n_grid - done} failed' if done < n_grid else ''} "
        f"in {time.monotonic() - t0:.0f}s; wrote {out / 'study.json'}")
    return page
