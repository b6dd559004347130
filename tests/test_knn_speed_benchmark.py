"""benchmarks/knn_speed.py's dry run on the CPU: the graph's steps beside a background build."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def test_graph_background_dry_run_times_the_steps_beside_a_whole_build(tmp_path, monkeypatch):
    """With --graph-background every graph row carries the steps timed while a whole-shard
    build ran in the background: the step that started it, the one that installed it, and
    the build's wall time between them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    flags = ["--graph-configs", "flat", "--graph-background", "--graph-bg-after-install", "2"]
    knn_speed.main(["--dry-run", "--methods", "graph", *flags])
    payload = json.loads((tmp_path / "knn_speed.json").read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= payload.keys()
    (row,) = payload["rows"]
    assert row["method"] == "hydrahead-graph flat"
    assert row["bg_installed"] and row["bg_build_s"] > 0
    assert 3 <= row["bg_steps"] < 5000  # stopped two steps after the install
    assert row["bg_max_ms"] >= row["bg_ms"] > 0
    assert isinstance(row["bg_slow_steps"], list)


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


def test_host_waits_split_a_steps_device_waits_by_thread_and_clip_them_to_the_step():
    """host_waits_ms: per marked step, its own thread's time in waiting CUDA calls (clipped
    to the step) and other threads' over the same span; calls that do not wait, or fall
    outside every step, count nowhere."""
    from types import SimpleNamespace

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    def event(name, thread, start, end):
        return SimpleNamespace(name=name, thread=thread, time_range=SimpleNamespace(start=start, end=end))

    events = [
        event(knn_speed.STEP_MARK, 1, 2000, 3000),  # listed out of order: steps go by start
        event(knn_speed.STEP_MARK, 1, 0, 1000),
        event("cudaStreamSynchronize", 1, 100, 400),  # step 1, own thread: 0.3 ms
        event("cudaMemcpyAsync", 1, 900, 1200),  # clipped to step 1: 0.1 ms
        event("cudaLaunchKernel", 1, 2100, 2900),  # does not wait
        event("cudaStreamSynchronize", 7, 2500, 4000),  # step 2, the build's thread: 0.5 ms
        event("cudaEventSynchronize", 1, 2600, 2800),  # step 2, own: 0.2 ms
        event("cudaDeviceSynchronize", 1, 5000, 9000),  # after every step
    ]
    waits = knn_speed.host_waits_ms(events)
    assert [(round(a, 6), round(b, 6)) for a, b in waits] == [(0.4, 0.0), (0.2, 0.5)]


def test_profiled_steps_carry_their_host_waits():
    """profile=True marks every timed step: each record gets host_wait_ms (none on the CPU);
    profile and trace together are refused."""
    import time

    import pytest
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import knn_speed

    class Idle:
        _pending, _current = None, object()

    def run_step(step, batch):
        torch.ones(8).sum()
        return time.perf_counter(), time.perf_counter()

    records = knn_speed.steps_beside_rebuilds(
        Idle(), range(1, 5), run_step, torch.device("cpu"), lambda s: None, profile=True
    )
    assert [(r["host_wait_ms"], r["host_wait_other_ms"]) for r in records] == [(0.0, 0.0)] * 4
    with pytest.raises(ValueError, match="one"):
        knn_speed.steps_beside_rebuilds(
            Idle(), range(1, 3), run_step, torch.device("cpu"), lambda s: None, trace=(1, 2, "x"), profile=True
        )
