"""osteo study on a real two-node Ray cluster, started on this machine for the test (loopback only).

Each node is a ``ray start --block`` process in a session of its own, so the cluster is
stopped by its process groups' ids whatever happens. ``ray stop`` is not used: it kills
every Ray process on the machine by name, other studies' and other tests' included. Ray's
GCS and raylets listen on every interface whatever the node's address, so the cluster
wants a token (Ray's token authentication): a process without it can do nothing there.
"""

import contextlib
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Ray turns 127.0.0.1 into the machine's address on its network; 127.0.0.2 is loopback too, and
# Ray keeps it, so every address the cluster gives out is a loopback one
NODE_IP = "127.0.0.2"
STARTED = "Ray runtime started"  # what `ray start` prints once its node is up and registered
START_SECONDS = 180  # a bound on a node's start on a loaded machine, not a measurement
STUDY_SECONDS = 900
START_ATTEMPTS = 3  # a cluster whose ports were taken between asking and binding is started again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """``ray start ARGS --block``: the node lives as long as this process, in a session of its own."""
    common = ["--node-ip-address", NODE_IP, "--num-cpus", "1", "--object-store-memory", str(80 * 2**20),
              "--dashboard-agent-listen-port", str(_free_port()), "--disable-usage-stats", "--block"]
    with open(log, "w", encoding="utf-8") as out:
        return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", *args, *common], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


class _NodeDidNotStart(Exception):
    """A node that exited, or did not say it was up in time; its log's end is the message."""


def _wait_started(node: subprocess.Popen, log: Path) -> None:
    """Until ``log`` says the node is up (bounded); raises _NodeDidNotStart if it exits first or
    takes longer."""
    deadline = time.monotonic() + START_SECONDS
    while STARTED not in log.read_text(encoding="utf-8", errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            raise _NodeDidNotStart(log.read_text(encoding="utf-8", errors="replace")[-2000:])
        time.sleep(0.2)


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM to ``ray start``, which stops its node's processes; then SIGKILL to whatever of its
    session is left (a worker, a trial)."""
    with contextlib.suppress(ProcessLookupError):
        node.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and a worker node of 1 CPU and 80 MB of object store each, on loopback, no dashboard,
    a token of its own; yields its address and the environment its nodes were started with (the
    token's included)."""
    pytest.importorskip("ray")
    if not sys.platform.startswith("linux"):
        pytest.skip("Ray runs multi-node clusters on Linux only")
    # Ray's Unix sockets live under its temp dir, and a socket's path has at most 107 bytes: one
    # under pytest's tmp_path is longer, so a short folder of its own, removed after
    tmp = Path(tempfile.mkdtemp(prefix="osteo-ray-"))
    token = tmp / "token"
    token.write_text(secrets.token_hex(32), encoding="utf-8")
    node_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "OSTEO_CACHE": str(tmp / "node-cache")}
    nodes: list[subprocess.Popen] = []
    try:
        # the free ports are free when asked for and may be taken before Ray binds them; a cluster
        # that does not start is started again on other ports (and its logs kept for the failure)
        failures = []
        for attempt in range(START_ATTEMPTS):
            port, logs = _free_port(), tmp / f"attempt-{attempt}"
            logs.mkdir()
            try:
                nodes.append(_node(["--head", "--port", str(port), "--include-dashboard=false",
                                    "--ray-client-server-port", str(_free_port()), "--temp-dir", str(tmp)],
                                   logs / "head.log", node_env))
                _wait_started(nodes[-1], logs / "head.log")
                nodes.append(_node(["--address", f"{NODE_IP}:{port}"], logs / "worker.log", node_env))
                _wait_started(nodes[-1], logs / "worker.log")
                break
            except _NodeDidNotStart as e:
                failures.append(str(e))
                for node in reversed(nodes):
                    _stop(node)
                nodes.clear()
        else:
            pytest.fail("the Ray cluster did not start in {} attempts: {}".format(START_ATTEMPTS,
                                                                               "\n---\n".join(failures)))
        yield f"{NODE_IP}:{port}", node_env
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(tmp, ignore_errors=True)


def _study(address: str, phantom_dir, tmp_path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    """``osteo study`` of 1 backbone x 2 folds, the tests' tiny settings, on the cluster at ``address``."""
    return subprocess.run(
        [sys.executable, "-m", "osteo.cli", "study", "--models", "tiny", "--recipe", "seed", "--folds", "2",
         "--data", str(phantom_dir), "--weights", "none", "--image-size", "32", "--epochs", "2",
         "--set", "train.steps_per_epoch=2", "--set", "train.tensorboard=false", "--set", "train.bootstrap=20",
         "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--address", address, *extra],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=STUDY_SECONDS)


@pytest.mark.slow  # Ray retries the connection for about 20 s before it gives up
def test_a_study_without_the_clusters_token_is_told_how_to_give_it(ray_cluster, phantom_dir, tmp_path):
    address, node_env = ray_cluster
    env = {k: v for k, v in node_env.items() if not k.startswith("RAY_AUTH_")}
    study = _study(address, phantom_dir, tmp_path, {**env, "RAY_AUTH_MODE": "disabled"})
    assert study.returncode == 2  # after Ray's own warnings, one per second it retried
    assert study.stderr.strip().splitlines()[-1:] == [
        f"osteo: error: cannot start Ray at {address}: Failed to connect to Ray cluster at {address}; the cluster "
        "wants its token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to its token file (or RAY_AUTH_TOKEN to "
        "the token) where the study runs"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # 55-70 s of make test's 11 min: two Ray nodes and a study; make test-all runs it
def test_a_study_on_a_two_node_cluster_runs_trials_on_both_and_reports_them(ray_cluster, phantom_dir, tmp_path):
    """1 backbone x 2 folds, each trial 1 CPU on nodes of 1 CPU: the folds run at once, one on each
    node; then the fold models' ensemble is scored on another folder, and the report has both rows.
    The trials see the study's environment, not their node's (the image cache they fill is the
    study's)."""
    from osteo.data.phantom import write_phantom

    address, node_env = ray_cluster
    other = tmp_path / "hospital-b"
    write_phantom(other, n=30, size=64, seed=11)
    env = {**node_env, "OSTEO_CACHE": str(tmp_path / "study-cache")}
    study = _study(address, phantom_dir, tmp_path, env, "--external", str(other))
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    record = json.loads((tmp_path / "report" / "study.json").read_text(encoding="utf-8"))
    assert f"the Ray cluster at {address} (2 CPUs" in record["executor"]
    folds = [t for t in record["trials"] if t["kind"] == "fold"]
    assert [t["status"] for t in folds] == ["ok", "ok"]
    assert len({t["node"] for t in folds}) == 2, "both folds ran on one node"
    assert all(len(t["node"]) == 56 for t in folds)  # Ray's node ids: 28 bytes in hex
    scoring = next(t for t in record["trials"] if t["kind"] == "external")
    assert scoring["status"] == "ok" and scoring["node"] in {t["node"] for t in folds}
    with open(tmp_path / "report" / "comparison.csv", newline="", encoding="utf-8") as f:
        rows = {r["evaluated_on"]: r for r in csv.DictReader(f) if r["model"] == "tiny"}
    assert set(rows) == {"out-of-fold", "external: hospital-b"}
    assert rows["out-of-fold"]["run_id"] == rows["external: hospital-b"]["run_id"] == f"{record['id']}-seed0"
    assert (tmp_path / "report" / "index.html").is_file()
    cache = tmp_path / "study-cache"
    assert cache.is_dir() and any(cache.iterdir()) and not Path(node_env["OSTEO_CACHE"]).exists()
