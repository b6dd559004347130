"""The selection accuracy study: its variants, its plot, and a dry run of it on CPU (tiny gloo runs)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from launcher import REPO

sys.path.insert(0, str(REPO))
from benchmarks import selection_accuracy  # noqa: E402
from benchmarks.selection_accuracy import at_scales, curve_of, make_variants, parse_args, plot_rows, rows_of_budget  # noqa: E402
from hydrahead.config import load_config  # noqa: E402

CONFIG = "configs/head_only_1m_families.yaml"


def _args(*argv: str) -> argparse.Namespace:
    return parse_args(["--config", CONFIG, *argv])


def test_equal_rows_gives_every_sampled_mode_the_same_int_budget():
    args = _args(
        *"--budget 0.01 --equal-rows --full-storage fp32,bf16,fp8 --storage fp8 --index-type flat".split(),
        *"--graph-index-type ivf".split(),
    )
    variants, fields = make_variants(args, 1_000_000, 2048.0)
    assert rows_of_budget(0.01, 1_000_000, 1) == 10_000
    assert [fields[name]["mode"] for name in variants] == ["full", "full", "full", "knn", "random", "graph"]
    assert [fields[name]["storage"] for name in variants if fields[name]["mode"] == "full"] == ["fp32", "bf16", "fp8"]
    budgets = {o for name, overrides in variants.items() for o in overrides if o.startswith("head.budget=")}
    assert budgets == {"head.budget=10000"}  # an int: exactly that many rows, whatever the selection
    expected_dtype = {"fp32": "fp32", "bf16": "bf16", "fp8": "fp8_e4m3"}
    for name, overrides in variants.items():
        dtype = [o for o in overrides if o.startswith("head.weight_dtype=")]
        assert dtype == [f"head.weight_dtype={expected_dtype[fields[name]['storage']]}"]
        assert not any(o.startswith("head.lr=") for o in overrides)  # the config's LR
    assert len(set(variants)) == 6
    assert "head.index_type=ivf" in variants[next(n for n in variants if fields[n]["mode"] == "graph")]
    assert "head.index_type=flat" in variants[next(n for n in variants if fields[n]["mode"] == "knn")]


def test_random_lr_scales_add_random_variants_at_scaled_head_lrs():
    args = _args("--budget", "0.01", "--equal-rows", "--random-lr-scales", "0.2,0.5", "--methods", "random,knn")
    variants, fields = make_variants(args, 1_000_000, 2048.0)
    scaled = {name: fields[name]["lr_scale"] for name in variants if fields[name]["mode"] == "random"}
    assert sorted(scaled.values()) == [0.2, 0.5, 1.0]
    for name, scale in scaled.items():
        lrs = [o for o in variants[name] if o.startswith("head.lr=")]
        assert lrs == ([] if scale == 1.0 else [f"head.lr={2048.0 * scale!r}"])
        assert "head.budget=10000" in variants[name]
    assert [fields[name]["lr_scale"] for name in variants if fields[name]["mode"] == "knn"] == [1.0]
    with pytest.raises(SystemExit):
        _args("--random-lr-scales", "0,1")


def test_scales_run_every_variant_at_each_scale_with_the_head_lr_times_s0_over_s():
    argv = ["--budget", "0.01", "--equal-rows", "--methods", "full,random", "--random-lr-scales", "0.5"]
    args = _args(*argv, "--scales", "8,32", "head.lr=1000")
    cfg = load_config(CONFIG, args.overrides)
    assert cfg.head.scale == 16.0  # s0, the config's
    variants, fields = at_scales(args, cfg)
    assert len(variants) == 6  # (full, random, random at half the LR) at each scale
    for name, overrides in variants.items():
        s = fields[name]["scale"]
        assert name.endswith(f" s={s:g}") and f"head.scale={s!r}" in overrides
        lrs = [o for o in overrides if o.startswith("head.lr=")]
        assert lrs == [f"head.lr={1000.0 * 16.0 / s * fields[name]['lr_scale']!r}"]  # one, composed
    assert {fields[n]["scale"] for n in variants} == {8.0, 32.0}
    assert "head.lr=2000.0" in variants["hydrahead-full s=8"]
    assert "head.lr=250.0" in variants["hydrahead-random 10000 rows lr x0.5 s=32"]
    # Without --scales: the variants of make_variants, no scale override.
    plain, plain_fields = at_scales(_args(*argv, "head.lr=1000"), cfg)
    assert plain == make_variants(_args(*argv, "head.lr=1000"), cfg.head.num_classes, cfg.head_lr)[0]
    assert not any(o.startswith("head.scale=") for o in sum(plain.values(), []))
    with pytest.raises(SystemExit):
        _args("--scales", "8,8")
    with pytest.raises(SystemExit):
        _args("--scales", "0")


def test_each_variant_keeps_a_curve_of_its_own_across_budgets_or_scales():
    def row(method, budget=0.01):
        return {"method": method, "budget": budget}

    # Along rows per step: the budget label goes, what sets the variant apart stays.
    assert curve_of(row("hydrahead-random 200 rows fp8"), False) == curve_of(
        row("hydrahead-random 400 rows fp8"), False
    )
    assert curve_of(row("hydrahead-random 0.01 fp8"), False) == curve_of(row("hydrahead-random 0.02 fp8"), False)
    curves = {
        curve_of(row(m), False)
        for m in (
            "hydrahead-random 200 rows fp8",
            "hydrahead-random 200 rows fp8 corrected",
            "hydrahead-random 200 rows fp8 lr x0.2",
            "hydrahead-knn 200 rows flat k=1 R=50 fp8 trimmed corrected",
        )
    }
    assert len(curves) == 4
    assert curve_of(row("hydrahead-full fp8", None), False) == "full fp8"
    # Along the scale: the scale goes, the budget stays.
    assert curve_of(row("hydrahead-random 200 rows fp8 s=12"), True) == curve_of(
        row("hydrahead-random 200 rows fp8 s=24"), True
    )
    assert curve_of(row("hydrahead-random 200 rows fp8 s=12"), True) != curve_of(
        row("hydrahead-random 400 rows fp8 s=12"), True
    )


def test_plot_with_several_scales_draws_top1_against_the_scale(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [
        {
            "method": f"hydrahead-{mode} s={s:g}",
            "mode": mode,
            "storage": "fp8",
            "seed": seed,
            "eval_top1": 0.5 + 0.01 * s,
            "rows_per_step": n,
            "budget_rows": None if mode == "full" else n,
            "scale": s,
            "shape": "s",
        }
        for mode, n in (("full", 20_000), ("random", 200))
        for s in (12.0, 24.0)
        for seed in range(2)
    ]
    drawn = []
    plt = selection_accuracy.pyplot()
    real_plot = plt.Axes.plot
    monkeypatch.setattr(plt.Axes, "plot", lambda ax, xs, *a, **k: drawn.append(list(xs)) or real_plot(ax, xs, *a, **k))
    plot_rows({"rows": rows, "benchmark": "b", "device": "cpu", "eval_samples": 100}, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert drawn and all(set(xs) <= {12.0, 24.0} for xs in drawn)  # the scale on the x axis, not rows per step


@pytest.mark.parametrize(
    "flag, key, modes, suffix",
    [
        ("--trim", "head.knn_trim_to_budget=true", {"knn"}, " trimmed"),
        ("--search-paid-rows", "head.search_paid_rows=true", {"knn", "graph"}, " paid"),
        ("--fill-correction", "head.fill_correction=true", {"knn", "graph", "random"}, " corrected"),
    ],
)
def test_variant_flags_go_to_their_modes_alone_and_name_them(flag, key, modes, suffix):
    every = ("--budget", "0.01", "--equal-rows", "--methods", "knn,graph,random,full")
    variants, fields = make_variants(_args(*every, flag), 20_000, 1280.0)
    for name, overrides in variants.items():
        assert (key in overrides) == (fields[name]["mode"] in modes) == name.endswith(suffix), name
    plain, _ = make_variants(_args(*every), 20_000, 1280.0)
    assert not any(key in overrides for overrides in plain.values())


def test_knn_variants_name_the_label_skip_unless_the_run_sets_it():
    variants, _ = make_variants(_args("--budget", "0.01", "--methods", "knn"), 20_000, 1280.0)
    assert all("head.knn_skip_label=true" in overrides for overrides in variants.values())
    kept, _ = make_variants(_args("--budget", "0.01", "--methods", "knn", "head.knn_skip_label=false"), 20_000, 1280.0)
    assert not any(o.startswith("head.knn_skip_label=") for overrides in kept.values() for o in overrides)


def test_a_fractional_budget_stays_a_float_and_rows_count_the_largest_shard():
    args = _args("--budget", "0.01", "--gpus", "3")
    variants, fields = make_variants(args, 1_000, 0.5)
    assert "head.budget=0.01" in variants["hydrahead-random 0.01"]
    assert variants["hydrahead-full"] == ["head.selection=full"]  # the config's own storage
    assert fields["hydrahead-random 0.01"]["budget_rows"] == rows_of_budget(0.01, 1_000, 3) == 4  # ceil(3.34)


def test_several_budgets_give_each_sampled_mode_one_variant_per_budget():
    args = _args("--budget", "0.005,0.02", "--equal-rows", "--random-lr-scales", "0.2", "--methods", "full,knn,random")
    variants, fields = make_variants(args, 20_000, 1280.0)
    assert [fields[n]["mode"] for n in variants].count("full") == 1  # full softmax does not depend on the budget
    for mode, per_budget in (("knn", 1), ("random", 2)):  # random: at the head LR and at a fifth of it
        names = [n for n in variants if fields[n]["mode"] == mode]
        assert sorted(fields[n]["budget_rows"] for n in names) == sorted([100, 400] * per_budget)
        for name in names:
            assert f"head.budget={fields[name]['budget_rows']}" in variants[name]
            assert f"{fields[name]['budget_rows']} rows" in name
    assert len(variants) == 1 + 2 + 4
    with pytest.raises(SystemExit):
        _args("--budget", "0.01,0.01")
    with pytest.raises(ValueError, match="distinct"):  # 100 classes: both are 1 row per step
        make_variants(_args("--budget", "0.005,0.006", "--equal-rows", "--methods", "knn"), 100, 1.0)


def test_unknown_storage_or_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        _args("--full-storage", "fp16")
    assert "fp16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args("--methods", "full,topk")
    assert "topk" in capsys.readouterr().err
    for bad in ("1.5", "0.01,0", "nan", ","):
        with pytest.raises(SystemExit):
            _args("--budget", bad)


def test_plot_draws_top1_against_rows_per_step(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"method": m, "mode": mode, "storage": "fp8", "seed": s, "eval_top1": t, "rows_per_step": n, "shape": "s"}
        for m, mode, n, t in (
            ("hydrahead-full fp8", "full", 1e6, 0.6),
            ("hydrahead-random 10000 rows", "random", 1e4, 0.3),
        )
        for s in range(3)
    ]
    payload = {"rows": rows, "benchmark": "b", "device": "cpu", "eval_samples": 100}
    plot_rows(payload, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(600)  # eight tiny training runs, each its own torchrun
def test_dry_run_writes_rows_json_and_plot_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = [
        *f"--dry-run --config {CONFIG} --name study --seeds 0 --full-storage fp32,fp8 --storage fp8".split(),
        *"--budget 0.02 --equal-rows --knn-k 2 --graph-k 2 --index-type flat --random-lr-scales 0.5".split(),
    ]
    rows_file = tmp_path / "study.rows.jsonl"

    selection_accuracy.main([*argv, "--time-budget", "0"])  # the first run starts, no second
    assert len(rows_file.read_text().splitlines()) == 1

    selection_accuracy.main(argv)  # the rest
    payload = json.loads((tmp_path / "study.json").read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= payload.keys()
    rows = payload["rows"]
    assert sorted((r["mode"], r["storage"], r["lr_scale"]) for r in rows) == [
        ("full", "fp32", 1.0),
        ("full", "fp8", 1.0),
        ("graph", "fp8", 1.0),
        ("knn", "fp8", 1.0),
        ("random", "fp8", 0.5),
        ("random", "fp8", 1.0),
    ]
    for r in rows:
        assert not r.get("note") and 0 <= r["eval_top1"] <= 1 and r["wall_s"] > 0
        # how far the searched index or graph lagged the weights: knn and graph only
        assert (r["index_age"] is not None) == (r["mode"] in ("knn", "graph")), r
        if r["mode"] == "full":
            assert r["rows_per_step"] == 300  # the dry run's classes, all on one shard
        else:
            # 6 rows (2% of 300) unless the batch's positives or neighbours alone are more
            assert 6 <= r["rows_per_step"] < 300 and r["budget_rows"] == 6
            assert "head.budget=6" in r["overrides"]
    assert (tmp_path / "study.png").stat().st_size > 1000

    selection_accuracy.main(argv)  # everything done: nothing runs again
    assert len(rows_file.read_text().splitlines()) == 6

    # Other overrides make another study: its runs are not taken from this one's rows.
    selection_accuracy.main([*argv, "--methods", "random", "head.margin=0.2"])
    lines = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert len(lines) == 8 and lines[-1]["run_overrides"] == ["head.margin=0.2"]
    payload = json.loads((tmp_path / "study.json").read_text())
    assert [r["mode"] for r in payload["rows"]] == ["random", "random"]


def test_time_budget_expects_each_variant_to_take_its_own_slowest_run(tmp_path, monkeypatch):
    """A slow variant's past runs keep it from starting late; they do not hold back a fast one."""
    from benchmarks import accuracy_runs

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    clock = {"now": 0.0}
    monkeypatch.setattr(accuracy_runs.time, "monotonic", lambda: clock["now"])
    walls = {"slow": 100.0, "fast": 10.0}
    variants = {"slow": ["log.every=7"], "fast": ["log.every=3"]}
    ran = []

    def fake_run(args, overrides, seed, run_dir):
        method = next(name for name, o in variants.items() if o == overrides)
        clock["now"] += walls[method]
        ran.append((method, seed))
        metrics = {"eval_top1": 0.5, "eval_top5": 0.6, "eval_loss": 1.0, "train_loss": 1.0}
        return {**metrics, "wall_s": walls[method]}

    monkeypatch.setattr(accuracy_runs, "run_one", fake_run)
    parser = argparse.ArgumentParser()
    accuracy_runs.add_arguments(parser, name="budget")

    def study(seeds: str, budget: str) -> None:
        clock["now"] = 0.0
        args = parser.parse_args(["--dry-run", "--config", CONFIG, "--seeds", seeds, "--time-budget", budget])
        accuracy_runs.run_study(args, variants, what="budget", plot=lambda payload, png: None)

    study("0", "1000")
    assert ran == [("slow", 0), ("fast", 0)]
    ran.clear()
    # Seeds 1 and 2 in 150 s: slow 1 (the first run always starts) ends at 100 s; slow 2
    # would end at 200 s and waits, while fast 1 and fast 2 (10 s each, as recorded) fit.
    study("0,1,2", "150")
    assert ran == [("slow", 1), ("fast", 1), ("fast", 2)]
    ran.clear()
    study("0,1,2", "150")
    assert ran == [("slow", 2)]


def test_jobs_run_at_once_and_every_row_is_kept(tmp_path, monkeypatch):
    """--jobs 2 has two runs in flight together (a barrier of two would time out one by one);
    a run that times out becomes a failed row, and the others still land."""
    import subprocess
    import threading

    from benchmarks import accuracy_runs

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    variants = {"a": ["log.every=7"], "b": ["log.every=3"]}
    together = threading.Barrier(2, timeout=20)

    def fake_subprocess_run(cmd, **kwargs):
        seed = next(int(o.split("=")[1]) for o in cmd if o.startswith("run.seed="))
        if seed == 2:
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
        together.wait()
        run_dir = Path(next(o.split("=", 1)[1] for o in cmd if o.startswith("run.dir=")))
        run_dir.mkdir(parents=True)
        rows = [
            {"step": 1, "loss": 2.0},
            {"step": 1, "eval_top1": 0.25 * (1 + seed), "eval_top5": 0.9, "eval_loss": 1.0},
        ]
        (run_dir / accuracy_runs.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(accuracy_runs.subprocess, "run", fake_subprocess_run)
    parser = argparse.ArgumentParser()
    accuracy_runs.add_arguments(parser, name="jobs")
    args = parser.parse_args(["--dry-run", "--config", CONFIG, "--seeds", "0,1,2", "--jobs", "2", "--timeout", "5"])
    accuracy_runs.run_study(args, variants, what="jobs", plot=lambda payload, png: None)

    lines = [json.loads(line) for line in (tmp_path / "jobs.rows.jsonl").read_text().splitlines()]
    finished = sorted((r["method"], r["seed"], r["eval_top1"]) for r in lines if not r.get("note"))
    assert finished == [("a", 0, 0.25), ("a", 1, 0.5), ("b", 0, 0.25), ("b", 1, 0.5)]
    assert sorted((r["method"], r["seed"]) for r in lines if r.get("note")) == [("a", 2), ("b", 2)]
    assert all(r["jobs"] == 2 for r in lines)
    payload = json.loads((tmp_path / "jobs.json").read_text())
    assert [(s["method"], s["seeds"]) for s in payload["summary"]] == [("a", 2), ("b", 2)]


def _study_file(path: Path, device: str, rows: list[tuple[str, list[str], int, float]], shape: str = "G=8") -> None:
    payload = {
        "device": device,
        "torch": "t",
        "triton": "x",
        "date": "d",
        "eval_samples": 100,
        "rows": [
            {"method": m, "run_overrides": o, "seed": s, "eval_top1": t, "eval_loss": 1.0, "train_loss": 1.0,
             "rows_per_step": 10.0, "shape": shape, "ms": 1.0}
            for m, o, s, t in rows
        ],
    }  # fmt: skip
    path.write_text(json.dumps(payload))


def test_combine_puts_the_rows_of_several_files_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    _study_file(tmp_path / "a.json", "H100", [("hydrahead-full", [], 0, 0.7), ("hydrahead-knn", ["p=64", "g"], 0, 0.5)])
    _study_file(
        tmp_path / "b.json",
        "H200",
        [("hydrahead-knn", ["p=32", "g"], 0, 0.4), ("hydrahead-full", [], 1, 0.6), ("hydrahead-graph", [], 0, 0.9)],
    )
    selection_accuracy.main(["--name", "both", "--combine", "a.json,b.json"])
    payload = json.loads((tmp_path / "both.json").read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= payload.keys()
    assert payload["device"] == "H100 + H200" and payload["combined_from"] == ["a.json", "b.json"]
    assert [(r["method"], r["source"]) for r in payload["rows"]] == [
        ("hydrahead-full", "a.json"),
        ("hydrahead-knn [p=64]", "a.json"),
        ("hydrahead-knn [p=32]", "b.json"),
        ("hydrahead-full", "b.json"),
        ("hydrahead-graph", "b.json"),
    ]
    means = {r["method"]: (r["seeds"], round(r["eval_top1_mean"], 6)) for r in payload["summary"]}
    assert means["hydrahead-full"] == (2, 0.65) and means["hydrahead-knn [p=32]"] == (1, 0.4)
    if selection_accuracy.pyplot() is not None:
        assert (tmp_path / "both.png").stat().st_size > 1000
    assert "hydrahead-graph" in capsys.readouterr().out


def test_combine_refuses_missing_files_and_rows_of_other_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    _study_file(tmp_path / "a.json", "cpu", [("hydrahead-full", [], 0, 0.7)])
    _study_file(tmp_path / "c.json", "cpu", [("hydrahead-full", [], 0, 0.7)], shape="G=16")
    with pytest.raises(SystemExit, match="no result file"):
        selection_accuracy.main(["--name", "x", "--combine", "a.json,missing.json"])
    with pytest.raises(SystemExit, match="2 tasks"):
        selection_accuracy.main(["--name", "x", "--combine", "a.json,c.json"])
    assert not (tmp_path / "x.json").exists()
