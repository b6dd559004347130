"""The large-batch study: the sweep's choice, steps to target and the goal from rows, and its dry run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launcher import REPO, environment

sys.path.insert(0, str(REPO))
from benchmarks import large_batch  # noqa: E402

ROW_KEYS = {"method", "shape", "ms", "floor_ms", "ratio", "peak_mib", "phase", "global_batch", "lr", "seed"}


def _study(tmp_path, monkeypatch, *argv):
    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    return large_batch.parse_args(["--dry-run", *argv]).study


def _add(study, phase, optimizer, multiple, lr, seed, curve=None, top1=None, note=None):
    """A finished run as the study records it: evaluations every 2 steps, 0.1 s of training per step."""
    spec = study.run_spec(phase, optimizer, multiple, lr, seed)
    row = {**spec, "ms": 100.0, "floor_ms": 1.0, "ratio": 100.0, "peak_mib": 1.0}
    if note:
        row["note"] = note
    else:
        curve = curve or [top1]
        steps = range(spec["schedule_steps"] - 2 * (len(curve) - 1), spec["schedule_steps"] + 1, 2)
        row["eval_curve"] = [[s, v] for s, v in zip(steps, curve)]
        row["train_s_curve"] = [[s, 0.1 * s] for s in steps]
        row["eval_top1"] = curve[-1]
    study.append(row)


def test_sweep_chooses_the_best_lr_counts_divergence_as_worst_and_flags_the_edge(tmp_path, monkeypatch):
    grids = ["--grid", "sgd@1=0.1,0.2,0.4", "--grid", "lars@8=1,2,4"]
    study = _study(tmp_path, monkeypatch, "--runs", "sgd@1,lars@8", *grids)
    for lr, top1 in ((0.1, 0.30), (0.2, 0.35), (0.4, 0.33)):
        _add(study, "sweep", "sgd", 1, lr, 0, top1=top1)
    _add(study, "sweep", "lars", 8, 1.0, 0, top1=0.2)
    _add(study, "sweep", "lars", 8, 2.0, 0, top1=0.4)
    choices = {c["method"]: c for c in study.choices()}
    assert choices["lars 8B"]["lr"] is None and "incomplete (2/3)" in choices["lars 8B"]["source"]
    _add(study, "sweep", "lars", 8, 4.0, 0, note="NonFiniteError: step 3: non-finite loss")
    choices = {c["method"]: c for c in study.choices()}
    assert (choices["sgd B"]["lr"], choices["sgd B"]["at_edge"]) == (0.2, False)
    assert (choices["lars 8B"]["lr"], choices["lars 8B"]["at_edge"]) == (2.0, False)
    assert choices["lars 8B"]["sweep_top1"]["4.0"] is None
    # A diverged run is done: a re-run does not repeat it.
    assert study.done(study.run_spec("sweep", "lars", 8, 4.0, 0))
    # The rows file is what a new process reads back.
    again = large_batch.parse_args(["--dry-run", "--runs", "sgd@1,lars@8", *grids]).study
    assert [c["lr"] for c in again.choices()] == [0.2, 2.0]


def test_steps_to_target_ratios_and_goal(tmp_path, monkeypatch):
    fixed = ["--lr", "sgd@1=0.1", "--lr", "lars@8=2", "--lr", "lamb@8=0.01"]
    study = _study(tmp_path, monkeypatch, "--runs", "sgd@1,lars@8,lamb@8", *fixed)
    # SGD at B: 16 steps, evaluated at 2, 4, ..., 16; the larger batches 8 steps.
    _add(study, "full", "sgd", 1, 0.1, 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    _add(study, "full", "sgd", 1, 0.1, 1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.77, 0.8])
    _add(study, "full", "lars", 8, 2.0, 0, [0.5, 0.77, 0.8, 0.81])
    _add(study, "full", "lars", 8, 2.0, 1, [0.5, 0.6, 0.78, 0.82])
    _add(study, "full", "lamb", 8, 0.01, 0, [0.3, 0.5, 0.7, 0.77])
    _add(study, "full", "lamb", 8, 0.01, 1, [0.3, 0.5, 0.7, 0.75])
    _add(study, "full", "lars", 8, 3.0, 0, [0.9, 0.9, 0.9, 0.9])  # another LR than the chosen one: not read

    summary, goal = large_batch.summarize(study)
    by = {s["method"]: s for s in summary}
    assert goal["targets"] == {"0": pytest.approx(0.76), "1": pytest.approx(0.76)}  # 0.95 x 0.8
    assert by["sgd B"]["steps_to_target"] == 15  # seeds: step 16 and step 14
    assert by["lars 8B"]["steps_ratio_seeds"] == pytest.approx([4 / 16, 6 / 14])
    assert by["lars 8B"]["steps_ratio"] == pytest.approx((4 / 16 + 6 / 14) / 2)
    assert by["lars 8B"]["samples_to_target"] == pytest.approx(128 * 5)  # G = 8 x 16
    assert by["lars 8B"]["train_s_to_target"] == pytest.approx(0.5)
    assert by["lars 8B"]["final_vs_sgd_b"] == pytest.approx(0.015)
    assert by["lars 8B"]["meets_goal"] and by["lars 8B"]["final_top1"] == pytest.approx(0.815)
    assert by["lamb 8B"]["reached"] == "1/2" and by["lamb 8B"]["steps_ratio"] is None
    assert not by["lamb 8B"]["meets_goal"]
    assert goal["met_by"] == ["lars 8B"] and goal["text"].startswith("goal met at 8B (lars 8B 0.34x steps")

    # An absolute target for every seed instead.
    monkeypatch.setattr(study.args, "target", 0.5)
    summary, goal = large_batch.summarize(study)
    by = {s["method"]: s for s in summary}
    assert by["sgd B"]["steps_to_target"] == 10 and by["lars 8B"]["steps_ratio"] == pytest.approx(0.2)
    assert by["lamb 8B"]["steps_ratio"] == pytest.approx(0.4)


def test_goal_not_met_when_the_final_accuracy_is_worse(tmp_path, monkeypatch):
    fixed = ["--lr", "sgd@1=0.1", "--lr", "lars@4=1", "--lr", "lars@8=2"]
    study = _study(tmp_path, monkeypatch, "--runs", "sgd@1,lars@4,lars@8", *fixed)
    _add(study, "full", "sgd", 1, 0.1, 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    _add(study, "full", "lars", 4, 1.0, 0, [0.5, 0.77, 0.8, 0.8])  # ratio 0.25, final equal
    _add(study, "full", "lars", 8, 2.0, 0, [0.77, 0.77, 0.7, 0.7])  # ratio 0.125, final 10 points worse
    _, goal = large_batch.summarize(study)
    assert goal["met_by"] == ["lars 4B"]
    assert goal["text"] == "goal not met at 8B (lars 8B 0.12x steps, final -10.00 points); met by lars 4B"


@pytest.mark.slow
def test_dry_run_writes_rows_json_and_png_and_resumes(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "large_batch.py"), "--dry-run", "--seeds", "0"]
    # three LRs of each grid keep the dry run short
    for (optimizer, multiple), grid in large_batch.GRIDS.items():
        cmd += ["--grid", f"{optimizer}@{multiple}={','.join(map(str, grid[1:4]))}"]
    env = {**environment(threads=1), "HYDRAHEAD_RESULTS_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    payload = json.loads((tmp_path / "large_batch.json").read_text())
    assert {"device", "torch", "triton", "date", "rows", "summary", "sweep", "goal"} <= payload.keys()
    rows = payload["rows"]
    assert sorted((r["phase"], r["method"]) for r in rows if r["phase"] == "full") == [
        ("full", m) for m in sorted(["sgd B", "lars 4B", "lars 8B", "lamb 4B", "lamb 8B"])
    ]
    assert len([r for r in rows if r["phase"] == "sweep"]) + len(payload["failed"]) == 15  # 5 configurations x 3 LRs
    for r in rows:
        assert ROW_KEYS <= r.keys() and r["ms"] > 0 and r["floor_ms"] > 0 and r["ratio"] > 0
        assert r["eval_curve"][-1][0] == r["schedule_steps"]  # the last step is evaluated
    full = [r for r in rows if r["phase"] == "full"]
    assert {r["global_batch"] for r in full} == {16, 64, 128}
    assert all(len(r["eval_curve"]) == r["schedule_steps"] // 2 for r in full)  # every 2 steps
    for choice in payload["sweep"]:  # the full runs took the sweep's best LR
        tried = {float(lr): top1 for lr, top1 in choice["sweep_top1"].items() if top1 is not None}
        assert choice["lr"] == max(tried, key=tried.get)
        assert next(r["lr"] for r in full if r["method"] == choice["method"]) == choice["lr"]
    assert [s["method"] for s in payload["summary"]] == ["sgd B", "lars 4B", "lars 8B", "lamb 4B", "lamb 8B"]
    assert payload["goal"]["text"].startswith("goal ")
    assert (tmp_path / "large_batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.rstrip().splitlines()[-6].startswith("method")  # the table comes last

    lines = (tmp_path / "large_batch.rows.jsonl").read_text()
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "15 of 15 runs done, 0 to run" in again.stdout and "5 of 5 runs done, 0 to run" in again.stdout
    assert (tmp_path / "large_batch.rows.jsonl").read_text() == lines
