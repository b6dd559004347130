"""One piece of a list-grouped graph build: every group's products and top-k, in torch
(a product and a top-k per group, as ``TorchIVFIndex`` did before the kernel) against
``hydrahead.kernels.group_topk`` (two launches for the whole piece, no scores written).

    python benchmarks/group_topk.py                       # GPU: the pieces of 4 and 16 lists
    HYDRAHEAD_RESULTS_DIR=/tmp/r python benchmarks/group_topk.py --dry-run   # CPU, small

A group is the queries filed in one list (about 3,052 at 25M rows over 8,192 lists) against
the rows of the nprobe lists nearest it (12,288 candidates at 4 lists, 49,152 at 16); a
piece holds as many groups as fit in 262,144 candidate rows. Unit rows in families of 4
near-duplicates, bf16, D = 512, k = graph_k + 1 = 17.

floor_ms: the piece's products (2·Q·N·D per group, once) at the bf16 matmul rate measured
in this run. The kernel's first pass makes every product once (the tile maxima). Its
second pass makes again either each query's k best tiles, as (query, tile) pairs (about
k/96 of the products at 4 lists; ``group_topk.BY_PAIRS``, the default), or every tile that
some query of a 128-query block needs (nearly all of them), with one slot claim per query
and tile or (``CLAIM_EACH``) per survivor.
``recall``: the share of the torch path's rows that the method found (near-equal bf16
scores may swap places); ``score_err``: the largest difference of the k-th score.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (  # noqa: E402
    bf16_matmul_tflops,
    cuda_time_ms,
    environment,
    median,
    print_table,
    write_results,
)
from hydrahead.head.index import TOPK_BLOCK, topk_by_blocks  # noqa: E402
from hydrahead.kernels import group_topk as gt  # noqa: E402

PIECES = "21x3052x12288,5x3052x49152"  # groups x queries per group x candidates per group


def piece(groups: int, queries: int, candidates: int, dim: int, device, dtype, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centres = torch.randn(groups * candidates // 4, dim, generator=gen)
    rows = centres.repeat_interleave(4, dim=0) + 0.3 * torch.randn(groups * candidates, dim, generator=gen)
    rows = torch.nn.functional.normalize(rows, dim=1)
    picked = torch.cat(
        [g * candidates + torch.randint(0, candidates, (queries,), generator=gen) for g in range(groups)]
    )
    queries_t = torch.nn.functional.normalize(rows[picked] + 0.1 * torch.randn(len(picked), dim, generator=gen), dim=1)
    bounds = (
        [g * queries for g in range(groups)],
        [(g + 1) * queries for g in range(groups)],
        [g * candidates for g in range(groups)],
        [(g + 1) * candidates for g in range(groups)],
    )
    return queries_t.to(device, dtype), rows.to(device, dtype), bounds


def torch_path(queries, rows, bounds, k, blocked):
    from hydrahead.kernels.exact_gemm import matmul_fp32

    scores = torch.empty(queries.shape[0], k, device=queries.device)
    positions = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    for qs, qe, rs, re in zip(*bounds):
        products = matmul_fp32(queries[qs:qe], rows[rs:re].T) if queries.is_cuda else queries[qs:qe] @ rows[rs:re].T
        best, where = topk_by_blocks(products, k, TOPK_BLOCK) if blocked else products.topk(k, dim=1)
        scores[qs:qe], positions[qs:qe] = best, where + rs
    return scores, positions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", default=PIECES, help="comma-separated groups x queries x candidates")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=17, help="best rows kept per query (graph_k + 1)")
    parser.add_argument(
        "--reps",
        type=int,
        default=10,
        help="timed calls per row on a GPU (median reported; on the CPU, the checked call is timed once)",
    )
    parser.add_argument("--name", default="group_topk", help="results file name (without .json)")
    parser.add_argument("--dry-run", action="store_true", help="CPU under Triton's interpreter, small pieces")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 is not to be trusted
    pieces = "3x40x300" if args.dry_run else args.pieces
    dim = 32 if args.dry_run else args.dim
    small = {} if cuda else {"block_queries": 16, "block_rows": 16, "block_dims": 16}
    tflops = bf16_matmul_tflops() if cuda else None

    rows = []
    defaults = gt.BY_PAIRS, gt.CLAIM_EACH
    for spec in pieces.split(","):
        groups, queries, candidates = (int(n) for n in spec.split("x"))
        q, r, bounds = piece(groups, queries, candidates, dim, device, dtype, seed=0)
        flops = 2 * groups * queries * candidates * dim
        floor_ms = flops / (tflops * 1e12) * 1e3 if tflops else None
        want_scores, want_rows = torch_path(q, r, bounds, args.k, blocked=False)
        stats = {}

        def kernel(by_pairs: bool, claim_each: bool):
            gt.BY_PAIRS, gt.CLAIM_EACH = by_pairs, claim_each
            try:
                return gt.group_topk(q, r, *bounds, args.k, stats=stats, **small)
            finally:
                gt.BY_PAIRS, gt.CLAIM_EACH = defaults

        methods = [
            ("torch matmul + topk per group", lambda: torch_path(q, r, bounds, args.k, blocked=False)),
            (f"torch matmul + topk_by_blocks B={TOPK_BLOCK} per group", lambda: torch_path(q, r, bounds, args.k, True)),
            ("hydrahead group_topk kernel, second pass by pairs", lambda: kernel(True, False)),
            ("hydrahead group_topk kernel, second pass by tiles", lambda: kernel(False, False)),
            ("hydrahead group_topk kernel, by tiles, a slot claim per survivor", lambda: kernel(False, True)),
        ]
        for method, fn in methods:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            started = time.perf_counter()
            scores, found = fn()
            first_ms = (time.perf_counter() - started) * 1e3
            peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
            hits = (found.unsqueeze(2) == want_rows.unsqueeze(1)).any(2).float().mean().item()
            # on the CPU the interpreter's time says nothing of the kernel's: the checked call serves
            ms = median(cuda_time_ms(fn, warmup=2, reps=args.reps)) if cuda else first_ms
            rows.append(
                {
                    "method": method,
                    "shape": f"{groups} groups x {queries} queries x {candidates} candidates, D={dim}, k={args.k}",
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "ratio": ms / floor_ms if floor_ms else None,
                    "peak_mib": peak_mib,
                    "recall": hits,
                    "score_err": (scores[:, -1] - want_scores[:, -1]).abs().max().item(),
                    "survivors_mean": stats.get("survivors_mean") if "kernel" in method else None,
                    "searched_again": stats.get("searched_again") if "kernel" in method else None,
                }
            )
    print_table(rows, ["method", "shape", "ms", "floor_ms", "ratio", "peak_mib", "recall", "survivors_mean"])
    payload = {
        **environment(),
        "benchmark": args.name,
        "matmul_tflops_bf16": tflops,
        "floor": "the piece's products, 2*Q*N*D per group once, at the bf16 matmul rate measured in this run",
        "settings": vars(args),
        "rows": rows,
    }
    print(f"wrote {write_results(args.name, payload)}")
    if min(row["recall"] for row in rows) < 0.98:
        sys.exit("a method found other rows than the torch top-k")


if __name__ == "__main__":
    main()
