"""The knn selection's search on one shard: IVF list scoring against the memory floor.

    python benchmarks/ivf_search.py                                # the shards of 100M/2, 100M/4 and 10M/2
    python benchmarks/ivf_search.py --shapes 50000000:512 --sweep  # also the kernel's other tile shapes
    HYDRAHEAD_RESULTS_DIR=/tmp/r python benchmarks/ivf_search.py --dry-run   # CPU, tiny shard

One rank's search as training runs it (configs/resnet50_100m_fp8.yaml): fp8 rows in
families of near-duplicates, a cosine IVF index of 8,192 lists with 4 probed, G queries
near their class's row, 16 neighbours each.

  hydrahead-ivf-kernel   ``probed_list_scores`` alone: every probed list's rows against
                         the queries that probe it, the rows' norms read as the selector
                         keeps them (``norms-summed``: summed in the same pass instead)
  hydrahead-ivf-search   ``TorchIVFIndex.search``: probes, list scoring, top-k; with its
                         recall@k against exact search on 64 queries

The search reads every row of every probed list once (D bytes of fp8 plus its 8-byte row
number), so its floor is those bytes at the device's memory bandwidth, measured in the
same run with a device-to-device copy. The products themselves (2·D FLOPs per row and
probing query) are a few GFLOP: far below the memory time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import copy_bandwidth_gbps, environment, print_table, write_results  # noqa: E402
from benchmarks.knn_speed import family_weights_, peak_extra_mib, time_ms  # noqa: E402
from hydrahead.head.active import RowNorms  # noqa: E402
from hydrahead.head.index import TorchIVFIndex, exact_topk, recall_at_k  # noqa: E402

# Tile shapes --sweep tries beside the kernel's own (hydrahead.kernels.ivf_scores.Tiles fields).
SWEEP = [
    dict(dims=64),
    dict(dims=256),
    dict(dims=256, rows=32, warps=2),
    dict(rows=32, warps=2),
    dict(rows=32, row_split=32),
    dict(row_split=32),
    dict(stages=2),
    dict(stages=4),
]


def probed_bytes(index: TorchIVFIndex, queries: torch.Tensor, row_bytes: int) -> tuple[int, int]:
    """(rows of the lists probed at least once, bytes the search must read for them)."""
    probes = (queries.float() @ index._centroids.T).topk(min(index.nprobe, index.nlist), dim=1).indices
    lists = torch.unique(probes)
    rows = int(index._lengths[lists].sum())
    return rows, rows * (row_bytes + index._table.element_size())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes",
        default="50000000:512,25000000:1024,5000000:512",
        help="comma-separated C_r:G (rows of the shard : queries of the global batch)",
    )
    parser.add_argument("--dim", type=int, default=512, help="embedding width D")
    parser.add_argument("--nlist", type=int, default=8192)
    parser.add_argument("--nprobe", type=int, default=4)
    parser.add_argument("--knn-k", type=int, default=16)
    parser.add_argument("--noise", type=float, default=1.0, help="query noise relative to its unit class row")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel with the tile shapes in SWEEP")
    parser.add_argument("--name", default="ivf_search", help="results file name (without .json)")
    parser.add_argument("--dry-run", action="store_true", help="a tiny shard on CPU (fp32, Triton interpreter)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.shapes, args.dim, args.nlist, args.reps = "4000:32", 32, 16, 2
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run)")
    try:
        shapes = [tuple(int(v) for v in item.split(":")) for item in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes takes C_r:G pairs, got {args.shapes!r}")
    from hydrahead.kernels import ivf_scores  # after TRITON_INTERPRET is set

    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.float8_e4m3fn
    bandwidth = copy_bandwidth_gbps(device, 4 << 30) if device.type == "cuda" else None
    print(f"memory bandwidth {bandwidth or 0:.0f} GB/s (device copy)", flush=True)
    rows_out = []
    for num_rows, batch in shapes:
        shape = f"C_r={num_rows} G={batch} D={args.dim} nlist={args.nlist} nprobe={args.nprobe}"
        print(f"building {shape}", flush=True)
        weight = torch.empty(num_rows, args.dim, dtype=dtype, device=device)
        family_weights_(weight, 4, 0.3, seed=2, std=1.0)  # unit rows, as head.unit_scaling stores fp8 weights
        index = TorchIVFIndex(nlist=args.nlist, nprobe=args.nprobe, cosine=True, copy_weights=False)
        index.build(weight)
        gen = torch.Generator(device=device).manual_seed(1)
        labels = torch.randint(0, num_rows, (batch,), generator=gen, device=device)
        queries = torch.nn.functional.normalize(weight[labels].float(), dim=1)
        queries = torch.nn.functional.normalize(
            queries + torch.randn(queries.shape, generator=gen, device=device) * (args.noise / args.dim**0.5), dim=1
        )
        probes = (queries @ index._centroids.T).topk(args.nprobe, dim=1).indices
        rows, bytes_read = probed_bytes(index, queries, args.dim * weight.element_size())
        floor_ms = bytes_read / (bandwidth * 1e9) * 1e3 if bandwidth else None
        common = dict(
            shape=shape,
            floor_ms=floor_ms,
            rows_scored=rows,
            bytes_read=bytes_read,
            max_list=int(index._table.shape[1]),
            mean_list=num_rows / index.nlist,
        )

        def record(method, ms, peak, **extra):
            row = {
                "method": method,
                "ms": ms,
                "ratio": ms / floor_ms if floor_ms else None,
                "peak_mib": peak,
                **common,
                **extra,
            }
            rows_out.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

        # Row norms as the selector keeps them (hydrahead.head.active.RowNorms), or summed in the kernel's pass.
        inv_norms = RowNorms().current(weight, 0)
        variants = [
            ("hydrahead-ivf-kernel", ivf_scores.TILES, inv_norms),
            ("hydrahead-ivf-kernel norms-summed", ivf_scores.TILES, None),
        ]
        if args.sweep:
            variants += [
                (f"hydrahead-ivf-kernel {t}", dataclasses.replace(ivf_scores.TILES, **t), inv_norms) for t in SWEEP
            ]
        for method, tiles, norms in variants:

            def kernel(tiles=tiles, norms=norms):
                return ivf_scores.probed_list_scores(
                    weight,
                    queries,
                    index._table,
                    probes,
                    normalize=True,
                    lengths=index._lengths,
                    inv_norms=norms,
                    tiles=tiles,
                )

            record(
                method,
                time_ms(kernel, device, args.reps),
                peak_extra_mib(kernel, device),
                tiles=dataclasses.asdict(tiles),
            )
        search = lambda: index.search(queries, args.knn_k, weight, row_inv_norms=inv_norms)  # noqa: E731
        sample = slice(0, min(64, batch))
        _, found = search()
        _, exact = exact_topk(queries[sample], weight, args.knn_k, cosine=True)
        record(
            "hydrahead-ivf-search",
            time_ms(search, device, args.reps),
            peak_extra_mib(search, device),
            knn_recall=recall_at_k(found[sample], exact),
        )
        weight = index = None  # free the shard before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()

    payload = {
        **environment(),
        "benchmark": args.name,
        "memory_gbs": bandwidth,
        "floor": "bytes of the probed lists' rows (D fp8 bytes + "
        "an 8-byte row number each) at the device-copy bandwidth",
        "settings": {
            "dim": args.dim,
            "nlist": args.nlist,
            "nprobe": args.nprobe,
            "knn_k": args.knn_k,
            "noise": args.noise,
            "weights": str(dtype),
            "families": "4 rows, spread 0.3",
            "reps": args.reps,
        },
        "rows": rows_out,
    }
    path = write_results(args.name, payload)
    print(f"\nwrote {path}")
    print_table(
        rows_out, ["method", "shape", "ms", "floor_ms", "ratio", "rows_scored", "max_list", "knn_recall", "peak_mib"]
    )


if __name__ == "__main__":
    main()
