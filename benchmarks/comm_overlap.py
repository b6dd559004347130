r"""Step time with the head's exchanges overlapped and the backbone's gradients compressed,
over NVLink and over NCCL's socket transport (the stand-in for a network between nodes).

    python benchmarks/comm_overlap.py --config configs/resnet50_1m.yaml --gpus 1,2 --transports nvlink,socket
    python benchmarks/comm_overlap.py --config configs/vit_base_10m.yaml --name comm_overlap_vit_b \
        head.num_classes=1000000

For every (GPU count, transport) ``train_throughput.py`` runs under torchrun once and
measures each variant in turn (serial head, overlapped head, and the overlapped head with
each gradient compression); rows go to ``<name>.rows.jsonl`` as they finish and a re-run
skips those already there. The socket transport is NCCL with NCCL_P2P_DISABLE=1,
NCCL_SHM_DISABLE=1 and NCCL_IB_DISABLE=1. Each row gives the step time, the time and
bytes of every collective, the share of the head's communication hidden behind compute
(1 - waited / busy, from the timed steps), and the floor: the backbone's training FLOPs
per GPU plus the head's 6·G·D·C_r, at the bf16 matmul rate measured in this run.
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
from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    SOCKET_ENV,
    backbone_forward_flops,
    bf16_matmul_tflops,
    environment,
    print_table,
    pyplot,
    write_results,
)
from hydrahead.config import load_config  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "serial": ["comm.overlap=false"],
    "overlap": ["comm.overlap=true"],
    "overlap-m2": ["comm.overlap=true", "comm.micro_batches=2"],
    "overlap+bf16": ["comm.overlap=true", "comm.grad_compression=bf16"],
    "overlap+powersgd": ["comm.overlap=true", "comm.grad_compression=powersgd", "comm.powersgd_start_step=2"],
    "overlap+topk": [
        "comm.overlap=true",
        "comm.grad_compression=topk",
        "comm.topk_density=0.001",
        "comm.topk_warmup_steps=0",
    ],
}


def head_hidden(row: dict) -> float | None:
    """Share of the head's two exchanges (gather, reduce-scatter) hidden behind compute."""
    busy = row.get("ms_feature_gather", 0.0) + row.get("ms_grad_scatter", 0.0)
    waited = row.get("ms_feature_gather_waited", 0.0) + row.get("ms_grad_scatter_waited", 0.0)
    return 1.0 - waited / busy if busy > 0 else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/resnet50_1m.yaml")
    parser.add_argument("--gpus", default="1,2", help="comma-separated GPU counts (weak scaling: fixed per-GPU batch)")
    parser.add_argument("--transports", default="nvlink,socket", help="nvlink and/or socket (GPU counts above 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--micro-batches", type=int, default=4, help="comm.micro_batches of the overlapped variants")
    parser.add_argument("--per-gpu-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--name", default="comm_overlap_resnet50_1m")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs CUDA devices")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    out_dir = Path(os.environ.get("HYDRAHEAD_RESULTS_DIR", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_file = out_dir / f"{args.name}.rows.jsonl"
    records = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    done = {(r["variant"], r["world_size"], r["transport"]) for r in records}

    for gpus in (int(g) for g in args.gpus.split(",")):
        if gpus > torch.cuda.device_count():
            print(f"skipping {gpus} GPUs: only {torch.cuda.device_count()} visible", file=sys.stderr)
            continue
        for link in args.transports.split(",") if gpus > 1 else ["none"]:
            todo = [v for v in variants if (v, gpus, link) not in done]
            if gpus == 1:  # one GPU has nothing to exchange: the serial and overlapped steps are enough
                todo = [v for v in todo if v in ("serial", "overlap", "overlap-m2")]
            if not todo:
                continue
            micro = f"comm.micro_batches={args.micro_batches}"
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={gpus}",
                str(HERE / "train_throughput.py"),
                "--config",
                args.config,
                "--mode",
                "full",
                "--per-gpu-batch",
                str(args.per_gpu_batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--out",
                str(rows_file),
                *[f"--variant={v}={','.join([micro, *VARIANTS[v]])}" for v in todo],
                f"run.dir=/tmp/hydrahead_comm_{gpus}_{link}",
                *args.overrides,
            ]
            env = {**os.environ, "NCCL_NVLS_ENABLE": "0", **(SOCKET_ENV if link == "socket" else {})}
            print(f"== {gpus} GPU(s), {link}: {', '.join(todo)}", flush=True)
            subprocess.run(cmd, check=True, env=env)
    records = [json.loads(line) for line in rows_file.read_text().splitlines()]

    cfg = load_config(args.config, args.overrides)
    tflops = bf16_matmul_tflops()
    train_flops_per_sample = 3 * backbone_forward_flops(cfg)
    base = {(r["world_size"], r["transport"]): r for r in records if r["variant"] == "serial"}
    nvlink = {r["variant"]: r for r in records if r["transport"] == "nvlink"}
    one_gpu = {r["variant"]: r for r in records if r["world_size"] == 1}
    rows = []
    for r in records:
        n, per_gpu = r["world_size"], r["per_gpu_batch"]
        floor_ms = (
            (per_gpu * train_flops_per_sample + 6 * r["global_batch"] * r["embed_dim"] * r["num_classes"] / n)
            / (tflops * 1e12)
            * 1e3
        )
        serial = base.get((n, r["transport"]))
        same_on_nvlink = nvlink.get(r["variant"]) if n > 1 else None
        single = one_gpu.get(r["variant"]) or one_gpu.get("serial")
        rows.append(
            {
                "method": f"hydrahead {r['variant']}",
                "variant": r["variant"],
                "gpus": n,
                "transport": r["transport"],
                "shape": f"{n} GPU x {per_gpu} x 3x{r['image_size']}x{r['image_size']}, "
                "C={r['num_classes']:,}, D={r['embed_dim']}",
                "ms": r["ms"],
                "floor_ms": floor_ms,
                "ratio": r["ms"] / floor_ms,
                "peak_mib": r["peak_mib"],
                "samples_per_s": r["samples_per_s"],
                "head_comm_hidden": head_hidden(r),
                "backbone_bytes_cut": serial["bytes_backbone_allreduce"] / r["bytes_backbone_allreduce"]
                if serial and r.get("bytes_backbone_allreduce")
                else None,
                "vs_nvlink": r["ms"] / same_on_nvlink["ms"] if same_on_nvlink and r["transport"] == "socket" else None,
                "vs_nvlink_serial": r["ms"] / nvlink["serial"]["ms"]
                if "serial" in nvlink and r["transport"] == "socket"
                else None,
                "weak_scaling_efficiency": r["samples_per_s"] / (n * single["samples_per_s"])
                if single and n > 1
                else None,
                **{
                    k: v
                    for k, v in r.items()
                    if k.startswith(("ms_", "bytes_"))
                    or k in ("comm_hidden", "head_ms", "micro_batches", "overlap", "grad_compression")
                },
            }
        )
    rows.sort(
        key=lambda row: (
            row["gpus"],
            row["transport"],
            list(VARIANTS).index(row["variant"]) if row["variant"] in VARIANTS else 99,
        )
    )
    payload = {
        **environment(),
        "benchmark": args.name,
        "config": args.config,
        "overrides": args.overrides,
        "gpus_visible": torch.cuda.device_count(),
        "matmul_tflops_bf16": tflops,
        "backbone_train_gflop_per_sample": train_flops_per_sample / 1e9,
        "transports": {"nvlink": "NCCL defaults (NVLink between the GPUs of one host)", "socket": SOCKET_ENV},
        "what": "one training step per row (median over the untimed "
        "steps' mean); communication figures are medians over "
        "steps with the clock on; head_comm_hidden = 1 - waited / "
        "busy over the feature gather and gradient reduce-scatter",
        "rows": rows,
    }
    path = write_results(args.name, payload)
    plot(payload, path.with_suffix(".png"))
    print(f"\nbf16 matmul {tflops:.0f} TFLOP/s; wrote {path}")
    print_table(
        rows,
        [
            "variant",
            "gpus",
            "transport",
            "ms",
            "ratio",
            "head_comm_hidden",
            "bytes_backbone_allreduce",
            "backbone_bytes_cut",
            "vs_nvlink_serial",
            "weak_scaling_efficiency",
            "peak_mib",
        ],
    )


def plot(payload: dict, png: Path) -> None:
    """Step time per variant, one group of bars per (GPUs, transport), with the waited communication stacked."""
    plt = pyplot()
    rows = payload["rows"]
    if plt is None or not rows:
        return
    groups = list(dict.fromkeys((r["gpus"], r["transport"]) for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * len(names) / 3 + 2), 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        for i, group in enumerate(groups):
            row = next((r for r in rows if (r["gpus"], r["transport"]) == group and r["variant"] == name), None)
            if row is None:
                continue
            ax.bar(i + j * width, row["ms"], width, color=f"C{j}", label=name if i == 0 or group == groups[0] else None)
            if row.get("head_comm_hidden") is not None:
                ax.text(
                    i + j * width,
                    row["ms"],
                    f"{100 * row['head_comm_hidden']:.0f}%",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], [f"{g} GPU, {t}" for g, t in groups])
    ax.set_ylabel("ms per training step")
    ax.set_title(f"{payload['benchmark']} on {payload['device']} (labels: head communication hidden)", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
