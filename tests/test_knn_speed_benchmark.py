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
