"""One group's top-k as a list-grouped graph build takes it: torch.topk against
``hydrahead.head.index.topk_by_blocks``, on the group shapes a build meets.

    python benchmarks/topk_blocks.py                      # GPU: the shapes of 4, 8 and 16 lists
    HYDRAHEAD_RESULTS_DIR=/tmp/r python benchmarks/topk_blocks.py --dry-run   # CPU, small

A group is the queries filed in one list (about 3,052 at 25M rows over 8,192 lists) scored
against the rows of the nprobe lists nearest it (12,288 at 4 lists, 49,152 at 16), float32
scores, k = graph_k + 1 = 17. floor_ms: reading the scores once at the device-copy rate
measured in this run (half of a copy's traffic): what any selection must read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    copy_bandwidth_gbps,
    cpu_time_ms,
    cuda_time_ms,
    environment,
    median,
    print_table,
    write_results,
)
from hydrahead.head.index import topk_by_blocks  # noqa: E402

SHAPES = "3052x12288,3052x24576,3052x49152,512x12288"
BLOCKS = "64,128,256"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated queries x candidates")
    parser.add_argument("--blocks", default=BLOCKS, help="comma-separated block sizes of topk_by_blocks")
    parser.add_argument("--k", type=int, default=17, help="best rows kept per query (graph_k + 1)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per row (median reported)")
    parser.add_argument("--name", default="topk_blocks", help="results file name (without .json)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    shapes = "64x2048,64x4096" if args.dry_run else args.shapes
    blocks = [int(b) for b in args.blocks.split(",")]
    copy_gbps = copy_bandwidth_gbps(device) if device.type == "cuda" else None

    def timed(fn) -> float:
        if device.type == "cuda":
            return median(cuda_time_ms(fn, warmup=3, reps=args.reps))
        return median(cpu_time_ms(fn, warmup=1, reps=min(args.reps, 3)))

    rows = []
    for shape in shapes.split(","):
        queries, candidates = (int(n) for n in shape.split("x"))
        scores = torch.randn(queries, candidates, device=device)
        want = scores.topk(args.k, dim=1).values
        floor_ms = 4 * queries * candidates / (copy_gbps * 1e9 / 2) * 1e3 if copy_gbps else None
        methods = [("torch.topk", lambda: scores.topk(args.k, dim=1))]
        methods += [(f"hydrahead topk_by_blocks B={b}", lambda b=b: topk_by_blocks(scores, args.k, b)) for b in blocks]
        for method, fn in methods:
            same = torch.equal(fn()[0], want)  # the same values as torch.topk, or the row says so
            ms = timed(fn)
            rows.append(
                {
                    "method": method,
                    "shape": f"{queries}x{candidates} float32, k={args.k}",
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "ratio": ms / floor_ms if floor_ms else None,
                    "peak_mib": None,
                    "same_values": same,
                }
            )
    print_table(rows, ["method", "shape", "ms", "floor_ms", "ratio", "same_values"])
    payload = {**environment(), "benchmark": args.name, "copy_gbps": copy_gbps, "settings": vars(args), "rows": rows}
    print(f"wrote {write_results(args.name, payload)}")
    if not all(row["same_values"] for row in rows):
        sys.exit("topk_by_blocks found other values than torch.topk")


if __name__ == "__main__":
    main()
