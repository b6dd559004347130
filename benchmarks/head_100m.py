"""100M classes with the fp8 head: training on one GPU, and step time over several.

    python benchmarks/head_100m.py train                 # one GPU: configs/head_only_100m_fp8.yaml, 400 steps
    python benchmarks/head_100m.py scale --gpus 2        # knn and full softmax, global batch 4096
    python benchmarks/head_100m.py train --metrics runs/x/metrics.jsonl   # only rebuild the results

``train`` runs ``launch/train.py`` under torchrun on one GPU with the head-only config
(procedural 512-d features, one linear layer, a 100M x 512 fp8 head, no momentum,
stochastic rounding, KNN softmax) and turns its metrics.jsonl into
``benchmarks/results/head_only_100m_fp8.json`` and a PNG of the loss and held-out top-1.
``scale`` runs ``benchmarks/train_throughput.py`` under torchrun on --gpus GPUs for each
selection (the full softmax over all 100M classes, and KNN softmax) and writes
``head_100m_scale_<N>gpu.json``: step time and the peak memory of the busiest GPU. The
steps there exclude index rebuilds (see knn_speed.py for their amortised cost).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR, environment, print_table, pyplot, write_results  # noqa: E402
from hydrahead.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "head_only_100m_fp8.yaml"


def torchrun(nproc: int, script: Path, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), str(script), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")})


def machine(args) -> dict:
    """environment() of this machine, or what --device/--torch/--triton/--date say (results rebuilt
    from files copied off the machine that ran them)."""
    env = environment()
    for key in ("device", "torch", "triton", "date"):
        if getattr(args, key, None):
            env[key] = getattr(args, key)
    return env


def train_results(metrics_file: Path, cfg, overrides: list[str], env: dict) -> dict:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "head_ms" in r]
    evals = [r for r in records if "eval_top1" in r]
    if not steps:
        raise SystemExit(f"head_100m: no training steps logged in {metrics_file}")
    # Steps that waited for an index rebuild are counted apart: they are the slow few.
    typical = statistics.median(r["head_ms"] for r in steps)
    shape = f"G={cfg.train.global_batch} D={cfg.model.embed_dim} C={cfg.head.num_classes} on 1 GPU"
    row = {
        "method": f"hydrahead-fp8-{cfg.head.selection} (stochastic rounding, no momentum)",
        "shape": shape,
        "ms": typical,
        "floor_ms": None,
        "ratio": None,
        "peak_mib": max(r.get("peak_mem_mib", 0.0) for r in steps),
        "head_ms_mean": statistics.fmean(r["head_ms"] for r in steps),
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in steps),
        "loss_curve": [[r["step"], r["loss"]] for r in steps],
        "eval_curve": [[r["step"], r["eval_top1"]] for r in evals],
        "eval_top1": evals[-1]["eval_top1"] if evals else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "steps": steps[-1]["step"],
    }
    return {
        **env,
        "benchmark": "head_only_100m_fp8",
        "config": str(CONFIG.relative_to(ROOT)),
        "overrides": overrides,
        "what": "head-only training of a 100M-class fp8 head on one GPU (ms: median head time per logged step; "
        "floor: not counted, the step scores only the selected rows)",
        "rows": [row],
    }


def plot_train(payload: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    row = payload["rows"][0]
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(*zip(*row["loss_curve"]))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    if row["eval_curve"]:
        ax_top1.plot(*zip(*row["eval_curve"]), marker="o")
    ax_top1.set_xlabel("step")
    ax_top1.set_ylabel("held-out top-1 over all 100M classes")
    fig.suptitle(f"{payload['device']}: {row['method']}, {row['shape']}", fontsize=9)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def run_train(args) -> None:
    overrides = args.overrides
    cfg = load_config(CONFIG, overrides)
    metrics = Path(args.metrics) if args.metrics else None
    if metrics is None:
        run_dir = Path(tempfile.mkdtemp(prefix="head_100m_"))
        torchrun(1, ROOT / "launch" / "train.py", ["--config", str(CONFIG), f"run.dir={run_dir}", *overrides])
        metrics = run_dir / "metrics.jsonl"
    payload = train_results(metrics, cfg, overrides, machine(args))
    path = write_results("head_only_100m_fp8", payload)
    png = plot_train(payload, path)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    print_table(payload["rows"], ["method", "shape", "ms", "peak_mib", "head_ms_mean", "eval_top1", "steps"])


def run_scale(args) -> None:
    name = f"head_100m_scale_{args.gpus}gpu"
    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    rows_file = Path(args.rows) if args.rows else out_dir / f"{name}.rows.jsonl"
    if not args.rows:
        out_dir.mkdir(parents=True, exist_ok=True)
        rows_file.write_text("")
        per_gpu = args.global_batch // args.gpus
        for selection in args.selections.split(","):
            steps, warmup = (3, 1) if selection == "full" else (20, 5)  # the full softmax takes seconds a step
            torchrun(
                args.gpus,
                ROOT / "benchmarks" / "train_throughput.py",
                [
                    "--config",
                    str(CONFIG),
                    "--per-gpu-batch",
                    str(per_gpu),
                    "--steps",
                    str(steps),
                    "--warmup",
                    str(warmup),
                    "--out",
                    str(rows_file),
                    f"head.selection={selection}",
                    f"run.dir={tempfile.mkdtemp(prefix='head_100m_')}",
                ],
            )
    rows = []
    for record in (json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()):
        rows.append(
            {
                "method": f"hydrahead-fp8-{record['head_selection']}",
                "shape": f"G={record['global_batch']} D={record['embed_dim']} "
                "C={record['num_classes']} over {record['world_size']} GPUs",
                "ms": record["ms"],
                "floor_ms": None,
                "ratio": None,
                "peak_mib": record["peak_mib"],
                "samples_per_s": record["samples_per_s"],
                "steps": record["steps"],
                "gpus": record["world_size"],
            }
        )
    payload = {
        **machine(args),
        "benchmark": name,
        "what": "training step (features, gather, head, update) of a 100M-class fp8 head over the GPUs; peak_mib: "
        "the busiest GPU; knn steps exclude index rebuilds",
        "rows": rows,
    }
    path = write_results(name, payload)
    print(f"wrote {path}")
    print_table(rows, ["method", "shape", "ms", "peak_mib", "samples_per_s", "steps"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    train = sub.add_parser("train", help="one GPU: train the 100M fp8 head and record the curves")
    train.add_argument("--metrics", help="an existing run's metrics.jsonl: only rebuild the results")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    scale = sub.add_parser("scale", help="step time and memory per GPU, full softmax and knn")
    scale.add_argument("--gpus", type=int, default=4, help="GPUs (the classes are split over them)")
    scale.add_argument("--global-batch", type=int, default=4096, help="samples per step over all GPUs")
    scale.add_argument("--selections", default="knn,full", help="comma-separated head.selection values")
    scale.add_argument("--rows", help="existing train_throughput rows (JSON lines): only rebuild the results")
    for command in (train, scale):
        for key in ("device", "torch", "triton", "date"):
            command.add_argument(f"--{key}", help=f"with --metrics/--rows: the {key} of the machine that ran them")
    args = parser.parse_args(argv)
    (run_train if args.what == "train" else run_scale)(args)


if __name__ == "__main__":
    main()
