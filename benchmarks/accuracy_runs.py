"""Accuracy studies: the same training run under several variants and seeds, summarised.

A variant is a name and the config overrides that make it. Each (variant, seed) run is
``launch/train.py`` under torchrun (``--gpus`` processes; one process without it) in a
temporary run folder; its row records the last held-out top-1/top-5/loss, the last
training loss, the head's median time per step, the rows each shard scores per step (the
mean active classes where the run logs them, the whole shard for full softmax), the peak
memory, the mean bytes a rank hands to the backbone's exchange per logged step, the mean
age of the index or class graph the selection read (steps of updates behind the weights)
and the run's wall time.
Runs go seed by seed (every variant of a seed before the next seed). Rows go to
``<name>.rows.jsonl`` as they finish; a re-run with the same config and overrides skips
those already there, so a study can be spread over several commands (``time_budget``:
after a command's first run, none starts that would carry past it if it took as long as
its variant's slowest run so far, or the slowest of the command's variants for one not run
yet; a faster variant's run may go ahead of a slower one that does not fit). ``--jobs N``
runs up to N at once on one machine: top-1 is unaffected, but their times share it.
The summary (mean and spread over seeds per variant) and the rows go to
``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    bf16_matmul_tflops,
    environment,
    launcher,
    print_table,
    pyplot,
    write_results,
)  # noqa: E402
from hydrahead.config import load_config  # noqa: E402
from hydrahead.train.metrics import METRICS_FILE  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECALLS = ("knn_recall", "graph_recall", "active_recall")  # the selections' sampled recall metrics, averaged
DRY_RUN = [
    "train.steps=6",
    "train.global_batch=32",
    "train.eval_every=6",
    "train.eval_samples=64",
    "model.embed_dim=16",
    "model.hidden_dim=32",
    "model.input_dim=16",
    "data.feature_dim=16",
    "head.num_classes=300",
    "head.weight_dtype=fp32",
    "optim.warmup_steps=2",
    "log.progress=false",
    "checkpoint.every=0",
]


def add_arguments(parser: argparse.ArgumentParser, *, name: str) -> None:
    parser.add_argument("--config", default="configs/quickstart.yaml", help="training config the runs start from")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values")
    parser.add_argument("--gpus", type=int, default=1, help="processes per run (GPUs; CPU ranks with --dry-run)")
    parser.add_argument("--name", default=name, help="results file name (without .json)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed to one run")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds after which no run starts that would carry past them if it took as long as its variant's "
        "slowest run so far (a variant not run yet: the slowest of all); "
        "the same command again runs the rest",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once on the same machine (for top-1 only: their times then share it)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny runs on CPU under TRITON_INTERPRET=1 (checks the flow)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")


def run_one(args, variant_overrides: list[str], seed: int, run_dir: Path) -> dict:
    overrides = [
        f"run.dir={run_dir}",
        f"run.seed={seed}",
        "log.progress=false",
        *(DRY_RUN if args.dry_run else []),
        *args.overrides,
        *variant_overrides,
    ]
    prefix, env = launcher(args.gpus, {**os.environ, "PYTHONWARNINGS": "ignore"})
    cmd = [sys.executable, *prefix, str(REPO / "launch" / "train.py"), "--config", args.config, *overrides]
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    begun = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"timed out after {args.timeout:g} s", "wall_s": time.monotonic() - begun}
    wall_s = time.monotonic() - begun
    if done.returncode != 0:
        tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        return {"note": f"exit {done.returncode}: {' | '.join(tail)[:300]}", "wall_s": wall_s}
    return {**run_record(metrics_rows(run_dir)), "wall_s": wall_s}


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def run_record(rows: list[dict]) -> dict:
    """What a study keeps of one run, from its metrics rows (see the module docstring)."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_top1" in r]
    settled = train[len(train) // 5 :]  # past warm-up and compilation
    head_ms = [r["head_ms"] for r in settled if r.get("head_ms") is not None]
    active = [r["active_classes"] for r in settled if r.get("active_classes") is not None]
    recalls = {name: [r[name] for r in settled if r.get(name) is not None] for name in RECALLS}
    # Steps of updates the searched index or graph lags the weights by: a background build
    # slower than head.rebuild_every steps leaves it older than the cadence says.
    ages = [r["index_age"] for r in settled if r.get("index_age") is not None]
    sent = [r["bytes_backbone_allreduce"] for r in train if r.get("bytes_backbone_allreduce") is not None]
    return {
        "loss_curve": [[r["step"], r["loss"]] for r in train],
        "eval_curve": [[r["step"], r["eval_top1"]] for r in evals],
        "train_loss": train[-1]["loss"] if train else None,
        "eval_top1": evals[-1]["eval_top1"] if evals else None,
        "eval_top5": evals[-1]["eval_top5"] if evals else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_hard_negative_share": evals[-1].get("eval_hard_negative_share") if evals else None,
        "head_ms": statistics.median(head_ms) if head_ms else None,
        "active_classes": statistics.mean(active) if active else None,
        **{name: statistics.mean(values) if values else None for name, values in recalls.items()},
        "index_age": statistics.mean(ages) if ages else None,
        "peak_mib": max((r.get("peak_mem_mib") or 0) for r in train) if train else None,
        # what one rank (worker) hands to the backbone's exchange per step, over the logged steps
        "backbone_bytes_mean": statistics.mean(sent) if sent else None,
        "steps": train[-1]["step"] if train else 0,
    }


def run_study(
    args,
    variants: dict[str, list[str]],
    *,
    what: str,
    extra_fields=lambda variant: {},
    plot=None,
) -> None:
    """Run every (variant, seed) not yet in the rows file; write the JSON; print the summary.

    ``args.time_budget`` (seconds): after the first run of this call, no run starts once the
    time spent so far plus the run's expected time (its variant's slowest, in this call or
    recorded in the rows file) would pass it; a re-run of the same command does the rest.
    ``plot(payload, png)`` draws ``<name>.png`` (default: held-out top-1 per variant as bars).
    """
    seeds = [int(v) for v in args.seeds.split(",")]
    if args.jobs < 1:
        sys.exit(f"--jobs must be at least 1, got {args.jobs}")
    base = [*(DRY_RUN if args.dry_run else []), *args.overrides]
    cfg = load_config(args.config, base)
    G, D, C = cfg.train.global_batch, cfg.model.embed_dim, cfg.head.num_classes
    tflops = bf16_matmul_tflops() if torch.cuda.is_available() else None
    floor_ms = 8 * G * D * (C / args.gpus) / (tflops * 1e12) * 1e3 if tflops else None

    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = out_dir / f"{args.name}.rows.jsonl"
    records = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    workers = cfg.comm.simulate_workers
    simulated = f" simulating {workers} workers" if workers > 1 else ""
    shape = f"G={G} D={D} C={C} over {args.gpus} rank(s){simulated}, {cfg.train.steps} steps"

    def same_study(r: dict) -> bool:
        """Rows of another config or other overrides are not this study's (rows from before
        these fields were recorded match on the shape alone)."""
        return (
            r["shape"] == shape
            and r.get("config", args.config) == args.config
            and r.get("run_overrides", args.overrides) == args.overrides
        )

    started, ran, time_budget = time.monotonic(), 0, args.time_budget
    # A run is expected to take as long as its variant's slowest so far (variants differ
    # several-fold), or the slowest of this call's variants for one not run yet.
    walls: dict[str, float] = {}
    for r in records:
        if same_study(r) and r.get("wall_s") and r["method"] in variants:
            walls[r["method"]] = max(walls.get(r["method"], 0.0), r["wall_s"])
    # A row counts only if it ran its variant's overrides of today (a renamed default must rerun).
    done = {
        (r["method"], r["seed"])
        for r in records
        if same_study(r) and not r.get("note") and r.get("overrides") == variants.get(r["method"])
    }
    todo = [(method, seed) for seed in seeds for method in variants if (method, seed) not in done]
    left, pending = 0, {}

    def run_in_tmp(variant_overrides: list[str], seed: int) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            return run_one(args, variant_overrides, seed, Path(tmp) / "run")

    def finish(future) -> None:
        nonlocal ran
        method, seed = pending.pop(future)
        variant_overrides = variants[method]
        result = future.result()
        walls[method], ran = max(walls.get(method, 0.0), result["wall_s"]), ran + 1
        selection = load_config(args.config, [*base, *variant_overrides]).head.selection
        ms = result.get("head_ms")
        row = {
            "method": method,
            "shape": shape,
            "config": args.config,
            "run_overrides": args.overrides,
            **extra_fields(method),
            "overrides": variant_overrides,
            "seed": seed,
            "ms": ms,
            "floor_ms": floor_ms,
            "ratio": ms / floor_ms if ms and floor_ms else None,
            # Rows a shard scores per step: all of it under full softmax (which logs none).
            "rows_per_step": C / args.gpus if selection == "full" else result.get("active_classes"),
            # Runs that shared the machine: their times are not one run's alone.
            "jobs": args.jobs,
            **result,
        }
        print(json.dumps(row), flush=True)
        records.append(row)
        with rows_file.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for method, seed in todo:
            while len(pending) >= args.jobs:
                for future in concurrent.futures.wait(pending, return_when="FIRST_COMPLETED").done:
                    finish(future)
            expected = walls.get(method, max(walls.values(), default=0.0))
            if (ran or pending) and time_budget is not None and time.monotonic() - started + expected > time_budget:
                left += 1  # a faster variant's run may still fit
                continue
            print(f"== {method} seed {seed}", flush=True)
            pending[pool.submit(run_in_tmp, variants[method], seed)] = (method, seed)
        while pending:
            finish(next(concurrent.futures.as_completed(pending)))
    if left:
        print(f"time budget {time_budget:g} s: {left} run(s) left for a re-run", file=sys.stderr)

    rows = [r for r in records if same_study(r) and not r.get("note")]
    failed = [r for r in records if same_study(r) and r.get("note")]
    summary = summarize(rows, list(variants))
    payload = {
        **environment(),
        "benchmark": args.name,
        "config": args.config,
        "overrides": args.overrides,
        "eval_samples": cfg.train.eval_samples,
        "matmul_tflops_bf16": tflops,
        "floor": "8*G*D*C_r of the full head per step at the bf16 matmul rate measured in this run",
        "what": what,
        "summary": summary,
        "rows": rows,
    }
    path = write_results(args.name, payload)
    (plot or plot_study)(payload, path.with_suffix(".png"))
    plot_curves(payload, path.with_name(f"{path.stem}_curves.png"))
    print(f"\nwrote {path}")
    for r in failed:
        print(f"failed: {r['method']} seed {r['seed']}: {r['note']}", file=sys.stderr)
    if not summary:
        sys.exit("no run finished")
    print_table(
        summary,
        [
            "method",
            "seeds",
            "eval_top1_mean",
            "eval_top1_spread",
            "eval_loss_mean",
            "eval_hard_negative_share_mean",
            "active_classes_mean",
            *(f"{name}_mean" for name in RECALLS),
            "index_age_mean",
            "head_ms_median",
        ],
    )


def summarize(rows: list[dict], first: list[str] = ()) -> list[dict]:
    """Mean and spread over seeds per method: ``first`` in its order, then any other method of the rows."""
    summary = []
    for method in dict.fromkeys([*first, *(r["method"] for r in rows)]):
        group = [r for r in rows if r["method"] == method and r.get("eval_top1") is not None]
        if not group:
            continue
        top1 = [r["eval_top1"] for r in group]
        active = [r["active_classes"] for r in group if r.get("active_classes") is not None]
        rows_per_step = [r["rows_per_step"] for r in group if r.get("rows_per_step") is not None]
        recalls = {name: [r[name] for r in group if r.get(name) is not None] for name in RECALLS}
        times = [r["ms"] for r in group if r["ms"] is not None]
        shares = [r["eval_hard_negative_share"] for r in group if r.get("eval_hard_negative_share") is not None]
        ages = [r["index_age"] for r in group if r.get("index_age") is not None]
        summary.append(
            {
                "method": method,
                "seeds": len(group),
                "eval_top1_mean": statistics.mean(top1),
                "eval_top1_spread": max(top1) - min(top1),
                "eval_top1_stdev": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                "eval_loss_mean": statistics.mean(r["eval_loss"] for r in group),
                "eval_hard_negative_share_mean": statistics.mean(shares) if shares else None,
                "train_loss_mean": statistics.mean(r["train_loss"] for r in group),
                "active_classes_mean": statistics.mean(active) if active else None,
                "rows_per_step_mean": statistics.mean(rows_per_step) if rows_per_step else None,
                **{f"{name}_mean": statistics.mean(values) if values else None for name, values in recalls.items()},
                "index_age_mean": statistics.mean(ages) if ages else None,
                "head_ms_median": statistics.median(times) if times else None,
            }
        )
    return summary


def plot_curves(payload: dict, png: Path) -> None:
    """Training loss and held-out top-1 against steps, one colour per variant, one line per seed."""
    plt = pyplot()
    rows = [r for r in payload["rows"] if r.get("loss_curve")]
    if plt is None or not rows:
        return
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    for r in rows:
        label = (
            r["method"].removeprefix("hydrahead-")
            if r["seed"] == min(x["seed"] for x in rows if x["method"] == r["method"])
            else None
        )
        loss_ax.plot(*zip(*r["loss_curve"]), color=colours[r["method"]], alpha=0.7, linewidth=1, label=label)
        if r.get("eval_curve"):
            top1_ax.plot(
                *zip(*[(s, 100 * v) for s, v in r["eval_curve"]]), marker="o", color=colours[r["method"]], alpha=0.7
            )
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    top1_ax.set_xlabel("step")
    top1_ax.set_ylabel(f"held-out top-1 (%), {payload['eval_samples']:,} samples")
    loss_ax.legend(fontsize=7)
    for ax in (loss_ax, top1_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{payload['benchmark']}: {rows[0]['shape']}, {payload['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_study(payload: dict, png: Path) -> None:
    """Held-out top-1 per variant: the mean over seeds as a bar, each seed as a dot."""
    plt = pyplot()
    if plt is None or not payload["summary"]:
        return
    methods = [row["method"] for row in payload["summary"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(methods) + 2), 4.5))
    for i, row in enumerate(payload["summary"]):
        ax.bar(i, 100 * row["eval_top1_mean"], color="tab:blue" if "full" in row["method"] else "tab:orange", alpha=0.6)
        seeds = [
            100 * r["eval_top1"]
            for r in payload["rows"]
            if r["method"] == row["method"] and r.get("eval_top1") is not None
        ]
        ax.plot([i] * len(seeds), seeds, "k.", markersize=6)
    means = [100 * row["eval_top1_mean"] for row in payload["summary"]]
    spread = max(means) - min(means)
    ax.set_ylim(min(means) - max(1.0, spread), max(means) + max(1.0, spread))
    ax.set_xticks(
        range(len(methods)), [m.removeprefix("hydrahead-") for m in methods], fontsize=7, rotation=20, ha="right"
    )
    ax.set_ylabel(f"held-out top-1 (%), {payload['eval_samples']:,} samples")
    shape = payload["rows"][0]["shape"] if payload["rows"] else ""
    ax.set_title(
        f"{payload['benchmark']}: {shape}\n{payload['device']}, bars: mean over seeds, dots: seeds", fontsize=8
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    # Summarise and plot a study again from its JSON: python benchmarks/accuracy_runs.py benchmarks/results/<name>.json
    for name in sys.argv[1:]:
        path = Path(name)
        payload = json.loads(path.read_text())
        payload["summary"] = summarize(payload["rows"], [r["method"] for r in payload["summary"]])
        path.write_text(json.dumps(payload, indent=2) + "\n")
        plot_study(payload, path.with_suffix(".png"))
        print_table(
            payload["summary"],
            ["method", "seeds", "eval_top1_mean", "eval_top1_spread", "eval_loss_mean"]
            + [f"{name}_mean" for name in RECALLS],
        )
