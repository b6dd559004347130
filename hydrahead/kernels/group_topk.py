"""Scores of a list-grouped search with the top-k kept inside the kernel.

A class-graph build searches its rows list by list (``TorchIVFIndex.search_by_list_groups``):
the queries whose nearest list is L score every row of L's neighbourhood (a few lists).
Done with torch, each group is a product of (queries x candidates) float32 scores written
to memory, then a top-k that reads them back, and about 70 launches; at 25M rows the
top-k and the launches decide the build's time, not the arithmetic.

Here one program takes a tile of one group's queries, walks the rows of the group's lists
in blocks (their ids read from the list table), multiplies each block against the tile
with ``tl.dot`` and merges the block's scores into a running best ``KEEP`` per query: each
(score, row) pair is one int64 key, the float's bits made order-preserving in the high
half and the row id in the low half, so a sort of the keys ranks scores and carries rows.
The merge sorts the running best beside the block and keeps the upper half. Nothing of
size (queries x candidates) is written, and a block of queries is one launch.

Cosine scores divide by each row's norm, summed in the same pass as the product (queries
come normalised). Precision: the products run in the queries' dtype (bf16 on the GPU;
fp8 rows are read as bf16) with fp32 accumulation. Equal scores rank the larger row id
first; the torch reference (``group_topk_reference``) breaks ties the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["KEEP", "group_topk", "group_topk_reference", "query_tiles"]

KEEP = 32  # running best per query: k of a search (graph_k + 1) must fit; a power of two for the sort
_BLOCK_ROWS = 32  # rows merged at a time: the sort is over KEEP + _BLOCK_ROWS keys (a power of two)
_NONE = -(1 << 63)  # the key of no row: below every real key


@triton.jit
def _sortable(score):
    """float32 -> int32 whose signed order is the float order (negative floats' magnitude bits flipped)."""
    bits = score.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit(do_not_specialize=["stride_table", "num_queries"])
def _group_topk_kernel(
    Q,  # (num_queries, D) queries in group order, normalised for cosine
    W,  # (C_r, D) the shard's rows
    TABLE,  # (nlist, stride_table) row ids of each list, padded with -1
    LENGTHS,  # (nlist,) rows per list
    HOODS,  # (num_groups, NPROBE) lists of each group's neighbourhood, -1 for none
    TILE_GROUP,  # (num_tiles,) the group of each query tile
    TILE_START,  # (num_tiles,) its first query
    TILE_STOP,  # (num_tiles,) one past its last query
    OUT,  # (num_queries, KEEP) int64 keys, best first
    stride_table,
    num_queries,
    D: tl.constexpr,
    NPROBE: tl.constexpr,
    COSINE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KEEP: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.load(TILE_GROUP + tile)
    first = tl.load(TILE_START + tile)
    stop = tl.load(TILE_STOP + tile)
    queries = first + tl.arange(0, BLOCK_Q)
    query_ok = queries < stop
    dims = tl.arange(0, BLOCK_D)
    best = tl.full((BLOCK_Q, KEEP), -(2**63), tl.int64)
    for probe in range(NPROBE):
        lst = tl.load(HOODS + group * NPROBE + probe)
        length = tl.where(lst >= 0, tl.load(LENGTHS + tl.maximum(lst, 0)), 0)
        for start in range(0, length, BLOCK_R):
            slots = start + tl.arange(0, BLOCK_R)
            row_ok = slots < length
            rows = tl.load(TABLE + lst.to(tl.int64) * stride_table + slots, mask=row_ok, other=0).to(tl.int64)
            scores = tl.zeros((BLOCK_Q, BLOCK_R), tl.float32)
            squares = tl.zeros((BLOCK_R,), tl.float32)
            for d in range(0, D, BLOCK_D):
                q = tl.load(
                    Q + queries[:, None].to(tl.int64) * D + d + dims[None, :], mask=query_ok[:, None], other=0.0
                )
                w = tl.load(W + rows[:, None] * D + d + dims[None, :], mask=row_ok[:, None], other=0.0)
                if COSINE:
                    wide = w.to(tl.float32)
                    squares += tl.sum(wide * wide, axis=1)
                scores = tl.dot(q, tl.trans(w.to(q.dtype)), scores)
            if COSINE:
                scores = scores / tl.sqrt(tl.maximum(squares, 1e-24))[None, :]
            keys = (_sortable(scores).to(tl.int64) << 32) | rows[None, :]
            keys = tl.where(row_ok[None, :], keys, -(2**63))
            # the running best beside the block, sorted: the upper half is the new best
            merged = tl.reshape(tl.join(best, keys), (BLOCK_Q, 2 * KEEP))
            merged = tl.sort(merged, dim=1, descending=True)
            best, _ = tl.split(tl.permute(tl.reshape(merged, (BLOCK_Q, 2, KEEP)), (0, 2, 1)))
    keep = tl.arange(0, KEEP)
    tl.store(OUT + queries[:, None].to(tl.int64) * KEEP + keep[None, :], best, mask=query_ok[:, None])


def query_tiles(counts: list[int], block_queries: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(group, first query, stop) of each tile of at most ``block_queries`` queries, the
    queries of group g being the g-th run of ``counts`` consecutive queries."""
    groups, starts, stops = [], [], []
    start = 0
    for group, count in enumerate(counts):
        for first in range(start, start + count, block_queries):
            groups.append(group)
            starts.append(first)
            stops.append(min(first + block_queries, start + count))
        start += count
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return as_tensor(groups), as_tensor(starts), as_tensor(stops)


def _decode(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32, rows int64) of the best ``k`` keys, -inf and -1 where there is no row."""
    keys = keys[:, :k]
    none = keys == _NONE
    high = (keys >> 32).to(torch.int32)
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    scores = bits.view(torch.float32).masked_fill(none, float("-inf"))
    rows = (keys & 0xFFFFFFFF).masked_fill(none, -1)
    return scores, rows


def group_topk(
    queries: torch.Tensor,
    weight: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    hoods: torch.Tensor,
    counts: list[int],
    k: int,
    *,
    cosine: bool,
    block_queries: int = 64,
    block_dims: int = 64,
    warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's best ``k`` rows of its group's lists: (scores float32, rows int64),
    (num_queries, k), best first, -inf and -1 past a neighbourhood's rows.

    ``queries`` (N, D) come in group order: group g is the g-th run of ``counts[g]``
    consecutive queries, and its candidates are the rows of the lists ``hoods[g]`` (-1:
    none) in ``table`` (nlist, width; -1 padding) with ``lengths`` (nlist,)."""
    if not 1 <= k <= KEEP:
        raise ValueError(f"group_topk keeps at most {KEEP} rows per query, got k={k}")
    num_queries, dim = queries.shape
    if weight.shape[1] != dim or dim % block_dims:
        raise ValueError(
            f"queries {tuple(queries.shape)} and weight {tuple(weight.shape)}: D must match, a multiple of {block_dims}"
        )
    if sum(counts) != num_queries or hoods.shape[0] != len(counts):
        raise ValueError(
            f"counts sum to {sum(counts)} for {num_queries} queries, "
            f"{len(counts)} groups for {hoods.shape[0]} neighbourhoods"
        )
    out = torch.full((num_queries, KEEP), _NONE, dtype=torch.int64, device=queries.device)
    tile_group, tile_start, tile_stop = query_tiles(counts, block_queries, queries.device)
    if tile_group.numel():
        _group_topk_kernel[(tile_group.numel(),)](
            queries.contiguous(),
            weight.contiguous(),
            table.contiguous(),
            lengths.to(torch.int32).contiguous(),
            hoods.to(torch.int32).contiguous(),
            tile_group,
            tile_start,
            tile_stop,
            out,
            table.shape[1],
            num_queries,
            D=dim,
            NPROBE=hoods.shape[1],
            COSINE=cosine,
            BLOCK_Q=block_queries,
            BLOCK_R=_BLOCK_ROWS,
            BLOCK_D=block_dims,
            KEEP=KEEP,
            num_warps=warps,
        )
    return _decode(out, k)


def group_topk_reference(
    queries: torch.Tensor,
    weight: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    hoods: torch.Tensor,
    counts: list[int],
    k: int,
    *,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_topk`` in torch, in float64: each group's dense scores, then a top-k that
    ranks equal scores by the larger row id first."""
    scores_out = torch.full((queries.shape[0], k), float("-inf"), dtype=torch.float64)
    rows_out = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
    start = 0
    for group, count in enumerate(counts):
        members = slice(start, start + count)
        start += count
        lists = [int(lst) for lst in hoods[group] if int(lst) >= 0]
        candidates = (
            torch.cat([table[lst, : int(lengths[lst])].long() for lst in lists])
            if lists
            else torch.empty(0, dtype=torch.long)
        )
        if candidates.numel() == 0:
            continue
        rows = weight[candidates.to(weight.device)].double().cpu()
        if cosine:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        scores = queries[members].double().cpu() @ rows.T
        # larger row id first among equal scores: sort by id descending, then a stable sort by score
        by_id = torch.argsort(candidates, descending=True)
        ranked = torch.argsort(scores[:, by_id], dim=1, descending=True, stable=True)[:, :k]
        take = ranked.shape[1]
        scores_out[members, :take] = torch.gather(scores[:, by_id], 1, ranked)
        rows_out[members, :take] = candidates[by_id][ranked]
    return scores_out, rows_out
