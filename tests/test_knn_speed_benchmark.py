"""benchmarks/knn_speed.py's dry run on the CPU: the graph's steps beside a background build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def test_graph_background_dry_run_times_the_steps_beside_a_whole_build(tmp_path, monkeypatch):
    """With --graph-background every graph row carries the steps timed while a whole-shard
    build ran in the background: the step that started it, the one that installed it, and
    the build's wall time between them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    flags = ["--graph-configs", "flat", "--graph-background", "--graph-bg-after-install", "2"]
    knn_speed.main(["--dry-run", "--methods", "graph", "--impl", "reference", *flags])  # the torch head: quicker
    payload = json.loads((tmp_path / "knn_speed.json").read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= payload.keys()
    (row,) = payload["rows"]
    assert row["method"] == "hydrahead-graph flat"
    assert row["bg_installed"] and row["bg_build_s"] > 0
    assert 3 <= row["bg_steps"] < 5000  # stopped two steps after the install
    assert row["bg_max_ms"] >= row["bg_ms"] > 0
    assert isinstance(row["bg_slow_steps"], list)


def test_graph_refresh_dry_run_times_a_refresh_and_adds_it_per_step(tmp_path, monkeypatch):
    """--graph-refresh-every N times a refresh of N steps' labels over the build's index; the
    row's ms adds its share per step to the step and the build's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    knn_speed.main(["--dry-run", "--methods", "graph", "--graph-configs", "16:2", "--graph-refresh-every", "3"])
    (row,) = json.loads((tmp_path / "knn_speed.json").read_text())["rows"]
    assert row["method"] == "hydrahead-graph 16:2 refresh=3"
    assert row["refresh_every"] == 3 and row["refresh_s"] > 0
    assert 0 < row["refresh_classes"] <= 3 * 48  # distinct labels of 3 steps of the dry run's G = 48
    assert row["refresh_ms_per_step"] == pytest.approx(row["refresh_s"] * 1e3 / 3, rel=1e-3)
    per_step = row["step_ms"] + row["build_ms_per_step"] + row["refresh_ms_per_step"]
    assert row["ms"] == pytest.approx(per_step, rel=1e-3)


def test_graph_moved_dry_run_times_refreshes_over_each_window(tmp_path, monkeypatch, capsys):
    """graph-moved: one row per window, no build; the timed refreshes search a window of the
    rows of at most that many refreshes, and the row's ms adds their share per step."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    flags = ["--graph-windows", "1,4", "--graph-refresh-every", "3", "--graph-moved-steps", "6", "--profile"]
    # the torch head: the refreshes' flow is under test, and the interpreted kernels took a minute
    knn_speed.main(["--dry-run", "--methods", "graph-moved", "--impl", "reference", *flags])
    assert capsys.readouterr().out.count("Self CPU time total") == 2  # one refresh profiled per window
    rows = json.loads((tmp_path / "knn_speed.json").read_text())["rows"]
    assert [row["method"] for row in rows] == [
        "hydrahead-graph moved window=1 refresh=3",
        "hydrahead-graph moved window=4 refresh=3",
    ]
    for row, window in zip(rows, (1, 4)):
        assert row["refresh_window"] == window and row["refresh_s"] > 0 and "build_s" not in row
        # Distinct labels of `window` refreshes of 3 steps of the dry run's G = 48.
        assert row["refresh_classes"] <= row["window_rows"] <= window * 3 * 48
        assert row["ms"] == pytest.approx(row["step_ms"] + row["refresh_s"] * 1e3 / 3, rel=1e-3)
        assert 0 <= row["graph_recall"] <= 1
        # The timed steps' classes were refreshed first: every one's row holds neighbours.
        assert row["trained_with_neighbours"] == 1.0 and row["active_classes"] > 48
        # The schedule's steps, at least 4 refreshes' worth, with refreshes in the background.
        assert row["bg_steps"] == 12 and 1 <= row["bg_refreshes"] <= 4 and row["bg_max_ms"] >= row["bg_ms"] > 0
    assert rows[1]["window_rows"] > rows[0]["window_rows"]
    with pytest.raises(SystemExit):
        knn_speed.main(["--dry-run", "--methods", "graph-moved", "--graph-windows", "0"])


def test_steps_beside_rebuilds_runs_the_trainers_collection_policy_and_times_collections_in_steps():
    """With gc_every=3 automatic collection is off while the steps run; a collection inside a
    step counts in its gc_ms, the policy's collection after step 3 in none; automatic
    collection is back on afterwards."""
    import gc
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    class Idle:  # a selector with no rebuild pending
        _pending, _current = None, object()

    enabled, collected_after = [], []

    def run_step(step, batch):
        enabled.append(gc.isenabled())
        if step == 2:
            gc.collect()
        return time.perf_counter(), time.perf_counter()

    def watch(phase, info):
        if phase == "start":
            collected_after.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        records = knn_speed.steps_beside_rebuilds(
            Idle(), range(1, 6), run_step, torch.device("cpu"), lambda s: None, gc_every=3
        )
    finally:
        gc.callbacks.remove(watch)
    assert gc.isenabled()
    assert enabled == [False] * 5
    assert [r["gc_ms"] > 0 for r in records] == [False, True, False, False, False]
    assert collected_after.count(1) == 1  # the policy's young-generation collection after step 3
    fields = knn_speed.beside_fields(records)
    assert fields["bg_gc_steps"] == 1 and fields["bg_gc_max_ms"] == records[1]["gc_ms"]


def test_steps_record_their_threads_cpu_time_and_collections_clipped_to_them():
    """cpu_ms is the step thread's CPU time: a step that sleeps (as one waiting for the
    interpreter lock does) is off the CPU, one that computes is on it; a collection counts
    in gc_ms only for the part inside the step."""
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    class Idle:
        _pending, _current = None, object()

    def run_step(step, batch):
        if step == 1:
            time.sleep(0.05)
        else:
            stop = time.thread_time() + 0.03
            while time.thread_time() < stop:
                pass
        return time.perf_counter(), time.perf_counter()

    sleeping, computing = knn_speed.steps_beside_rebuilds(
        Idle(), range(1, 3), run_step, torch.device("cpu"), lambda s: None
    )
    assert sleeping["ms"] - sleeping["cpu_ms"] >= 45 and sleeping["cpu_ms"] < 10, sleeping
    assert computing["cpu_ms"] >= 29, computing
    spans = [(0.0, 1.0), (1.5, 2.5), (3.0, 4.0)]
    assert knn_speed.overlap_s(spans, 0.5, 2.0) == 1.0  # half of the first, half of the second


def test_steps_beside_rebuilds_names_each_step_by_what_it_did_to_the_jobs():
    """A step that queues a job is a start, also when it first harvested the one that was
    pending (a job per step that outlasts the step); a job left running is 'beside'; a new
    index installed is an install."""
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    class Selector:
        _pending, _current = None, object()

    selector, job, other_job = Selector(), object(), object()
    # per step: the job pending after it, and whether it installed a new index
    plan = {1: (job, False), 2: (job, False), 3: (other_job, False), 4: (None, True), 5: (None, False)}

    def run_step(step, batch):
        selector._pending = plan[step][0]
        if plan[step][1]:
            selector._current = object()
        return time.perf_counter(), time.perf_counter()

    records = knn_speed.steps_beside_rebuilds(selector, range(1, 6), run_step, torch.device("cpu"), lambda s: None)
    assert [r["rebuild"] for r in records] == ["start", "beside", "start", "install", ""]
