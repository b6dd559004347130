"""The top-k benchmarks' CPU dry runs: benchmarks/topk_speed.py and benchmarks/topk_accuracy.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import topk_accuracy, topk_speed  # noqa: E402


def test_topk_speed_dry_run_measures_every_exchange(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    topk_speed.main(["--dry-run", "--models", "vit_tiny", "--densities", "0.01", "--gbit", "25", "--workers", "4"])
    payload = json.loads((tmp_path / "topk_speed.json").read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= payload.keys() and payload["device"] == "cpu"
    rows = {r["variant"]: r for r in payload["rows"]}
    assert list(rows) == ["dense", "bf16", "powersgd", "topk-exact 0.01", "topk-sampled 0.01"]
    dense = rows["dense"]
    assert dense["bytes"] == 4 * dense["params"] and rows["bf16"]["bytes"] == 2 * dense["params"]
    assert rows["powersgd"]["bytes"] < dense["bytes"] / 4
    for name in ("topk-exact 0.01", "topk-sampled 0.01"):
        row = rows[name]
        assert row["bytes"] < dense["bytes"] / 10 and row["ratio"] == dense["bytes"] / row["bytes"]
        assert row["select_ms"] > 0 and row["select_share"] == row["select_ms"] / dense["bwd_ms"]
        assert row["wire_ms"] == pytest.approx(3 * row["bytes"] * 8 / 25e9 * 1e3)  # all-gather: W - 1 messages in
    assert 0.9 <= rows["topk-sampled 0.01"]["recall"] <= 1.0
    for row in rows.values():
        assert row["link_ms"] == pytest.approx(row["bytes"] * 8 / 25e9 * 1e3)
        assert row["step_serial_ms"] == pytest.approx(row["fwd_ms"] + row["bwd_ms"] + row["wire_ms"])
        hidden = max(0.0, row["wire_ms"] - dense["bwd_ms"])
        assert row["step_overlap_ms"] == pytest.approx(row["fwd_ms"] + row["bwd_ms"] + hidden)
    assert dense["wire_ms"] == pytest.approx(2 * 3 / 4 * dense["bytes"] * 8 / 25e9 * 1e3)  # ring all-reduce


def test_topk_accuracy_dry_run_trains_simulated_workers_with_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    args = ["--dry-run", "--simulate-workers", "2", "--densities", "0.01", "--fixes", "none,mc+sampled"]
    topk_accuracy.main([*args, "--seeds", "0", "--name", "study"])
    payload = json.loads((tmp_path / "study.json").read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == ["hydrahead-dense", "hydrahead-topk 0.01", "hydrahead-topk 0.01 mc+sampled"]
    for row in rows.values():
        assert row["eval_top1"] is not None and row["workers"] == 2
        assert "simulating 2 workers" in row["shape"]
        assert "comm.simulate_workers=2" in payload["overrides"]
    # no fix means none, though momentum correction is on by default; a later override wins
    from hydrahead.config import load_config, topk_momentum_correction

    def corrected(method: str) -> bool:
        return topk_momentum_correction(load_config(None, rows[method]["overrides"]))

    assert not corrected("hydrahead-topk 0.01") and corrected("hydrahead-topk 0.01 mc+sampled")
    assert "comm.topk_select=sampled" in rows["hydrahead-topk 0.01 mc+sampled"]["overrides"]
    dense_bytes = rows["hydrahead-dense"]["backbone_bytes_mean"]
    assert all(rows[m]["backbone_bytes_mean"] < dense_bytes for m in rows if m != "hydrahead-dense")
    with pytest.raises(SystemExit):
        topk_accuracy.main([*args, "--fixes", "mc+bogus"])
    with pytest.raises(SystemExit):
        topk_accuracy.main(["--dry-run", "--simulate-workers", "2", "--gpus", "2"])


@pytest.mark.gpu
@pytest.mark.parametrize("select", ["exact", "sampled"])
def test_packing_never_waits_for_the_host(select):
    """Every host sync drains the launch queue that the backward keeps full: after its
    first step (which builds the sampled plan) packing a bucket must ask for none."""
    import torch
    from torch import nn

    from benchmarks.common import host_sync_log
    from hydrahead.comm import compression
    from hydrahead.config import CommConfig

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.LayerNorm(512), nn.Linear(512, 384)).cuda()
    for param in net.parameters():
        param.grad = torch.randn_like(param)
    names = {param: name for name, param in net.named_parameters()}
    cfg = CommConfig(
        grad_compression="topk",
        topk_density=0.01,
        topk_select=select,
        topk_warmup_steps=0,
        topk_min_numel=1024,
        topk_momentum_correction=True,
    )
    topk = compression.make_topk(cfg, names, compression.CommCounters())
    prepared = topk_speed.bucket_buffers(topk_speed.buckets(net, 0.5))
    topk_speed.pack_all(topk, prepared, 4)
    with host_sync_log() as syncs:
        messages = topk_speed.pack_all(topk, prepared, 4)
    assert all(m.is_cuda for m in messages)
    assert not syncs, f"packing waited for the host at {dict(syncs)}"
