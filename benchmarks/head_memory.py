"""Memory of a head shard per storage choice: the model (bytes per class) against what is allocated.

    python benchmarks/head_memory.py                          # 10M classes x 512 on a GPU
    python benchmarks/head_memory.py --classes 1000000 --dry-run   # CPU: counts tensor bytes

Bytes per class of one shard's state, D = embedding width:

    weight      D x (4 fp32 | 2 bf16 | 1 fp8 e4m3)
    momentum    D x (0 none | 2 bf16 | 4 fp32)
    Kahan       D x (0 off  | 2 bf16 | 1 e5m2)

plus, with head.selection=knn and head.inactive_rows=continue, 4 bytes per class for each
row's last update (deferred SGD) and, with the torch IVF index, 8 for its list and 1 for
the updated-since-rebuild mark, plus the padded list table (8 bytes per slot). Each row
builds a ``ShardedClassifier`` of that kind and reads ``torch.cuda.memory_allocated``
before and after; ``ratio`` = measured / model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import environment, print_table, pyplot, write_results  # noqa: E402
from hydrahead.head import ShardedClassifier  # noqa: E402

BYTES = {"fp32": 4, "bf16": 2, "fp8_e4m3": 1, "e5m2": 1, "none": 0, "off": 0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
CHOICES = [  # (weight, momentum, kahan)
    ("fp32", "fp32", "off"),
    ("bf16", "fp32", "off"),
    ("bf16", "bf16", "off"),
    ("bf16", "bf16", "bf16"),
    ("fp8_e4m3", "none", "off"),
    ("fp8_e4m3", "none", "e5m2"),
    ("fp8_e4m3", "bf16", "off"),
    ("fp8_e4m3", "bf16", "bf16"),
]


def model_bytes_per_class(dim: int, weight: str, momentum: str, kahan: str) -> int:
    return dim * (BYTES[weight] + BYTES[momentum] + BYTES[kahan])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=10_000_000, help="classes in the shard")
    parser.add_argument("--dim", type=int, default=512, help="embedding width D")
    parser.add_argument("--name", default="head_memory", help="results file name (without .json)")
    parser.add_argument(
        "--choices", default=None, help="comma-separated weight/momentum/kahan triples (default: all eight)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU: count the tensors' bytes instead of the allocator's"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    choices = [tuple(c.split("/")) for c in args.choices.split(",")] if args.choices else CHOICES
    for choice in choices:
        if (
            len(choice) != 3
            or choice[0] not in DTYPES
            or choice[1] not in ("none", "bf16", "fp32")
            or choice[2] not in ("off", "bf16", "e5m2")
        ):
            parser.error(
                f"bad choice {'/'.join(choice)}: weight fp32|bf16|fp8_e4m3 "
                "/ momentum none|bf16|fp32 / kahan off|bf16|e5m2"
            )
    rows = []
    for weight, momentum, kahan in choices:
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        head = ShardedClassifier(
            args.classes,
            args.dim,
            dtype=DTYPES[weight],
            device=device,
            impl="reference",
            momentum=0.0 if momentum == "none" else 0.9,
            momentum_dtype=DTYPES.get(momentum, torch.float32),
            kahan_dtype=DTYPES.get(kahan),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
            measured = torch.cuda.memory_allocated() - before
        else:
            tensors = [head.weight, head.momentum_buffer, head.compensation]
            measured = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        model = model_bytes_per_class(args.dim, weight, momentum, kahan) * args.classes
        per_class = model // args.classes
        rows.append(
            {
                "method": f"hydrahead {weight} weight, {momentum} momentum, {kahan} kahan",
                "shape": f"C_r={args.classes} D={args.dim}",
                "weight": weight,
                "momentum": momentum,
                "kahan": kahan,
                "bytes_per_class": per_class,
                "model_mib": model / 2**20,
                "peak_mib": measured / 2**20,
                "ratio": measured / model,
                "gb_at_100m_classes": per_class * 100e6 / 1e9,
                "ms": None,
                "floor_ms": None,
            }
        )
        print(rows[-1], flush=True)
        del head
    payload = {
        **environment(),
        "benchmark": args.name,
        "what": "state of one head shard per storage choice: model vs allocated",
        "rows": rows,
    }
    path = write_results(args.name, payload)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7.5, 4))
        labels = [f"{r['weight']}/{r['momentum']}/{r['kahan']}" for r in rows]
        ax.barh(labels, [r["gb_at_100m_classes"] for r in rows], color="tab:blue")
        for limit, name in ((141, "one H200"), (80, "one H100")):
            ax.axvline(limit, color="gray", linestyle="--", linewidth=0.8)
            ax.text(limit, len(rows) - 0.5, f" {name}", fontsize=7, va="top")
        ax.set_xlabel(f"GB of head state at 100M classes x {args.dim} (weight/momentum/Kahan)")
        ax.set_title(
            f"{payload['device']}: measured/model "
            f"{min(r['ratio'] for r in rows):.3f}-{max(r['ratio'] for r in rows):.3f}",
            fontsize=9,
        )
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
        plt.close(fig)
    print(f"\nwrote {path}")
    print_table(
        rows, ["weight", "momentum", "kahan", "bytes_per_class", "model_mib", "peak_mib", "ratio", "gb_at_100m_classes"]
    )


if __name__ == "__main__":
    main()
