"""Each query's k best candidates in a list-grouped search, without writing its scores.

A class-graph build scores every row of a shard against the rows of the few lists around
its own (``TorchIVFIndex.search_by_list_groups``). Written out, those scores are about
3,000 x 12,000 float32 per group, and torch's top-k over them takes ten times longer than
their product. Here no score reaches memory:

1. ``maxima``: each (block of queries, tile of ``block_rows`` candidates) program scores its
   tile and keeps, per query, the tile's best score.
2. The k-th best of a query's tile maxima is a threshold t: the k best maxima are k
   scores, all >= t, from k different tiles, so the query's k-th best score is >= t and
   each of its k best scores is >= t.
3. ``survivors``: the same programs score their tiles again (skipping tiles where no query
   of the block reaches its threshold) and keep the scores >= t, each query claiming slots
   in its own row of ``cap`` with one atomic add per tile.
4. A top-k over the (queries x cap) survivors. A query with more than ``cap`` survivors
   (many equal scores) is searched again exactly, in torch.

Both passes run one kernel, so a recomputed score equals the first pass's bit for bit;
the threshold is still lowered by 2^-20 of its size, in case a compiler orders the two
passes' products differently. The products run in the operands' dtype (bf16 on the GPU;
fp32 exact, ``input_precision="ieee"``) with fp32 accumulation, as ``matmul_fp32`` does
for the torch path. A group with fewer than k tiles takes the torch path (its threshold
would be no bound).

Groups lie end to end: group g's queries are rows ``[query_start[g], query_end[g])`` of
``queries`` and its candidates rows ``[row_start[g], row_end[g])`` of ``rows``; results
give positions in ``rows``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK_ROWS", "CAP", "group_topk", "group_topk_reference", "kernel_groups"]

BLOCK_QUERIES = 128
BLOCK_ROWS = 128  # candidates per tile: the granularity of the threshold
BLOCK_DIMS = 64
CAP = 128  # survivors kept per query; families of near-duplicate rows put several in one tile
_SLACK = 2.0**-20


@triton.jit(do_not_specialize=["max_tiles", "cap"])
def _group_tiles_kernel(
    Q,
    R,
    ITEM_QUERY,
    ITEM_ROW,
    ITEM_GROUP,
    QUERY_END,
    ROW_START,
    ROW_END,
    MAXIMA,
    THRESHOLD,
    COUNT,
    OUT_SCORE,
    OUT_ROW,
    D,
    stride_q,
    stride_r,
    max_tiles,
    cap,
    SURVIVORS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    item = tl.program_id(0)
    first_query = tl.load(ITEM_QUERY + item)
    first_row = tl.load(ITEM_ROW + item)
    group = tl.load(ITEM_GROUP + item)
    query_end = tl.load(QUERY_END + group)
    row_end = tl.load(ROW_END + group)
    tile = (first_row - tl.load(ROW_START + group)) // BLOCK_R
    queries = first_query + tl.arange(0, BLOCK_Q)
    rows = first_row + tl.arange(0, BLOCK_R)
    query_in = queries < query_end
    row_in = rows < row_end
    queries64 = queries.to(tl.int64)
    tile_at = MAXIMA + queries64 * max_tiles + tile
    needed = 1
    if SURVIVORS:
        threshold = tl.load(THRESHOLD + queries, mask=query_in, other=float("inf"))
        tile_max = tl.load(tile_at, mask=query_in, other=float("-inf"))
        needed = tl.max((tile_max >= threshold).to(tl.int32), axis=0)
    if needed > 0:
        acc = tl.zeros((BLOCK_Q, BLOCK_R), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_in = dims < D
            q_at = Q + queries64[:, None] * stride_q + dims[None, :]
            r_at = R + rows.to(tl.int64)[:, None] * stride_r + dims[None, :]
            q = tl.load(q_at, mask=query_in[:, None] & dim_in[None, :], other=0.0)
            r = tl.load(r_at, mask=row_in[:, None] & dim_in[None, :], other=0.0)
            acc = tl.dot(q, tl.trans(r), acc, input_precision=PRECISION)
        scores = tl.where(row_in[None, :], acc, float("-inf"))
        if SURVIVORS:
            keep = (scores >= threshold[:, None]) & row_in[None, :] & query_in[:, None]
            kept = keep.to(tl.int32)
            count = tl.sum(kept, axis=1)
            # One atomic per query and tile claims the tile's slots; each survivor then takes
            # its place among them by a running count along the tile.
            base = tl.atomic_add(COUNT + queries, count, mask=query_in & (count > 0), sem="relaxed")
            slot = base[:, None] + tl.cumsum(kept, axis=1) - 1
            stored = keep & (slot < cap)
            at = queries64[:, None] * cap + slot
            tl.store(OUT_SCORE + at, scores, mask=stored)
            tl.store(OUT_ROW + at, rows[None, :], mask=stored)
        else:
            tl.store(tile_at, tl.max(scores, axis=1), mask=query_in)


def kernel_groups(num_candidates: int, k: int, block_rows: int = BLOCK_ROWS) -> bool:
    """Whether a group of ``num_candidates`` takes the kernel: it needs k tiles for a threshold."""
    return -(-num_candidates // block_rows) >= k


def group_topk_reference(queries, rows, query_start, query_end, row_start, row_end, k: int):
    """Each group's products and top-k in torch (float64 when the operands are): the same
    (scores, positions) as ``group_topk`` up to the order of equal scores."""
    out_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    scores = torch.full((queries.shape[0], k), -math.inf, dtype=out_dtype, device=queries.device)
    positions = torch.full((queries.shape[0], k), -1, dtype=torch.long, device=queries.device)
    for qs, qe, rs, re in zip(query_start, query_end, row_start, row_end):
        if qe <= qs or re <= rs:
            continue
        products = (queries[qs:qe] @ rows[rs:re].T).to(out_dtype)
        take = min(k, re - rs)
        best, where = products.topk(take, dim=1)
        scores[qs:qe, :take], positions[qs:qe, :take] = best, where + rs
    return scores, positions


def _work_items(query_start, query_end, row_start, row_end, block_queries, block_rows, device):
    """Every (query block, candidate tile) of every group, as three int32 columns; a group's
    tiles of one query block come one after another, so they share that block in L2."""
    items_query, items_row, items_group = [], [], []
    for group, (qs, qe, rs, re) in enumerate(zip(query_start, query_end, row_start, row_end)):
        tiles = range(rs, re, block_rows)
        for first_query in range(qs, qe, block_queries):
            items_query.extend([first_query] * len(tiles))
            items_row.extend(tiles)
            items_group.extend([group] * len(tiles))
    table = torch.tensor([items_query, items_row, items_group], dtype=torch.int32)
    return table.to(device, non_blocking=True)


def group_topk(
    queries: torch.Tensor,
    rows: torch.Tensor,
    query_start: list[int],
    query_end: list[int],
    row_start: list[int],
    row_end: list[int],
    k: int,
    *,
    cap: int = CAP,
    block_queries: int = BLOCK_QUERIES,
    block_rows: int = BLOCK_ROWS,
    block_dims: int = BLOCK_DIMS,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, positions), each (queries, k), best first: every query's k best rows of its
    group (positions in ``rows``). Queries outside every group get -inf and -1. Every group
    must have at least k tiles (``kernel_groups``); ``stats``, when given, receives the
    survivors' mean and the count of queries searched again."""
    if queries.dim() != 2 or rows.dim() != 2 or queries.shape[1] != rows.shape[1]:
        raise ValueError(f"group_topk: queries {tuple(queries.shape)} and rows {tuple(rows.shape)} must share D")
    if queries.dtype != rows.dtype or queries.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"group_topk: queries and rows must share a float32, bf16 or fp16 dtype, got {queries.dtype}, {rows.dtype}"
        )
    if queries.stride(1) != 1 or rows.stride(1) != 1:
        raise ValueError("group_topk: queries and rows must have unit stride along D")
    if not 0 < k <= cap:
        raise ValueError(f"group_topk: k={k} must be in [1, cap={cap}]")
    bounds = list(zip(query_start, query_end, row_start, row_end))
    for qs, qe, rs, re in bounds:
        if not (0 <= qs <= qe <= queries.shape[0] and 0 <= rs <= re <= rows.shape[0]):
            raise ValueError(f"group_topk: group ({qs}, {qe}, {rs}, {re}) lies outside the operands")
        if qe > qs and not kernel_groups(re - rs, k, block_rows):
            raise ValueError(f"group_topk: a group of {re - rs} candidates has fewer than k={k} tiles of {block_rows}")
    device, num_queries = queries.device, queries.shape[0]
    scores = torch.full((num_queries, k), -math.inf, device=device)
    positions = torch.full((num_queries, k), -1, dtype=torch.long, device=device)
    if not bounds or num_queries == 0:
        return scores, positions
    max_tiles = max(-(-(re - rs) // block_rows) for _, _, rs, re in bounds)
    items = _work_items(query_start, query_end, row_start, row_end, block_queries, block_rows, device)
    group_table = torch.tensor([query_end, row_start, row_end], dtype=torch.int32).to(device, non_blocking=True)
    maxima = torch.full((num_queries, max_tiles), -math.inf, device=device)
    count = torch.zeros(num_queries, dtype=torch.int32, device=device)
    out_score = torch.full((num_queries, cap), -math.inf, device=device)
    out_row = torch.full((num_queries, cap), -1, dtype=torch.int32, device=device)
    precision = "ieee" if queries.dtype == torch.float32 else "tf32"
    threshold = maxima[:, 0]  # no threshold in the first pass: any float32 tensor will do

    def run(survivors: bool) -> None:
        _group_tiles_kernel[(items.shape[1],)](
            queries, rows, items[0], items[1], items[2], group_table[0], group_table[1], group_table[2],
            maxima, threshold, count, out_score, out_row,
            queries.shape[1], queries.stride(0), rows.stride(0), max_tiles, cap,
            SURVIVORS=survivors, PRECISION=precision,
            BLOCK_Q=block_queries, BLOCK_R=block_rows, BLOCK_D=block_dims, num_warps=8, num_stages=3,
        )  # fmt: skip

    run(False)
    kth = maxima.topk(k, dim=1).values[:, k - 1]
    threshold = (kth - kth.abs() * _SLACK).contiguous()
    run(True)
    best, where = out_score.topk(k, dim=1)
    scores.copy_(best)
    positions.copy_(out_row.gather(1, where).long())
    overflow = (count > cap).nonzero().flatten().tolist()  # the one host read
    if overflow:
        _search_again(queries, rows, bounds, overflow, k, scores, positions)
    if stats is not None:
        stats["survivors_mean"] = float(count.float().mean())
        stats["searched_again"] = len(overflow)
    return scores, positions


def _search_again(queries, rows, bounds, overflow, k, scores, positions) -> None:
    """The exact top-k, in torch, of the queries whose survivors overflowed their slots."""
    for qs, qe, rs, re in bounds:
        mine = [q for q in overflow if qs <= q < qe]
        if not mine:
            continue
        picked = torch.tensor(mine, device=queries.device)
        products = (queries[picked] @ rows[rs:re].T).float()
        best, where = products.topk(k, dim=1)
        scores[picked], positions[picked] = best, where + rs
