"""Training throughput over GPU counts: the full step beside the backbone alone.

    python benchmarks/train_scaling.py --config configs/resnet50_1m.yaml --gpus 1,2,4

Launches ``train_throughput.py`` under torchrun for every (GPU count, mode), appending rows
to ``<name>.rows.jsonl`` and skipping those already there, then writes
``benchmarks/results/<name>.json`` and a PNG plot. The per-GPU batch is fixed (weak
scaling), so the global batch grows with the GPU count. Floor per step: the backbone's
training FLOPs (3x its forward, counted with torch's FLOP counter) plus the head's
6·G·D·C_r, per GPU, at the bf16 matmul rate measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_DIR, bf16_matmul_tflops, environment, print_table, pyplot, write_results  # noqa: E402
from hydrahead.config import load_config  # noqa: E402
from hydrahead.models import build_backbone  # noqa: E402

HERE = Path(__file__).resolve().parent


def backbone_forward_flops(cfg) -> float:
    """FLOPs of one sample's forward pass through the backbone."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_backbone(cfg.model.backbone, cfg.model.embed_dim, image_size=cfg.data.image_size).to("meta").eval()
    sample = torch.empty(1, 3, cfg.data.image_size, cfg.data.image_size, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(sample)
    return float(counter.get_total_flops())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/resnet50_1m.yaml")
    parser.add_argument("--gpus", default="1,2,4", help="comma-separated GPU counts")
    parser.add_argument("--per-gpu-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--name", default="train_scaling_resnet50_1m")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs CUDA devices")

    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = out_dir / f"{args.name}.rows.jsonl"
    done = set()
    if rows_file.is_file():
        done = {(r["mode"], r["world_size"]) for r in map(json.loads, rows_file.read_text().splitlines())}

    for gpus in (int(g) for g in args.gpus.split(",")):
        if gpus > torch.cuda.device_count():
            print(f"skipping {gpus} GPUs: only {torch.cuda.device_count()} visible", file=sys.stderr)
            continue
        for mode in ("backbone", "full"):
            if (mode, gpus) in done:
                continue
            cmd = [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                str(HERE / "train_throughput.py"), "--config", args.config, "--mode", mode,
                "--per-gpu-batch", str(args.per_gpu_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--out", str(rows_file), f"run.dir=/tmp/hydrahead_bench_{gpus}_{mode}", *args.overrides,
            ]
            print(f"== {mode}, {gpus} GPU(s)", flush=True)
            subprocess.run(cmd, check=True)

    cfg = load_config(args.config, args.overrides)
    tflops = bf16_matmul_tflops()
    train_flops_per_sample = 3 * backbone_forward_flops(cfg)
    rows = []
    for r in map(json.loads, rows_file.read_text().splitlines()):
        n, per_gpu = r["world_size"], r["per_gpu_batch"]
        head_flops = 6 * r["global_batch"] * r["embed_dim"] * (r["num_classes"] / n) if r["mode"] == "full" else 0.0
        floor_ms = (per_gpu * train_flops_per_sample + head_flops) / (tflops * 1e12) * 1e3
        method = (
            f"hydrahead-reference ({r['backbone']} + {r['num_classes']:,}-class head)" if r["mode"] == "full"
            else f"{r['backbone']} backbone only (no head)"
        )
        rows.append({
            "method": method, "gpus": n,
            "shape": f"{n} GPU x {per_gpu} x 3x{r['image_size']}x{r['image_size']}, C={r['num_classes']}, D={r['embed_dim']}",
            "ms": r["ms"], "floor_ms": floor_ms, "ratio": r["ms"] / floor_ms, "peak_mib": r["peak_mib"],
            "samples_per_s": r["samples_per_s"], "samples_per_s_per_gpu": r["samples_per_s"] / n,
        })
    rows.sort(key=lambda row: (row["gpus"], row["method"]))
    payload = {
        **environment(), "benchmark": args.name, "gpus_visible": torch.cuda.device_count(),
        "matmul_tflops_bf16": tflops, "backbone_train_gflop_per_sample": train_flops_per_sample / 1e9,
        "what": "one training step per row, weak scaling (fixed per-GPU batch), bf16 autocast, eager",
        "rows": rows,
    }
    path = write_results(args.name, payload)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({r["method"] for r in rows}):
            pts = [(r["gpus"], r["samples_per_s"]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("samples / s")
        ax.set_title(f"{payload['device']}: {cfg.model.backbone}, {args.per_gpu_batch} per GPU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
        plt.close(fig)
    print(f"\nbf16 matmul {tflops:.0f} TFLOP/s; wrote {path}")
    print_table(rows, ["method", "gpus", "ms", "samples_per_s", "ratio", "peak_mib"])


if __name__ == "__main__":
    main()
