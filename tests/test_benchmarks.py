"""The benchmarks' bookkeeping: interleaving order, ratios, spreads and flags (no model is built)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import agree
import feed
import input_pipeline
import models


def _row(name, kind, rates, feed="memory", worker=None, **extra):
    return {"row": name, "worker": worker or name, "kind": kind, "feed": feed,
            "rounds": [{"round": i, "img_s": r} for i, r in enumerate(rates) if r is not None], **extra}


def _group(*rows, model="convnext_tiny"):
    return {"model": model, "size": 64, "batch": 16, "rows": list(rows)}


def _summary(group, name):
    return next(s for s in models.summarize(group) if s["row"] == name)


def test_each_row_takes_each_place_once_over_as_many_rounds():
    names = ["auto", "cf", "cl"]
    orders = [models.round_order(names, r) for r in range(3)]
    assert all(sorted(o) == names for o in orders)
    for place in range(3):
        assert sorted(o[place] for o in orders) == names


def test_ratio_is_taken_against_the_best_peer_of_the_same_round():
    # round 1 ran slow for everyone: the ratio stays 1.0 although the medians differ
    g = _group(_row("auto", "osteo", [50, 25, 50]), _row("cf", "timm", [40, 20, 40]), _row("cl", "timm", [50, 25, 50]))
    s = _summary(g, "auto")
    assert s["ratios"] == [1.0, 1.0, 1.0]
    assert s["status"] == "ok" and s["ratio"] == 1.0
    assert s["img_s"] == 50


def test_the_imports_probe_is_compared_with_cl_and_is_never_timms_best():
    # cl-keras ran faster than cl in every round: the ratio is still taken against cl
    g = _group(_row("auto", "osteo", [50, 49, 51]), _row("cl", "timm", [50, 50, 50]),
               _row("cl-keras", "timm", [60, 55, 50]))
    assert _summary(g, "auto")["ratios"] == [1.0, 0.98, 1.02]
    probe = _summary(g, "cl-keras")
    assert probe["status"] == "probe" and probe["vs_cl"] == 1.1


def test_rounds_that_disagree_by_more_than_the_margin_are_flagged():
    g = _group(_row("auto", "osteo", [50, 40, 50]), _row("cl", "timm", [50, 50, 50]))
    s = _summary(g, "auto")
    assert s["ratio_spread"] == pytest.approx(0.2)
    assert s["status"] == "FLAGGED"
    g = _group(_row("auto", "osteo", [50, 48, 50]), _row("cl", "timm", [50, 50, 50]))
    assert _summary(g, "auto")["status"] == "ok"


def test_from_five_rounds_one_outlier_at_each_end_does_not_flag():
    peer = _row("cl", "timm", [50] * 5)
    one_burst = _group(_row("auto", "osteo", [50, 49, 20, 51, 70]), peer)
    s = _summary(one_burst, "auto")
    assert s["status"] == "ok"
    assert (s["ratio_min"], s["ratio_max"]) == (0.4, 1.4)  # the table still shows the whole range
    two_bursts = _group(_row("auto", "osteo", [50, 30, 20, 51, 70]), peer)
    assert _summary(two_bursts, "auto")["status"] == "FLAGGED"


def test_a_single_window_or_an_error_is_never_a_verdict():
    g = _group(_row("keras-torch", "osteo", [20]), _row("auto", "osteo", [40, 41]), _row("cl", "timm", [40, 40]),
               _row("keras-tf", "osteo", [], error="worker exited with status 1"))
    assert _summary(g, "keras-torch")["status"] == "1 window"
    assert _summary(g, "keras-tf")["status"].startswith("error: worker exited")
    assert _summary(g, "cl")["status"] == "reference"


def _busy(row, shares):
    for rnd, share in zip(row["rounds"], shares):
        rnd["others"] = share
    return row


def test_a_ratio_measured_while_other_processes_took_the_cpu_is_busy_not_reported():
    # every round agrees (the spread cannot see a steady neighbour), but others took 40% of the CPU
    g = _group(_row("auto", "osteo", [46, 46, 47]), _busy(_row("cl", "timm", [50, 50, 50]), [0.4, 0.38, 0.41]))
    s = _summary(g, "auto")
    assert s["ratio_spread"] < models.FLAG_SPREAD and s["others"] == 0.4 and s["status"] == "BUSY"
    # a burst in one of five windows leaves the median quiet; a median share at the margin is still quiet
    g = _group(_busy(_row("auto", "osteo", [50] * 5), [0.003, 0.5, 0.004, 0.05, 0.002]), _row("cl", "timm", [50] * 5))
    assert _summary(g, "auto")["status"] == "ok"
    g = _group(_busy(_row("auto", "osteo", [50] * 3), [0.05, 0.05, 0.3]), _row("cl", "timm", [50] * 3))
    assert _summary(g, "auto")["others"] == 0.05 and _summary(g, "auto")["status"] == "ok"
    # one window is no verdict on a quiet machine, and none on a busy one either
    g = _group(_busy(_row("keras-torch", "osteo", [20]), [0.45]), _row("cl", "timm", [40]))
    assert _summary(g, "keras-torch")["status"] == "BUSY"
    # reports written before the share was recorded: no verdict on business either way
    g = _group(_row("auto", "osteo", [50] * 3), _row("cl", "timm", [50] * 3))
    assert _summary(g, "auto")["others"] is None and _summary(g, "auto")["status"] == "ok"
    busy = {"groups": [_group(_row("auto", "osteo", [46] * 5), _busy(_row("cl", "timm", [50] * 5), [0.4] * 5))]}
    quiet = {"groups": [_group(_row("auto", "osteo", [52] * 5), _row("cl", "timm", [50] * 5))]}
    (entry,) = agree.compare(quiet, busy)
    assert entry["verdict"] == "not compared" and entry["b_status"] == "BUSY"  # 1.04 vs 0.92 would disagree


def test_the_machine_share_of_other_processes_counts_a_childs_cpu():
    if models.machine_cpu_s() is None:
        pytest.skip("no /proc/stat here")
    before, own, t = models.machine_cpu_s(), time.process_time(), time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", "x = 0\nfor i in range(6_000_000): x += i"])
    _, _, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t
    share = models.others_share(before, time.process_time() - own, wall)
    child_cpu = usage.ru_utime + usage.ru_stime
    assert child_cpu > 0.1
    # the whole machine's busy time less ours holds at least the child's (jiffies: 10 ms steps)
    assert share * models._machine_cores() * wall >= child_cpu - 0.05


def test_two_runs_agree_only_where_both_report_ratios_within_the_margin(tmp_path, capsys):
    peer = _row("cl", "timm", [50] * 5)
    a = {"groups": [_group(_row("auto", "osteo", [50] * 5), peer, model="vgg16"),
                    _group(_row("auto", "osteo", [54] * 5), peer, model="convnext_tiny"),
                    _group(_row("auto", "osteo", [50, 30, 20, 51, 70]), peer, model="densenet169")]}
    b = {"groups": [_group(_row("auto", "osteo", [48] * 5), peer, model="vgg16"),  # 1.00 and 0.96
                    _group(_row("auto", "osteo", [44] * 5), peer, model="convnext_tiny"),  # 1.08 and 0.88
                    _group(_row("auto", "osteo", [50] * 5), peer, model="densenet169")]}  # flagged in a
    got = {r["model"]: r for r in agree.compare(a, b)}
    assert got["vgg16"]["verdict"] == "agree" and got["vgg16"]["difference"] == pytest.approx(0.04 / 0.98)
    assert got["convnext_tiny"]["verdict"] == "DISAGREE"  # each run self-consistent, the answer moved 20%
    assert got["densenet169"]["verdict"] == "not compared" and got["densenet169"]["a_status"] == "FLAGGED"
    wider = {r["model"]: r for r in agree.compare(a, b, margin=0.25)}
    assert wider["convnext_tiny"]["verdict"] == "agree"
    paths = []
    for name, report in (("a", a), ("b", b), ("b-vgg", {"groups": b["groups"][:1]})):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    assert agree.main([str(paths[0]), str(paths[1])]) == 1
    assert "1 of 3 rows agree within 10%, 1 disagree, 1 not compared" in capsys.readouterr().out
    assert agree.main([str(paths[0]), str(paths[2])]) == 0
    (tmp_path / "half.json").write_text('{"groups": [')
    assert agree.main([str(paths[0]), str(tmp_path / "half.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def _pipeline_rows(**rates):
    """input_pipeline.py's ``rows``: "PNG: <row>" -> samples, one a round (None: no ``round`` kept)."""
    names = {"idg": input_pipeline.PEERS[0], "idfd": input_pipeline.PEERS[1], "osteo": input_pipeline.OSTEO_FIRST,
             "later": "osteo later epoch (memory)"}
    return {f"PNG: {names[k]}": {"samples": [{"images_per_s": r} if keep is None else {"round": keep, "images_per_s": r}
                                             for keep, r in v]}
            for k, v in rates.items()}


def test_input_pipeline_ratios_are_taken_round_by_round_and_flagged_past_the_margin():
    # round 1 ran at half speed for everyone: osteo / ImageDataGenerator stays 2.0 in every round
    rows = _pipeline_rows(idg=[(0, 100), (1, 50), (2, 105)], idfd=[(0, 400), (1, 200), (2, 100)],
                          osteo=[(0, 200), (1, 100), (2, 210)], later=[(0, 5000), (1, 5000), (2, 5000)])
    got = input_pipeline.round_ratios(rows)
    first = f"PNG: {input_pipeline.OSTEO_FIRST}"
    vs_idg, vs_idfd = got[f"{first} / {input_pipeline.PEERS[0]}"], got[f"{first} / {input_pipeline.PEERS[1]}"]
    assert vs_idg["ratios"] == [2.0, 2.0, 2.0] and vs_idg["status"] == "ok" and vs_idg["ratio_spread"] == 0
    assert vs_idfd["ratios"] == [0.5, 0.5, 2.1] and vs_idfd["status"] == "FLAGGED"
    assert vs_idfd["ratio"] == 0.5  # the median round's, not the ratio of the medians (200 / 200 = 1.0)
    assert not any("later epoch" in k for k in got)  # no target compares a later epoch with a first one
    assert got[f"PNG: {input_pipeline.PEERS[0]} / {input_pipeline.PEERS[1]}"]["ratios"] == [0.25, 0.25, 1.05]
    # rounds are matched by their number; a report without numbers pairs them in order
    shuffled = _pipeline_rows(idg=[(1, 50), (0, 100)], idfd=[(0, 400), (1, 400)], osteo=[(0, 200), (1, 100)])
    assert input_pipeline.round_ratios(shuffled)[f"{first} / {input_pipeline.PEERS[0]}"]["ratios"] == [2.0, 2.0]
    old = _pipeline_rows(idg=[(None, 100)], idfd=[(None, 400)], osteo=[(None, 300)])
    assert input_pipeline.round_ratios(old)[f"{first} / {input_pipeline.PEERS[0]}"]["status"] == "1 round"


def test_input_pipeline_writes_to_a_json_file_named_by_out_or_into_a_folder(tmp_path):
    """--out takes a .json file as models.py's does (a run once made a folder of that name)."""
    input_pipeline._write({"rows": 1}, str(tmp_path / "busy.json"), "")
    input_pipeline._write({"rows": 2}, str(tmp_path / "busy.json"), "-stages")
    assert json.loads((tmp_path / "busy.json").read_text()) == {"rows": 1}
    assert json.loads((tmp_path / "busy-stages.json").read_text()) == {"rows": 2}
    input_pipeline._write({"rows": 3}, str(tmp_path / "folder"), "")
    (made,) = (tmp_path / "folder").iterdir()
    assert made.name.startswith("input_pipeline-") and json.loads(made.read_text()) == {"rows": 3}


def test_a_row_repeats_its_first_epoch_until_the_minimum_time_and_pools_the_passes():
    calls = []

    def one_pass(images):
        calls.append(images)
        return {"images": images, "wall_s": 0.4, "cpu_s": 0.8, "images_per_s": images / 0.4}

    got = input_pipeline.repeated(1.0, one_pass, 10)
    assert calls == [10, 10, 10] and got["passes"] == 3
    assert got["images"] == 30 and got["wall_s"] == pytest.approx(1.2) and got["images_per_s"] == 25.0
    assert got["cpu_ms_per_image"] == pytest.approx(80.0)
    assert input_pipeline.repeated(0.0, one_pass, 10)["passes"] == 1
    shares = iter([0.0, 0.5, 0.1])
    got = input_pipeline.repeated(1.0, lambda: {**one_pass(10), "others": next(shares)})
    assert got["others"] == pytest.approx(0.2)  # the passes' shares weighted by their wall time
    assert input_pipeline.repeated(1.0, one_pass, 10)["others"] is None  # a pass that did not record one


def test_input_pipeline_ratio_with_a_busy_peer_is_busy():
    rows = _pipeline_rows(idg=[(i, 100) for i in range(3)], idfd=[(i, 400) for i in range(3)],
                          osteo=[(i, 200) for i in range(3)])
    for sample in rows[f"PNG: {input_pipeline.PEERS[1]}"]["samples"]:
        sample["others"] = 0.45
    got = input_pipeline.round_ratios(rows)
    first = f"PNG: {input_pipeline.OSTEO_FIRST}"
    assert got[f"{first} / {input_pipeline.PEERS[0]}"]["status"] == "ok"
    busy = got[f"{first} / {input_pipeline.PEERS[1]}"]
    assert busy["status"] == "BUSY" and busy["others"] == 0.45
    one = _pipeline_rows(idg=[(0, 100)], osteo=[(0, 200)])
    one[f"PNG: {input_pipeline.PEERS[0]}"]["samples"][0]["others"] = 0.45
    assert input_pipeline.round_ratios(one)[f"{first} / {input_pipeline.PEERS[0]}"]["status"] == "BUSY"
    assert input_pipeline._ratio_cell(busy) == "BUSY (0.50x, others 45%)"


def test_two_input_pipeline_runs_are_compared_on_osteos_first_epoch(tmp_path, capsys):
    quiet = {"rows": _pipeline_rows(idg=[(i, 100) for i in range(5)], idfd=[(i, 1000) for i in range(5)],
                                    osteo=[(i, 300) for i in range(5)])}
    busy = {"rows": _pipeline_rows(idg=[(i, 100) for i in range(5)], idfd=[(i, 700) for i in range(5)],
                                   osteo=[(i, 290) for i in range(5)])}
    got = {r["peer"]: r for r in agree.compare(quiet, busy)}
    assert set(got) == set(input_pipeline.PEERS) and all(r["set"] == "PNG" for r in got.values())
    assert got[input_pipeline.PEERS[0]]["verdict"] == "agree"  # 3.0 and 2.9
    assert got[input_pipeline.PEERS[1]]["verdict"] == "DISAGREE"  # 0.30 and 0.41
    paths = {}
    for name, report in (("quiet", quiet), ("busy", busy), ("models", {"groups": []})):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(report))
    assert agree.main([str(paths["quiet"]), str(paths["busy"])]) == 1
    assert "1 of 2 rows agree within 10%, 1 disagree" in capsys.readouterr().out
    assert agree.main([str(paths["quiet"]), str(paths["models"])]) == 2
    assert "not two reports of one benchmark" in capsys.readouterr().err


def test_pipeline_row_is_compared_with_its_memory_row_round_by_round():
    g = _group(_row("auto", "osteo", [50, 25, 50]), _row("auto pipeline", "osteo", [45, 25, 50], feed="pipeline",
                                                             worker="auto"), _row("cl", "timm", [50, 25, 50]))
    assert _summary(g, "auto pipeline")["vs_engine_row"] == pytest.approx(1.0)


def test_compile_check_says_after_how_many_images_compiling_pays():
    # 60 s more for the first step, 100 -> 150 img/s: 60 / (1/100 - 1/150) = 18,000 images
    def group(compiled_rate):
        return _group(_row("timm-compiled", "osteo", [compiled_rate] * 3, impl="timm", jit=True, first_step_s=62.0),
                      _row("auto", "osteo", [100] * 3, impl="timm", jit=False, first_step_s=2.0),
                      _row("cl", "timm", [100] * 3))

    s = _summary(group(150), "timm-compiled")
    assert s["vs_eager"] == pytest.approx(1.5) and s["eager_row"] == "auto"
    assert (s["compile_s"], s["pays_after_images"]) == (60.0, 18000)
    assert _summary(group(90), "timm-compiled")["pays_after_images"] is None
    assert "vs_eager" not in _summary(group(150), "auto")


def test_feed_batches_are_full_and_each_epoch_a_permutation():
    order = feed._orders(10, 4)
    epoch = [next(order) for _ in range(2)]  # 10 images, batch 4: two full batches an epoch
    assert all(len(b) == 4 for b in epoch)
    assert len(set(int(i) for b in epoch for i in b)) == 8


def test_feed_scale_is_osteos():
    pytest.importorskip("tensorflow")
    from osteo.data.pipeline import SCALE

    assert feed.SCALE == SCALE


def test_the_rounds_are_split_between_starts_of_the_processes():
    assert models.start_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert models.start_blocks(6, 2) == [range(0, 3), range(3, 6)]
    assert models.start_blocks(1, 2) == [range(0, 1)]  # never a start without a round
    assert models.start_blocks(5, 1) == [range(0, 5)]


class _FakeWorker:
    """A row's process as run_group sees it: each start is a new object with its own speed."""

    started: list = []  # noqa: RUF012 (the test's record)

    def __init__(self, kind, cfg, backend, python):
        self.name, self.closed = cfg["name"], False
        self.speed = cfg["speeds"][sum(w.name == self.name for w in _FakeWorker.started)]
        _FakeWorker.started.append(self)

    def reply(self, timeout):
        return {"impl": "fake", "backend": "none", "precision": "float32"}

    def ask(self, op, timeout, **args):
        assert not self.closed
        return {"warm": {"first_step_s": 1.0}, "window": {"img_s": self.speed}, "extras": {}}[op]

    def close(self):
        self.closed = True


def test_a_row_whose_new_process_runs_at_another_speed_is_flagged(monkeypatch):
    """Each start of timm's loop keeps its speed in every round, but the second start runs
    1.5x the first (as DenseNet169's did at 224 px): on one start the ratio looked steady;
    over two starts its rounds disagree, and the row is flagged."""
    monkeypatch.setattr(models, "Worker", _FakeWorker)
    _FakeWorker.started = []

    def row(name, kind, speeds):
        return {"row": name, "worker": name, "kind": kind, "feed": "memory", "callbacks": "osteo",
                "repeats": 4, "cfg": {"name": name, "backend": "torch", "speeds": speeds}}

    args = type("Args", (), {"starts": 2, "timeout": 1, "pause": 0, "window": 1})()
    group = {"model": "densenet169", "size": 224, "batch": 16,
             "rows": [row("auto", "osteo", [15, 17]), row("cl", "timm", [11.5, 17.5])]}
    models.run_group(group, args, say=lambda line: None)
    assert [w.name for w in _FakeWorker.started] == ["auto", "cl", "auto", "cl"]
    assert all(w.closed for w in _FakeWorker.started)
    auto = next(r for r in group["rows"] if r["row"] == "auto")
    assert [(x["round"], x["start"]) for x in auto["rounds"]] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert [s["start"] for s in auto["starts"]] == [0, 1]
    s = next(s for s in group["summary"] if s["row"] == "auto")
    assert s["status"] == "FLAGGED"  # 1.30 on the first start, 0.97 on the second
    args.starts = 1
    _FakeWorker.started = []
    group["rows"] = [row("auto", "osteo", [15]), row("cl", "timm", [11.5])]
    models.run_group(group, args, say=lambda line: None)
    assert next(s for s in group["summary"] if s["row"] == "auto")["status"] == "ok"  # what one start showed


def test_a_single_window_row_is_started_and_measured_only_where_it_runs(monkeypatch):
    """A --single row (one window) runs in the first start only: the second start does not
    build its process again, and its single measurements come from the start it ran in."""
    monkeypatch.setattr(models, "Worker", _FakeWorker)
    _FakeWorker.started = []
    asked = []
    ask = _FakeWorker.ask

    def recording(self, op, timeout, **args):
        asked.append((self.name, op))
        return ask(self, op, timeout, **args)

    monkeypatch.setattr(_FakeWorker, "ask", recording)

    def row(name, kind, repeats):
        return {"row": name, "worker": name, "kind": kind, "feed": "memory", "callbacks": "osteo",
                "repeats": repeats, "cfg": {"name": name, "backend": "torch", "speeds": [10, 10]}}

    args = type("Args", (), {"starts": 2, "timeout": 1, "pause": 0, "window": 1})()
    group = {"model": "vgg16", "size": 224, "batch": 16,
             "rows": [row("auto", "osteo", 4), row("keras-torch", "osteo", 1), row("cl", "timm", 4)]}
    models.run_group(group, args, say=lambda line: None)
    assert [w.name for w in _FakeWorker.started] == ["auto", "keras-torch", "cl", "auto", "cl"]
    assert asked.count(("keras-torch", "window")) == 1 and asked.count(("keras-torch", "extras")) == 1
    assert all(r.get("extras") == {} for r in group["rows"])
