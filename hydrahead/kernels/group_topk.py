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
   (many equal scores), or fewer than k, is searched again in torch (products accumulated
   in float32, as the kernel's).

Both passes are compiled from one kernel's source with the same product loop, so a
recomputed score should equal the first pass's; the threshold is still lowered by 2^-20
of its size, and a query left with fewer than k survivors (a recomputed score below its
threshold) is searched again rather than returned short. The products run in the operands' dtype (bf16 on the GPU;
fp32 exact, ``input_precision="ieee"``) with fp32 accumulation, as ``matmul_fp32`` does
for the torch path. A group with fewer than k tiles takes the torch path (its threshold
would be no bound).

Groups lie end to end: group g's queries are rows ``[query_start[g], query_end[g])`` of
``queries`` (no query in two groups) and its candidates rows ``[row_start[g], row_end[g])``
of ``rows``; results give positions in ``rows``. Scratch: a float32 maximum per query and
tile of the largest group, and ``cap`` slots (8 bytes each) per query; a list-grouped
search bounds both by its pieces (``_PIECE_CANDIDATES``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hydrahead.kernels.exact_gemm import matmul_fp32

__all__ = ["BLOCK_ROWS", "CAP", "group_topk", "group_topk_reference", "kernel_groups"]

BLOCK_QUERIES = 128
BLOCK_ROWS = 128  # candidates per tile: the granularity of the threshold
BLOCK_DIMS = 64
CAP = 128  # survivors kept per query; families of near-duplicate rows put several in one tile
_SLACK = 2.0**-20
CLAIM_EACH = False
# The second pass by (query, tile) pairs: only each query's k best tiles are scored again
# (about k of a 4-list group's 96), rather than every tile a block of queries needs.
BY_PAIRS = True


@triton.jit
def _last_at_most(STARTS, value, count, SEARCH_STEPS: tl.constexpr):
    """The last i < count with STARTS[i] <= value (STARTS ascending, STARTS[0] <= value): a
    binary search; steps past the answer keep it."""
    lo = 0
    hi = count - 1
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        right = tl.load(STARTS + mid) <= value
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    return lo


@triton.jit
def _products(
    Q,
    R,
    queries64,
    query_in,
    rows,
    row_in,
    dims_end,
    D,
    stride_q,
    stride_r,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(BLOCK_Q, BLOCK_R) float32 products of the queries and rows over dims [0, dims_end),
    -inf for rows past the end. A bound of 0 skips the product: a loop that runs no step,
    not a branch around it (Triton does not pipeline a loop inside a branch)."""
    acc = tl.zeros((BLOCK_Q, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, dims_end, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_in = dims < D
        q_at = Q + queries64[:, None] * stride_q + dims[None, :]
        r_at = R + rows.to(tl.int64)[:, None] * stride_r + dims[None, :]
        q = tl.load(q_at, mask=query_in[:, None] & dim_in[None, :], other=0.0)
        r = tl.load(r_at, mask=row_in[:, None] & dim_in[None, :], other=0.0)
        acc = tl.dot(q, tl.trans(r), acc, input_precision=PRECISION)
    return tl.where(row_in[None, :], acc, float("-inf"))


@triton.jit
def _keep_survivors(
    scores,
    threshold,
    queries,
    query_in,
    rows,
    row_in,
    COUNT,
    OUT_SCORE,
    OUT_ROW,
    cap,
    CLAIM_EACH: tl.constexpr,
):
    """Each score >= its query's threshold into the query's next free slot of ``cap``."""
    keep = (scores >= threshold[:, None]) & query_in[:, None] & row_in[None, :]
    queries64 = queries.to(tl.int64)
    if CLAIM_EACH:  # each survivor claims its slot with an atomic of its own
        slot = tl.atomic_add(COUNT + queries64[:, None] + 0 * rows[None, :], 1, mask=keep, sem="relaxed")
    else:  # one atomic per query claims the tile's slots; a running count places each
        kept = keep.to(tl.int32)
        count = tl.sum(kept, axis=1)
        base = tl.atomic_add(COUNT + queries, count, mask=query_in & (count > 0), sem="relaxed")
        slot = base[:, None] + tl.cumsum(kept, axis=1) - 1
    stored = keep & (slot < cap)
    at = queries64[:, None] * cap + slot
    tl.store(OUT_SCORE + at, scores, mask=stored)
    tl.store(OUT_ROW + at, rows[None, :], mask=stored)


@triton.jit(do_not_specialize=["num_groups", "max_tiles", "cap"])
def _group_tiles_kernel(
    Q,
    R,
    GROUPS,  # int32 rows: first item, query start, query end, row start, row end (each padded)
    groups_stride,
    num_groups,
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
    CLAIM_EACH: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The program's group: the last whose first item is <= the program's, then its query
    # block and tile (tiles vary fastest, so a group's tiles of one query block run
    # together and share that block in L2).
    item = tl.program_id(0)
    group = _last_at_most(GROUPS, item, num_groups, SEARCH_STEPS)
    query_start = tl.load(GROUPS + groups_stride + group)
    query_end = tl.load(GROUPS + 2 * groups_stride + group)
    row_start = tl.load(GROUPS + 3 * groups_stride + group)
    row_end = tl.load(GROUPS + 4 * groups_stride + group)
    tiles = (row_end - row_start + BLOCK_R - 1) // BLOCK_R
    local = item - tl.load(GROUPS + group)
    tile = local % tiles
    queries = query_start + (local // tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rows = row_start + tile * BLOCK_R + tl.arange(0, BLOCK_R)
    query_in = queries < query_end
    row_in = rows < row_end
    queries64 = queries.to(tl.int64)
    tile_at = MAXIMA + queries64 * max_tiles + tile
    dims_end = D
    if SURVIVORS:
        threshold = tl.load(THRESHOLD + queries, mask=query_in, other=float("inf"))
        tile_max = tl.load(tile_at, mask=query_in, other=float("-inf"))
        # A tile where no query of the block reaches its threshold is not scored again.
        needed = tl.max((tile_max >= threshold).to(tl.int32), axis=0) > 0
        dims_end = tl.where(needed, D, 0)
        threshold = tl.where(needed, threshold, float("inf"))  # the unscored tile's zeros stay out
    scores = _products(
        Q, R, queries64, query_in, rows, row_in, dims_end, D, stride_q, stride_r, PRECISION, BLOCK_Q, BLOCK_R, BLOCK_D
    )
    if SURVIVORS:
        _keep_survivors(scores, threshold, queries, query_in, rows, row_in, COUNT, OUT_SCORE, OUT_ROW, cap, CLAIM_EACH)
    else:
        tl.store(tile_at, tl.max(scores, axis=1), mask=query_in)


@triton.jit(do_not_specialize=["num_tiles", "cap"])
def _pair_survivors_kernel(
    Q,
    R,
    PAIR_QUERY,  # each (query, tile) pair's query, the pairs sorted by tile
    CHUNK_START,  # per tile: its first chunk of BLOCK_P pairs (exclusive prefix), then the total
    PAIR_START,  # per tile: its first pair (exclusive prefix), then the total
    TILE_ROW_START,
    TILE_ROW_END,
    THRESHOLD,
    COUNT,
    OUT_SCORE,
    OUT_ROW,
    D,
    stride_q,
    stride_r,
    num_tiles,
    cap,
    SEARCH_STEPS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The program's tile: the last whose first chunk is <= the program's. The grid is an
    # upper bound on the chunks (known before the pairs are counted); a program past the
    # last chunk scores nothing.
    chunk = tl.program_id(0)
    tile = _last_at_most(CHUNK_START, chunk, num_tiles, SEARCH_STEPS)
    live = chunk < tl.load(CHUNK_START + num_tiles)
    first_pair = tl.load(PAIR_START + tile) + (chunk - tl.load(CHUNK_START + tile)) * BLOCK_P
    pairs = first_pair + tl.arange(0, BLOCK_P)
    pair_in = pairs < tl.where(live, tl.load(PAIR_START + tile + 1), 0)
    queries = tl.load(PAIR_QUERY + pairs, mask=pair_in, other=0)
    rows = tl.load(TILE_ROW_START + tile) + tl.arange(0, BLOCK_R)
    row_in = rows < tl.load(TILE_ROW_END + tile)
    threshold = tl.load(THRESHOLD + queries, mask=pair_in, other=float("inf"))
    scores = _products(
        Q,
        R,
        queries.to(tl.int64),
        pair_in,
        rows,
        row_in,
        tl.where(live, D, 0),
        D,
        stride_q,
        stride_r,
        PRECISION,
        BLOCK_P,
        BLOCK_R,
        BLOCK_D,
    )
    _keep_survivors(scores, threshold, queries, pair_in, rows, row_in, COUNT, OUT_SCORE, OUT_ROW, cap, False)


def kernel_groups(num_candidates: int, k: int, block_rows: int = BLOCK_ROWS, cap: int = CAP) -> bool:
    """Whether a group of ``num_candidates`` can take the kernel: k tiles for a threshold,
    and k within the slots per query."""
    return k <= cap and -(-num_candidates // block_rows) >= k


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


class _Pairs:
    """The second pass by (query, tile) pairs: each grouped query's k best tiles (by their
    maxima), sorted by tile, in chunks of ``block_pairs`` that share one tile's rows. Made on
    the device from the first pass's top-k, with no host read: the chunks' count is bounded
    by pairs / block_pairs + tiles, and that bound is the grid."""

    def __init__(self, live, best_maxima, best_tiles, query_group, block_rows, block_pairs, device):
        num_queries, k = best_tiles.shape
        tiles = [-(-(re - rs) // block_rows) for _, _, rs, re in live]
        self.num_tiles = sum(tiles)
        tiles_per_group = torch.tensor(tiles, device=device)
        tile_base = torch.cumsum(tiles_per_group, 0) - tiles_per_group
        # A pair's key is its tile's number in the piece. Queries outside every group, and a
        # best "tile" whose maximum is -inf (past its group's tiles, or a tile of -inf scores:
        # nothing there can rank), sort last and are left out.
        wanted = (query_group >= 0).unsqueeze(1) & (best_maxima > -math.inf)
        keys = torch.where(wanted, tile_base[query_group.clamp_min(0)].unsqueeze(1) + best_tiles, self.num_tiles)
        keys, order = keys.flatten().sort()
        self.query = (order // k).to(torch.int32)
        # Each tile's first pair, by a search of the sorted keys (a count would read back its size).
        pair_start = torch.searchsorted(keys, torch.arange(self.num_tiles + 1, device=device))
        chunks = -(-(pair_start[1:] - pair_start[:-1]) // block_pairs)
        self.pair_start = pair_start.to(torch.int32)
        self.chunk_start = torch.nn.functional.pad(torch.cumsum(chunks, 0), (1, 0)).to(torch.int32)
        self.max_chunks = -(-num_queries * k // block_pairs) + self.num_tiles
        tile_group = torch.repeat_interleave(
            torch.arange(len(live), device=device), tiles_per_group, output_size=self.num_tiles
        )
        row_start = torch.tensor([rs for _, _, rs, _ in live], device=device)
        row_end = torch.tensor([re for _, _, _, re in live], device=device)
        tile_in_group = torch.arange(self.num_tiles, device=device) - tile_base[tile_group]
        self.tile_row_start = (row_start[tile_group] + tile_in_group * block_rows).to(torch.int32)
        self.tile_row_end = row_end[tile_group].to(torch.int32)


def _search_steps(num_groups: int) -> int:
    """Binary-search steps for ``num_groups``, rounded up to a multiple of 4 (steps past the
    answer keep it), so that pieces of 2 to 16 groups share one compiled variant."""
    return max(4, -(-max(1, num_groups - 1).bit_length() // 4) * 4)


def _group_table(query_start, query_end, row_start, row_end, block_queries, block_rows, device):
    """Each group's first work item (a (query block, tile) pair) and bounds, as int32 rows;
    and the number of items."""
    first_items, total = [], 0
    for qs, qe, rs, re in zip(query_start, query_end, row_start, row_end):
        first_items.append(total)
        total += -(-(qe - qs) // block_queries) * -(-(re - rs) // block_rows)
    columns = [first_items, list(query_start), list(query_end), list(row_start), list(row_end)]
    return _int32_columns(columns, device), total


def _int32_columns(columns: list[list[int]], device) -> torch.Tensor:
    """The columns as rows of one int32 tensor whose width is padded to 16 entries: each row
    then starts 64-byte aligned, and Triton, which specialises a kernel on its pointers'
    16-byte alignment, compiles one variant, not one per width mod 4."""
    width = -(-max(len(columns[0]), 1) // 16) * 16
    table = torch.zeros(len(columns), width, dtype=torch.int32)
    for row, column in zip(table, columns):
        row[: len(column)] = torch.tensor(column, dtype=torch.int32)
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
    num_warps: int = 8,
    num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, positions), each (queries, k), best first: every query's k best rows of its
    group (positions in ``rows``). Queries outside every group get -inf and -1. Every group
    must have at least k tiles (``kernel_groups``); ``stats``, when given, receives the
    survivors' mean over the queries in a group and the count of queries searched again."""
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
        if qe > qs and not kernel_groups(re - rs, k, block_rows, cap):
            raise ValueError(f"group_topk: a group of {re - rs} candidates has fewer than k={k} tiles of {block_rows}")
    spans = sorted((qs, qe) for qs, qe, _, _ in bounds if qe > qs)
    if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])):
        raise ValueError("group_topk: two groups share queries")
    device, num_queries = queries.device, queries.shape[0]
    scores = torch.full((num_queries, k), -math.inf, device=device)
    positions = torch.full((num_queries, k), -1, dtype=torch.long, device=device)
    if not bounds or num_queries == 0:
        return scores, positions
    max_tiles = max(-(-(re - rs) // block_rows) for _, _, rs, re in bounds)
    # Groups without queries take no item (and the search below needs a group at item 0).
    live = [bound for bound in bounds if bound[1] > bound[0]]
    if not live:
        return scores, positions
    groups_table, num_items = _group_table(*zip(*live), block_queries, block_rows, device)
    maxima = torch.full((num_queries, max_tiles), -math.inf, device=device)
    count = torch.zeros(num_queries, dtype=torch.int32, device=device)
    out_score = torch.full((num_queries, cap), -math.inf, device=device)
    out_row = torch.full((num_queries, cap), -1, dtype=torch.int32, device=device)
    precision = "ieee" if queries.dtype == torch.float32 else "tf32"
    threshold = maxima[:, 0]  # no threshold in the first pass: any float32 tensor will do

    def run(survivors: bool) -> None:
        _group_tiles_kernel[(num_items,)](
            queries, rows, groups_table, groups_table.stride(0), len(live),
            maxima, threshold, count, out_score, out_row,
            queries.shape[1], queries.stride(0), rows.stride(0), max_tiles, cap,
            SURVIVORS=survivors, CLAIM_EACH=CLAIM_EACH, SEARCH_STEPS=_search_steps(len(live)),
            PRECISION=precision, BLOCK_Q=block_queries, BLOCK_R=block_rows, BLOCK_D=block_dims,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip

    run(False)
    best_maxima, best_tiles = maxima.topk(k, dim=1)
    kth = best_maxima[:, k - 1]
    threshold = (kth - kth.abs() * _SLACK).contiguous()
    query_group = torch.full((num_queries,), -1, dtype=torch.long, device=device)  # -1: in no group
    for group, (qs, qe, _, _) in enumerate(live):
        query_group[qs:qe] = group
    in_group = query_group >= 0
    if BY_PAIRS:
        pairs = _Pairs(live, best_maxima, best_tiles, query_group, block_rows, block_queries, device)
        _pair_survivors_kernel[(pairs.max_chunks,)](
            queries, rows, pairs.query, pairs.chunk_start, pairs.pair_start, pairs.tile_row_start,
            pairs.tile_row_end, threshold, count, out_score, out_row,
            queries.shape[1], queries.stride(0), rows.stride(0), pairs.num_tiles, cap,
            SEARCH_STEPS=_search_steps(pairs.num_tiles), PRECISION=precision,
            BLOCK_P=block_queries, BLOCK_R=block_rows, BLOCK_D=block_dims,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    else:
        run(True)
    best, where = out_score.topk(k, dim=1)
    scores.copy_(best)
    positions.copy_(out_row.gather(1, where).long())
    # Searched again: too many survivors, too few, or no finite maximum to bound them.
    again = (count > cap) | (in_group & ((count < k) | (kth == -math.inf)))
    overflow = again.nonzero().flatten().tolist()  # the one host read
    if overflow:
        _search_again(queries, rows, bounds, overflow, k, scores, positions)
    if stats is not None:
        stats["survivors_mean"] = float(count[in_group].float().mean())
        stats["searched_again"] = len(overflow)
    return scores, positions


def _search_again(queries, rows, bounds, overflow, k, scores, positions) -> None:
    """The top-k, in torch, of the queries whose survivors overflowed their slots (or fell
    short of k): products accumulated in float32, as the kernel's and the index's."""
    for qs, qe, rs, re in bounds:
        mine = [q for q in overflow if qs <= q < qe]
        if not mine:
            continue
        picked = torch.tensor(mine, device=queries.device)
        products = matmul_fp32(queries[picked], rows[rs:re].T)
        best, where = products.topk(k, dim=1)
        scores[picked], positions[picked] = best, where + rs
