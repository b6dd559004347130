"""The step profiler's GPU-idle accounting, on a hand-made Chrome trace."""

from __future__ import annotations

import sys

import pytest
from launcher import REPO

sys.path.insert(0, str(REPO))
from benchmarks.profile_step import gpu_idle_by_range  # noqa: E402


def _range(name, ts, dur):
    return {"ph": "X", "cat": "user_annotation", "name": f"hydrahead::{name}", "ts": ts, "dur": dur}


def _kernel(ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": "k", "ts": ts, "dur": dur}


def test_idle_gaps_are_charged_to_the_innermost_range_the_host_was_in():
    events = []
    for step in range(3):  # steps of 1,000 us; the third only closes the second window
        t = step * 1000
        events += [
            _range("backbone_forward", t, 300),
            _range("head", t + 300, 400),
            _range("select", t + 320, 200),
            _range("backbone_backward", t + 700, 300),
        ]
    events += [
        # step 0: busy 0-330, idle 330-400 (host in select, inside head), busy 400-900 (two overlapping
        # kernels and a copy count once), idle 900-950 (backbone_backward), busy 950-990
        _kernel(0, 330),
        _kernel(400, 300),
        _kernel(500, 400, "gpu_memcpy"),
        _kernel(950, 40, "gpu_memset"),
        # step 1: one gap of 100 us that starts while the host is in head but outside select
        _kernel(1000, 550),
        _kernel(1650, 300),
        _kernel(2000, 10),  # the third step's own kernels are not in any window
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 2000},  # host ops are not device time
    ]
    idle = gpu_idle_by_range(events)
    assert idle["steps"] == 2 and idle["window_ms"] == pytest.approx(1.0)
    assert idle["busy_ms"] == pytest.approx((330 + 500 + 40 + 550 + 300) / 2 / 1e3)
    assert idle["idle_ms"] == pytest.approx((70 + 50 + 100) / 2 / 1e3)
    assert idle["idle_by_range"] == pytest.approx({"select": 0.035, "head": 0.05, "backbone_backward": 0.025})


def test_no_windows_or_no_device_activity_give_none():
    assert gpu_idle_by_range([_range("backbone_forward", 0, 10), _kernel(0, 5)]) is None
    assert gpu_idle_by_range([_range("backbone_forward", 0, 10), _range("backbone_forward", 100, 10)]) is None


@pytest.mark.slow
def test_profile_step_runs_on_cpu_ranks_and_writes_each_ranks_trace(tmp_path):
    import gzip
    import json
    import subprocess

    from launcher import environment

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        str(REPO / "benchmarks" / "profile_step.py"),
        "--config",
        "configs/quickstart.yaml",
        "--per-gpu-batch",
        "8",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--rows",
        "3",
        "--trace",
        str(tmp_path / "trace_{rank}.json.gz"),
        "head.num_classes=300",
        "model.hidden_dim=32",
        "model.embed_dim=16",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "phase (ms per step)" in proc.stdout and "ms per step (profiled)" in proc.stdout
    for rank in (0, 1):
        events = json.loads(gzip.open(tmp_path / f"trace_{rank}.json.gz", "rt").read())["traceEvents"]
        names = {e["name"] for e in events if e.get("cat") == "user_annotation"}
        assert {"hydrahead::head", "hydrahead::select", "hydrahead::backbone_backward"} <= names
