"""Scores of the inverted-file search: every probed list against the queries that probe it.

A query probes ``nprobe`` lists; its candidates are the rows of those lists. Scoring
query by query reads each candidate row once per query that probes its list; at a
1,024-query batch over a 25M-row shard that is ~50 GB of gathered rows per search. Here
the (query, probe) pairs are grouped by list (a CSR: ``pair_ptr``, ``pair_query``,
``pair_slot``) and one program takes a block of a list's rows and loops over the queries
of that list in tiles, so each row block is read from memory once and multiplied
against a (rows x queries) tile with ``tl.dot``. Cosine scores divide by each row's
norm: given (kept current by the caller, one read of 4 bytes per row) or summed in the
same pass as the products. The work left is the rows of the lists
probed at least once, each read once.

Output: ``out[q, slot * max_list_len + i]`` is the score of the i-th row of the list that
query ``q`` probed in position ``slot``; padding (row -1) and unwritten entries stay -inf.
With ``normalize`` the scores are cosines: each row is divided by its L2 norm (queries
are expected normalised already). Precision: the products run in the rows' dtype (bf16
for bf16 and fp8 rows; fp32 rows go through TF32, tl.dot's default) with fp32
accumulation, enough to rank candidates that are re-scored nowhere else. The grid is
(min(nlist, B * nprobe), 16): programs for probed lists only, each looping over its list's
own blocks, so neither unprobed lists nor the padding of short lists cost a program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["TILES", "Tiles", "list_pairs", "probed_list_scores"]


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the list-scoring kernel: rows per block, queries per dot, dims per step."""

    rows: int = 64
    queries: int = 16  # tl.dot's smallest tile side
    dims: int = 128  # 128 fp8 or 256 bf16 bytes of a row per load: whole cache lines of a gathered row
    row_split: int = 16  # programs per probed list; each loops over every row_split-th block of its rows
    warps: int = 4
    stages: int = (
        3  # measured on H200: 2 stages 6.2 ms, 3 stages 5.0 ms at 50M rows x 512 queries (benchmarks/ivf_search.py)
    )


TILES = Tiles()


# Sizes and keys that change from step to step (active rows, list lengths, rounding keys)
# are not specialised on: Triton would otherwise compile a new variant, mid-training,
# whenever one of them first turns up as a multiple of 16 or as 1. The table's row
# stride is its width, the longest list, which every rebuild changes.
@triton.jit(do_not_specialize=["max_len", "out_width", "stride_table"])
def _probed_scores_kernel(
    W,
    Q,
    TABLE,
    LENGTHS,
    LISTS,
    PAIR_PTR,
    PAIR_QUERY,
    PAIR_SLOT,
    OUT,
    INV_NORMS,
    D,
    max_len,
    out_width,
    stride_w,
    stride_q,
    stride_table,
    NORMALIZE: tl.constexpr,
    HAS_NORMS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROW_SPLIT: tl.constexpr,
):
    # Program (i, j) takes the i-th list of LISTS (the probed ones come first) and every
    # ROW_SPLIT-th block of its rows, starting at block j: a program per probed list and
    # split, not per (list, block of the longest list).
    lst = tl.load(LISTS + tl.program_id(0))
    first = tl.load(PAIR_PTR + lst)
    last = tl.load(PAIR_PTR + lst + 1)
    if last > first:  # a list nobody probed: nothing to do
        length = tl.load(LENGTHS + lst)
        num_blocks = (length + BLOCK_R - 1) // BLOCK_R
        # The list's first BLOCK_Q queries (all of them for almost every list) stay the same
        # for every block: their pass also sums each row's squares, so a row block is read
        # from memory once. Lists probed by more queries take further passes (from L2).
        pairs = first + tl.arange(0, BLOCK_Q)
        pair_ok = pairs < last
        queries = tl.load(PAIR_QUERY + pairs, mask=pair_ok, other=0).to(tl.int64)
        probe_slot = tl.load(PAIR_SLOT + pairs, mask=pair_ok, other=0).to(tl.int64)
        for row_block in range(tl.program_id(1), num_blocks, ROW_SPLIT):
            slots = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = slots < length
            rows = tl.load(TABLE + lst.to(tl.int64) * stride_table + slots, mask=row_ok, other=0).to(tl.int64)
            sq = tl.zeros((BLOCK_R,), tl.float32)
            acc = tl.zeros((BLOCK_R, BLOCK_Q), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                d_ok = dims < D
                w = tl.load(
                    W + rows[:, None] * stride_w + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
                )
                if UPCAST:  # fp8 rows: multiply in bf16 (queries are rounded to bf16 too)
                    w = w.to(tl.bfloat16)
                if NORMALIZE and not HAS_NORMS:
                    w32 = w.to(tl.float32)
                    sq += tl.sum(w32 * w32, axis=1)
                q = tl.load(
                    Q + queries[:, None] * stride_q + dims[None, :], mask=pair_ok[:, None] & d_ok[None, :], other=0.0
                )
                acc = tl.dot(w, tl.trans(q.to(w.dtype)), acc)
            inv_norm = tl.full((BLOCK_R,), 1.0, tl.float32)
            if NORMALIZE:
                if HAS_NORMS:
                    inv_norm = tl.load(INV_NORMS + rows, mask=row_ok, other=1.0)
                else:
                    inv_norm = 1.0 / tl.maximum(tl.sqrt(sq), 1e-12)
            dest = OUT + queries[None, :] * out_width + probe_slot[None, :] * max_len + slots[:, None]
            tl.store(dest, acc * inv_norm[:, None], mask=row_ok[:, None] & pair_ok[None, :])
            for p0 in range(first + BLOCK_Q, last, BLOCK_Q):
                more = p0 + tl.arange(0, BLOCK_Q)
                more_ok = more < last
                more_queries = tl.load(PAIR_QUERY + more, mask=more_ok, other=0).to(tl.int64)
                more_slot = tl.load(PAIR_SLOT + more, mask=more_ok, other=0).to(tl.int64)
                acc = tl.zeros((BLOCK_R, BLOCK_Q), tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    dims = d0 + tl.arange(0, BLOCK_D)
                    d_ok = dims < D
                    w = tl.load(
                        W + rows[:, None] * stride_w + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
                    )
                    if UPCAST:
                        w = w.to(tl.bfloat16)
                    q = tl.load(
                        Q + more_queries[:, None] * stride_q + dims[None, :],
                        mask=more_ok[:, None] & d_ok[None, :],
                        other=0.0,
                    )
                    acc = tl.dot(w, tl.trans(q.to(w.dtype)), acc)
                dest = OUT + more_queries[None, :] * out_width + more_slot[None, :] * max_len + slots[:, None]
                tl.store(dest, acc * inv_norm[:, None], mask=row_ok[:, None] & more_ok[None, :])


def list_pairs(probes: torch.Tensor, num_lists: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group (query, probe slot) pairs by probed list: CSR ``(pair_ptr, pair_query, pair_slot)``.

    ``probes`` is (B, nprobe) list ids. ``pair_ptr`` (num_lists + 1) delimits each list's
    pairs in ``pair_query`` / ``pair_slot`` (both B * nprobe, int32).
    """
    batch, nprobe = probes.shape
    flat = probes.reshape(-1)
    ordered, order = torch.sort(flat, stable=True)
    # List l's pairs start where the sorted ids reach l (bincount would read its size on the host).
    pair_ptr = torch.searchsorted(ordered, torch.arange(num_lists + 1, dtype=flat.dtype, device=flat.device))
    pair_query = torch.div(order, nprobe, rounding_mode="floor").to(torch.int32)
    pair_slot = (order % nprobe).to(torch.int32)
    return pair_ptr, pair_query, pair_slot


def probed_list_scores(
    weight: torch.Tensor,
    queries: torch.Tensor,
    table: torch.Tensor,
    probes: torch.Tensor,
    *,
    normalize: bool = False,
    lengths: torch.Tensor | None = None,
    inv_norms: torch.Tensor | None = None,
    tiles: Tiles = TILES,
) -> torch.Tensor:
    """(B, nprobe * max_list_len) float32 scores of every query against its probed lists' rows.

    ``weight`` (C_r, D) and ``queries`` (B, D) on one device (queries are cast to the
    weight's dtype for the products, to bfloat16 for fp8 rows); ``table`` (nlist, max_list_len) row numbers with -1
    padding, each list's rows first; ``probes`` (B, nprobe) list ids; ``lengths`` (nlist,) the
    rows of each list (counted from ``table`` when not given); ``inv_norms`` (C_r,) float32,
    1 / ||row|| of every row for ``normalize`` (summed from the rows in the same pass when
    not given). Entries of padding rows are -inf.
    """
    if weight.dim() != 2 or queries.dim() != 2 or weight.shape[1] != queries.shape[1]:
        raise ValueError(
            f"weight (C_r, D) and queries (B, D) must share D, got {tuple(weight.shape)} and {tuple(queries.shape)}"
        )
    if probes.shape[0] != queries.shape[0]:
        raise ValueError(f"probes must have one row per query, got {probes.shape[0]} for {queries.shape[0]} queries")
    weight, queries, table = weight.contiguous(), queries.contiguous(), table.contiguous()
    num_lists, max_len = table.shape
    batch, nprobe = probes.shape
    out = torch.full((batch, nprobe * max_len), -math.inf, dtype=torch.float32, device=weight.device)
    if batch == 0 or max_len == 0:
        return out
    if lengths is None:
        lengths = (table >= 0).sum(1)
    elif lengths.shape != (num_lists,):
        raise ValueError(f"lengths must hold one count per list ({num_lists}), got shape {tuple(lengths.shape)}")
    if inv_norms is not None:
        if (
            inv_norms.shape != (weight.shape[0],)
            or inv_norms.dtype != torch.float32
            or inv_norms.device != weight.device
        ):
            raise ValueError(
                f"inv_norms must be float32 with one entry per row ({weight.shape[0]}) on {weight.device}, "
                f"got {inv_norms.dtype} {tuple(inv_norms.shape)} on {inv_norms.device}"
            )
        inv_norms = inv_norms.contiguous()
    pair_ptr, pair_query, pair_slot = list_pairs(probes, num_lists)
    # At most batch * nprobe lists are probed: those first, so the grid needs no count from the GPU.
    probed_first = torch.argsort((pair_ptr[1:] == pair_ptr[:-1]).to(torch.uint8), stable=True)
    num_programs = min(num_lists, batch * nprobe)
    grid = (num_programs, min(triton.cdiv(max_len, tiles.rows), tiles.row_split))
    _probed_scores_kernel[grid](
        weight,
        queries,
        table,
        lengths,
        probed_first,
        pair_ptr,
        pair_query,
        pair_slot,
        out,
        inv_norms if inv_norms is not None else out,
        weight.shape[1],
        max_len,
        out.shape[1],
        weight.stride(0),
        queries.stride(0),
        table.stride(0),
        NORMALIZE=normalize,
        HAS_NORMS=inv_norms is not None,
        UPCAST=weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2),
        BLOCK_R=tiles.rows,
        BLOCK_Q=tiles.queries,
        BLOCK_D=tiles.dims,
        ROW_SPLIT=tiles.row_split,
        num_warps=tiles.warps,
        num_stages=tiles.stages,
    )
    return out
