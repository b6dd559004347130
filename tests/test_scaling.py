"""The scaling-study runner: grid expansion, resume-skip, and the CSV/JSON it writes (tiny gloo runs)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import pytest
from launcher import REPO, environment

sys.path.insert(0, str(REPO))
from benchmarks import scaling  # noqa: E402
from benchmarks.scaling import Point, expand_grid, parse_axis  # noqa: E402

RESULTS_KEYS = {"device", "torch", "triton", "date", "rows"}
ROW_KEYS = {
    "method",
    "shape",
    "ms",
    "floor_ms",
    "ratio",
    "peak_mib",
    "gpus",
    "transport",
    "config",
    "samples_per_s",
    "scaling_efficiency",
    "vs_backbone",
    "backbone_ms",
    "head_ms",
    "comm_ms",
    "bytes_per_step",
}


def test_grid_is_the_product_of_its_axes_with_one_transport_at_one_gpu():
    axes = [parse_axis("head.impl=reference,triton"), parse_axis("comm.overlap=false,true")]
    points = expand_grid(["a.yaml", "b.yaml"], [1, 2], ["nvlink", "socket"], axes, baseline=False)
    # per config: 1 GPU x "none" + 2 GPUs x 2 transports, each with 2 x 2 option sets
    assert len(points) == 2 * (1 + 2) * 4
    assert len({p.key for p in points}) == len(points)
    assert {p.transport for p in points if p.gpus == 1} == {"none"}
    assert {p.transport for p in points if p.gpus == 2} == {"nvlink", "socket"}
    assert Point("a.yaml", 2, "socket", "full", (("head.impl", "triton"), ("comm.overlap", "true"))) in points


def test_baseline_points_drop_head_options_and_appear_once():
    axes = [
        parse_axis("head.num_classes=10,20"),
        parse_axis("comm.overlap=false,true"),
        parse_axis("comm.grad_compression=none,bf16"),
    ]
    points = expand_grid(["a.yaml"], [1, 2], ["nvlink"], axes, baseline=True)
    baselines = [p for p in points if p.mode == "backbone"]
    # head.* and comm.overlap steer only the head; the gradient compression stays
    assert sorted((p.gpus, p.options) for p in baselines) == [
        (1, (("comm.grad_compression", "bf16"),)),
        (1, (("comm.grad_compression", "none"),)),
        (2, (("comm.grad_compression", "bf16"),)),
        (2, (("comm.grad_compression", "none"),)),
    ]
    assert len([p for p in points if p.mode == "full"]) == 2 * 8


@pytest.mark.parametrize("text", ["head.impl", "impl=reference", "head.impl=", "head.impl=a;b", "=x"])
def test_bad_axis_is_refused(text):
    with pytest.raises(ValueError, match="--axis"):
        parse_axis(text)


def test_repeated_axis_key_is_refused():
    with pytest.raises(ValueError, match="twice"):
        expand_grid(["a.yaml"], [1], ["gloo"], [parse_axis("head.impl=a"), parse_axis("head.impl=b")], baseline=False)


# Every study's short run on the tiny MLP.
_SHORT = ["--config", "configs/quickstart.yaml", "--gpus", "1,2", "--steps", "3", "--warmup", "1", "--timed-steps", "1"]
_TINY = ["head.num_classes=300", "model.hidden_dim=32", "model.embed_dim=16", "head.chunk_size=64"]


def _scaling_args(*args) -> list[str]:
    axis = ["--per-gpu-batch", "16", "--name", "tiny", "--axis", "comm.overlap=false,true", "--baseline"]
    return [*_SHORT, *axis, *args, *_TINY]


def _strong_args() -> list[str]:
    return [*_SHORT, "--global-batch", "32", "--name", "strong", *_TINY]


# The runner tests' studies: (dry-run argv, argv) of each.
STUDIES = {
    "weak": (_scaling_args("--dry-run"), _scaling_args()),
    "repeats": (
        _scaling_args("--gpus", "1", "--repeats", "2", "--dry-run"),
        _scaling_args("--gpus", "1", "--repeats", "2"),
    ),
    "strong": (None, _strong_args()),
}


@pytest.fixture
def scaling_main(monkeypatch, capsys):
    """The runner's main(argv) in this process, in the environment that the script gets
    (its torchrun launches inherit it); returns what it printed. Spares each run the
    script's own start (importing torch and hydrahead, seconds on a small machine)."""
    monkeypatch.chdir(REPO)
    wanted = environment()
    for key in set(os.environ) - set(wanted):
        monkeypatch.delenv(key)
    for key, value in wanted.items():
        monkeypatch.setenv(key, value)

    def run(results_dir, argv: list[str]) -> str:
        monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(results_dir))
        capsys.readouterr()
        status = scaling.main(argv)
        out = capsys.readouterr()
        assert status == 0, f"stdout:\n{out.out[-3000:]}\nstderr:\n{out.err[-4000:]}"
        return out.out

    return run


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Each study of STUDIES dry-run in this process, then run by benchmarks/scaling.py as a
    script (as a user runs it, command line included), the three scripts started at once:
    their grids are independent, and a launch of 1 rank leaves a core idle for much of its
    time. Returns per study its results folder, what its dry run printed and the files the
    dry run left there."""
    out = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO)
        for name, (dry_run, _) in STUDIES.items():
            results_dir = tmp_path_factory.mktemp(name)
            printed = ""
            if dry_run:
                monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(results_dir))
                with contextlib.redirect_stdout(io.StringIO()) as stdout:
                    assert scaling.main(dry_run) == 0
                printed = stdout.getvalue()
            out[name] = (results_dir, printed, sorted(p.name for p in results_dir.iterdir()))
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / "scaling.py"), *argv],
            cwd=REPO,
            env={**environment(), "HYDRAHEAD_RESULTS_DIR": str(out[name][0])},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (_, argv) in STUDIES.items()
    }
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-4000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # a hang or a failure above: stop the rest
                proc.kill()
                proc.wait()
    return out


@pytest.mark.slow
def test_runner_writes_every_point_once_and_skips_them_on_a_rerun(studies, scaling_main):
    results_dir, dry_run, left = studies["weak"]
    assert "6 points: 0 done or skipped, 6 to run" in dry_run
    assert "tiny.rows.jsonl" not in left  # a dry run launches nothing

    records = [json.loads(line) for line in (results_dir / "tiny.rows.jsonl").read_text().splitlines()]
    assert sorted((r["world_size"], r["mode"], r["variant"]) for r in records) == [
        (1, "backbone", "default"),
        (1, "full", "comm.overlap:false"),
        (1, "full", "comm.overlap:true"),
        (2, "backbone", "default"),
        (2, "full", "comm.overlap:false"),
        (2, "full", "comm.overlap:true"),
    ]
    results = json.loads((results_dir / "tiny.json").read_text())
    assert RESULTS_KEYS <= set(results)
    assert len(results["rows"]) == 6
    for row in results["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["ms"] > 0 and row["floor_ms"] > 0 and row["ratio"] == pytest.approx(row["ms"] / row["floor_ms"])
        assert row["samples_per_s"] == pytest.approx(row["per_gpu_batch"] * row["gpus"] / row["ms"] * 1e3, rel=1e-6)
        if row["mode"] == "full":
            backbone = next(b for b in results["rows"] if b["mode"] == "backbone" and b["gpus"] == row["gpus"])
            assert row["vs_backbone"] == pytest.approx(row["samples_per_s"] / backbone["samples_per_s"])
            assert row["method"].startswith("hydrahead")
            assert row["bytes_per_step"] > 0 if row["gpus"] > 1 else row["bytes_per_step"] >= 0
        if row["gpus"] == 1:
            assert row["scaling_efficiency"] == pytest.approx(1.0) and row["transport"] == "none"
        else:
            assert row["transport"] == "gloo"
            one = next(
                o
                for o in results["rows"]
                if o["gpus"] == 1 and o["variant"] == row["variant"] and o["mode"] == row["mode"]
            )
            assert row["scaling_efficiency"] == pytest.approx(row["samples_per_s"] / 2 / one["samples_per_s"])
    with open(results_dir / "tiny.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [r["method"] for r in results["rows"]]
    assert ROW_KEYS <= set(table[0])
    assert (results_dir / "tiny.png").read_bytes().startswith(b"\x89PNG")

    before = (results_dir / "tiny.rows.jsonl").read_text()
    out = scaling_main(results_dir, _scaling_args())
    assert "6 points: 6 done or skipped, 0 to run" in out
    assert (results_dir / "tiny.rows.jsonl").read_text() == before


def test_repeats_merge_into_medians_with_samples_per_s_from_the_median_ms():
    base = {
        "config": "c.yaml",
        "world_size": 2,
        "transport": "gloo",
        "mode": "full",
        "variant": "default",
        "global_batch": 64,
        "per_gpu_batch": 32,
        "num_classes": 300,
        "active_classes": 40,
    }
    records = [
        {**base, "repeat": 1, "ms": 30.0, "head_ms": 5.0, "samples_per_s": 0.0},
        {**base, "ms": 10.0, "head_ms": 1.0, "samples_per_s": 0.0},  # no "repeat": an older record, repeat 0
        {**base, "repeat": 2, "ms": 20.0, "head_ms": 9.0, "samples_per_s": 0.0},
        {**base, "variant": "other", "repeat": 0, "ms": 7.0, "head_ms": 2.0, "samples_per_s": 0.0},
    ]
    merged = {r["variant"]: r for r in scaling.merge_repeats(records)}
    three = merged["default"]
    assert three["ms"] == 20.0 and three["head_ms"] == 5.0  # each figure's own median
    assert three["ms_repeats"] == [10.0, 30.0, 20.0] and three["repeats"] == 3 and "repeat" not in three
    assert three["samples_per_s"] == pytest.approx(64 / 20.0 * 1e3)
    assert three["num_classes"] == 300 and isinstance(three["num_classes"], int)
    assert merged["other"]["ms"] == 7.0 and merged["other"]["repeats"] == 1


@pytest.mark.slow
def test_runner_repeats_the_whole_grid_before_any_point_again(studies, scaling_main):
    results_dir, dry_run, _ = studies["repeats"]
    assert "3 points x 2 repeats: 0 done or skipped, 6 to run" in dry_run
    records = [json.loads(line) for line in (results_dir / "tiny.rows.jsonl").read_text().splitlines()]
    assert [r["repeat"] for r in records] == [0, 0, 0, 1, 1, 1]  # every point once, then again
    results = json.loads((results_dir / "tiny.json").read_text())
    assert len(results["rows"]) == 3
    for row in results["rows"]:
        mine = [r["ms"] for r in records if (r["mode"], r["variant"]) == (row["mode"], row["variant"])]
        assert row["repeats"] == 2 and row["ms_repeats"] == mine
        assert row["ms"] == pytest.approx(sum(mine) / 2)
        assert row["samples_per_s"] == pytest.approx(row["per_gpu_batch"] / row["ms"] * 1e3, rel=1e-6)
    out = scaling_main(results_dir, _scaling_args("--gpus", "1", "--repeats", "3", "--dry-run"))
    assert "3 points x 3 repeats: 6 done or skipped, 3 to run" in out and "2/3" in out


def test_strong_scaling_splits_the_global_batch_over_each_gpu_count():
    points = expand_grid(["a.yaml"], [1, 2, 4], ["nvlink"], [], baseline=True, global_batch=64)
    assert sorted({(p.gpus, p.per_gpu_batch, p.scaling) for p in points}) == [
        (1, 64, "strong"),
        (2, 32, "strong"),
        (4, 16, "strong"),
    ]
    weak = expand_grid(["a.yaml"], [1, 2], ["nvlink"], [], baseline=False, per_gpu_batch=8)
    assert {(p.per_gpu_batch, p.scaling) for p in weak} == {(8, "weak")}
    assert not {p.key for p in weak} & {
        p.key for p in expand_grid(["a.yaml"], [1, 2], ["nvlink"], [], baseline=False, global_batch=8)
    }
    with pytest.raises(ValueError, match="split evenly"):
        expand_grid(["a.yaml"], [1, 3], ["nvlink"], [], baseline=False, global_batch=64)
    with pytest.raises(SystemExit):
        scaling.main(["--gpus", "1", "--per-gpu-batch", "8", "--global-batch", "8", "--dry-run"])


@pytest.mark.slow
def test_runner_strong_scaling_keeps_the_global_batch(studies):
    results_dir, _, _ = studies["strong"]
    records = [json.loads(line) for line in (results_dir / "strong.rows.jsonl").read_text().splitlines()]
    assert sorted((r["world_size"], r["per_gpu_batch"], r["global_batch"], r["scaling"]) for r in records) == [
        (1, 32, 32, "strong"),
        (2, 16, 32, "strong"),
    ]
    rows = {r["gpus"]: r for r in json.loads((results_dir / "strong.json").read_text())["rows"]}
    assert all("[strong, global batch 32]" in r["method"] and r["scaling"] == "strong" for r in rows.values())
    assert rows[2]["scaling_efficiency"] == pytest.approx(rows[2]["samples_per_s"] / 2 / rows[1]["samples_per_s"])
    assert rows[1]["scaling_efficiency"] == pytest.approx(1.0)


def test_the_backbone_baseline_runs_from_a_config_with_knn_only_head_options(tmp_path):
    """--mode backbone swaps the head for a token full-softmax one: options that only a knn
    head accepts (head.knn_fixed_size) must not make the baseline's config invalid."""
    out = tmp_path / "rows.jsonl"
    cmd = [  # one process, as the runner starts a point of one GPU: no torchrun
        sys.executable,
        str(REPO / "benchmarks" / "train_throughput.py"),
        "--config",
        "configs/quickstart.yaml",
        "--mode",
        "backbone",
        "--per-gpu-batch",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
        "head.selection=knn",
        "head.index=torch",
        "head.knn_fixed_size=true",
        "model.hidden_dim=32",
        "model.embed_dim=16",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["mode"] == "backbone" and row["head_selection"] == "full" and row["ms"] > 0
