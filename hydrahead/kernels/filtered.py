"""The filtered head step: entries of softmax - onehot below a threshold are dropped.

With ``grad_filter = tau > 0`` every (sample, class) entry P = softmax - onehot with
|P| < tau counts as zero in both dF and dW (a tile of one entry, so the result does not
depend on tile shapes). At 1M+ classes a peaked softmax keeps about one entry per sample
(its target) and a flat one keeps nearly none, so the backward's products collapse to a
gather and a scatter. The work is two logit passes, 4·G·D·C_r FLOPs, each shaped like a
plain GEMM (a BLOCK_G x BLOCK_C fp32 tile, the D loop streamed), not the 8·G·D·C_r of
the exact step:

forward   ``_lse_kernel``: per sample (max, sum of exp, target logit) over the shard; no
          D-wide accumulator, so 128 x 128 tiles and 3-4 pipeline stages fit.
backward  ``_flag_kernel``: recompute the logits and list the tiles holding any logit
          >= lse + ln(tau) (that is p >= tau); ``_extract_kernel`` recomputes just those
          tiles and writes their entries (sample, class, logit). Targets are known from the forward
          (p_t = exp(t - lse)) and added in torch.
          dF and dW come from the list by gather / index_add (chunked: bounded memory).
          ``_sgd_kernel`` then applies torch.optim.SGD's step to every row in one
          memory-bound pass (weight decay and momentum touch all rows), adding the sparse
          gradient to the rows that have one, with a single rounding per element.

If a step keeps more entries than ``max_entries`` (a threshold far below the softmax's
scale), that step falls back to the exact kernels with a warning: slower, never wrong.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from hydrahead.kernels import pingpong
from hydrahead.kernels.rounding import RoundingPlan, rounding_plan, sgd_store
from hydrahead.kernels.shard_ce import (
    FeatureOperand,
    SGDUpdate,
    _as_operand,
    _num_programs_target,
    _precision,
    check_update,
)
from hydrahead.kernels.tiles import block_operand, descriptor_loads, launch_fitted

_SGD_ROWS = 16  # rows of W per program of the update pass
_GATHER_ENTRIES = 8192  # entries per chunk of the dF / dW gathers (8192 x D fp32 temporaries)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _operand_slices(
    F,
    W,
    row0,
    rows,
    row_ok,
    c_lo,
    c_hi,
    it,
    k_tiles,
    D,
    stride_f,
    stride_w,
    EVEN_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
):
    """Iteration ``it`` of the flattened (class tile, D slice) loop: the two slices to multiply.

    One flat loop instead of a D loop nested in a class loop keeps the load pipeline full
    across class tiles (a nested loop drains and refills it at every tile). With TMA, F and
    W are tensor descriptors: the copy engine fetches the slices and fills what lies outside
    the tensors with zeros, as the masked loads do.
    """
    tile = it // k_tiles
    k0 = (it - tile * k_tiles) * BLOCK_K
    if TMA:
        f = F.load([row0, k0])
        w = W.load([c_lo + tile * BLOCK_C, k0])
    else:
        dims = k0 + tl.arange(0, BLOCK_K)
        cols = c_lo + tile * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < c_hi
        if EVEN_K:
            f_mask = row_ok[:, None]
            w_mask = col_ok[:, None]
        else:
            f_mask = row_ok[:, None] & (dims < D)[None, :]
            w_mask = col_ok[:, None] & (dims < D)[None, :]
        f = tl.load(F + rows[:, None].to(tl.int64) * stride_f + dims[None, :], mask=f_mask, other=0.0)
        w = tl.load(
            W + cols[:, None].to(tl.int64) * stride_w + dims[None, :], mask=w_mask, other=0.0
        )  # 64-bit: C_r x D may pass 2^31
    return f, w


@triton.jit
def _program_range(G, C, D, classes_per_split, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's row block and class split (axis 0 fastest: neighbours share W tiles in L2)."""
    pid_g = tl.program_id(0)
    rows = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    c_lo = tl.program_id(1) * classes_per_split
    return pid_g, rows, rows < G, c_lo, tl.minimum(c_lo + classes_per_split, C), tl.cdiv(D, BLOCK_K)


@triton.jit
def _tile_columns(c_lo, c_hi, it, k_tiles, BLOCK_C: tl.constexpr):
    c0 = c_lo + (it // k_tiles) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    return c0, cols, cols < c_hi


@triton.jit
def _raw_cut(CUT, F_SCALE, rows, row_ok, scale, FP8: tl.constexpr):
    """The cut on the raw dot product (scale > 0, e4m3 row scales > 0); +inf: ignored rows."""
    cut = tl.load(CUT + rows, mask=row_ok, other=float("inf")) / scale
    if FP8:
        cut = cut / tl.load(F_SCALE + rows, mask=row_ok, other=1.0)
    return cut


# Sizes and keys that change from step to step (active rows, list lengths, rounding keys)
# are not specialised on: Triton would otherwise compile a new variant, mid-training,
# whenever one of them first turns up as a multiple of 16 or as 1.
@triton.jit(do_not_specialize=["C", "classes_per_split"])
def _lse_kernel(
    F,
    F_SCALE,
    W,
    INV_NORM,
    OFFSET,
    LOCAL_LABEL,
    M_OUT,
    L_OUT,
    G,
    C,
    D,
    stride_f,
    stride_w,
    classes_per_split,
    scale,
    COSINE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
):
    # Logits are kept in log2 units (z * log2 e) so each exp is one exp2. The per-tile work
    # that is rarely needed (a target in the tile, a tile past the split's end) sits behind
    # scalar branches: the common tile costs a scale, a max, an exp2 and a sum per entry.
    # Targets are left out of the max and the sum: ``shard_lse`` adds each one's shifted
    # term from its own logit. Summing the target logits here took a second tile-sized
    # tensor beside the logits and spilled registers (288 bytes a thread at 256 x 128).
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_g, rows, row_ok, c_lo, c_hi, k_tiles = _program_range(G, C, D, classes_per_split, BLOCK_G, BLOCK_K)
    row0 = pid_g * BLOCK_G
    label = tl.load(LOCAL_LABEL + rows, mask=row_ok, other=-1)
    row_factor = tl.full([BLOCK_G], scale * LOG2E, tl.float32)
    if FP8:  # e4m3 feature rows: each logit times its row's scale
        row_factor = row_factor * tl.load(F_SCALE + rows, mask=row_ok, other=0.0)
    m2 = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for it in range(0, tl.cdiv(c_hi - c_lo, BLOCK_C) * k_tiles):
        f, w = _operand_slices(
            F, W, row0, rows, row_ok, c_lo, c_hi, it, k_tiles, D, stride_f, stride_w, EVEN_K, BLOCK_C, BLOCK_K, TMA
        )
        acc = tl.dot(f, tl.trans(w), acc, input_precision=PRECISION)
        if it % k_tiles == k_tiles - 1:  # the tile's logits are complete: fold them in
            c0, cols, col_ok = _tile_columns(c_lo, c_hi, it, k_tiles, BLOCK_C)
            z2 = acc * row_factor[:, None]
            if COSINE:
                z2 = z2 * tl.load(INV_NORM + cols, mask=col_ok, other=0.0)[None, :]
            if HAS_OFFSET:  # a constant per class (sampled softmax's correction), after the scale
                z2 = z2 + tl.load(OFFSET + cols, mask=col_ok, other=0.0)[None, :] * LOG2E
            if tl.max(((label >= c0) & (label < c0 + BLOCK_C)).to(tl.int32)) > 0:
                z2 = tl.where(label[:, None] == cols[None, :], float("-inf"), z2)
            if c0 + BLOCK_C > c_hi:
                z2 = tl.where(col_ok[None, :], z2, float("-inf"))
            m2_new = tl.maximum(m2, tl.max(z2, axis=1))
            # a row with nothing counted yet (its target the tile's only class) keeps -inf:
            # shift by 0 there, so no exp2 sees -inf - -inf
            shift = tl.where(m2_new == float("-inf"), 0.0, m2_new)
            l = l * tl.exp2(m2 - shift) + tl.sum(tl.exp2(z2 - shift[:, None]), axis=1)
            m2 = m2_new
            acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    out = tl.program_id(1) * G + rows
    tl.store(M_OUT + out, m2 / LOG2E, mask=row_ok)
    tl.store(L_OUT + out, l, mask=row_ok)


@triton.jit(do_not_specialize=["G", "C", "splits"])
def _lse_merge_kernel(
    F,
    F_SCALE,
    W,
    INV_NORM,
    OFFSET,
    LOCAL_LABEL,
    SPLIT_MAX,
    SPLIT_SUM,
    ROW_MAX,
    ROW_SUM,
    TARGET,
    G,
    C,
    D,
    splits,
    stride_f,
    stride_w,
    scale,
    target_shift,
    COSINE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    FP8: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per row: its target's shifted logit (a float32 dot of the feature row and the label's
    row, which ``_lse_kernel`` leaves out), then the splits' (max, sum of exp) merged with
    it. Rows whose label is not a class of the shard keep the splits' terms, target 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < G
    label = tl.load(LOCAL_LABEL + rows, mask=row_ok, other=-1)
    here = row_ok & (label >= 0) & (label < C)
    dot = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        f = tl.load(F + rows[:, None].to(tl.int64) * stride_f + dims[None, :], mask=row_ok[:, None] & d_ok[None, :])
        w = tl.load(W + label[:, None].to(tl.int64) * stride_w + dims[None, :], mask=here[:, None] & d_ok[None, :])
        dot += tl.sum(f.to(tl.float32) * w.to(tl.float32), axis=1)
    logit = dot * scale
    if FP8:
        logit = logit * tl.load(F_SCALE + rows, mask=row_ok, other=0.0)
    if COSINE:
        logit = logit * tl.load(INV_NORM + label, mask=here, other=0.0)
    if HAS_OFFSET:
        logit = logit + tl.load(OFFSET + label, mask=here, other=0.0)
    target = tl.where(here, logit - target_shift, 0.0)
    # the splits in BLOCK_S-row tiles (a G = 256 batch has hundreds of splits: one load each
    # would leave the loop waiting on memory latency)
    row_max = tl.where(here, target, float("-inf"))
    for s0 in range(0, splits, BLOCK_S):
        split = s0 + tl.arange(0, BLOCK_S)
        at = split[:, None] * G + rows[None, :]
        ok = (split < splits)[:, None] & row_ok[None, :]
        row_max = tl.maximum(row_max, tl.max(tl.load(SPLIT_MAX + at, mask=ok, other=float("-inf")), axis=0))
    # finite: each row counts a class of the shard, or its target is here (C_r >= 1)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.where(here, tl.exp(target - safe_max), 0.0)
    for s0 in range(0, splits, BLOCK_S):
        split = s0 + tl.arange(0, BLOCK_S)
        at = split[:, None] * G + rows[None, :]
        ok = (split < splits)[:, None] & row_ok[None, :]
        split_max = tl.load(SPLIT_MAX + at, mask=ok, other=float("-inf"))
        split_sum = tl.load(SPLIT_SUM + at, mask=ok, other=0.0)
        row_sum += tl.sum(split_sum * tl.exp(split_max - safe_max[None, :]), axis=0)  # 0 for empty splits
    tl.store(ROW_MAX + rows, row_max, mask=row_ok)
    tl.store(ROW_SUM + rows, row_sum, mask=row_ok)
    tl.store(TARGET + rows, target, mask=row_ok)


@triton.jit(do_not_specialize=["C", "classes_per_split", "tile_capacity"])
def _flag_kernel(
    F,
    F_SCALE,
    W,
    INV_NORM,
    CUT,
    TILE_COUNT,
    TILE_ROW_BLOCK,
    TILE_START,
    G,
    C,
    D,
    stride_f,
    stride_w,
    classes_per_split,
    scale,
    tile_capacity,
    COSINE: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
):
    """List the (row block, class tile) pairs holding any logit >= cut (targets included).

    The common tile costs a subtract and a max per entry; the rare hit writes two scalars.
    Writing the entries themselves here would need the whole tile re-laid out through
    shared memory, which does not fit beside the load pipeline: ``_extract_kernel`` does it.
    """
    pid_g, rows, row_ok, c_lo, c_hi, k_tiles = _program_range(G, C, D, classes_per_split, BLOCK_G, BLOCK_K)
    row0 = pid_g * BLOCK_G
    cut = _raw_cut(CUT, F_SCALE, rows, row_ok, scale, FP8)
    acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for it in range(0, tl.cdiv(c_hi - c_lo, BLOCK_C) * k_tiles):
        f, w = _operand_slices(
            F, W, row0, rows, row_ok, c_lo, c_hi, it, k_tiles, D, stride_f, stride_w, EVEN_K, BLOCK_C, BLOCK_K, TMA
        )
        acc = tl.dot(f, tl.trans(w), acc, input_precision=PRECISION)
        if it % k_tiles == k_tiles - 1:
            c0, cols, col_ok = _tile_columns(c_lo, c_hi, it, k_tiles, BLOCK_C)
            if COSINE:
                acc = acc * tl.load(INV_NORM + cols, mask=col_ok, other=0.0)[None, :]
            if tl.max(acc - cut[:, None]) >= 0:
                index = tl.atomic_add(TILE_COUNT, 1)
                if index < tile_capacity:  # past capacity: only counted (the caller retries)
                    tl.store(TILE_ROW_BLOCK + index, pid_g)
                    tl.store(TILE_START + index, c0)
            acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)


@triton.jit(do_not_specialize=["C", "tile_capacity", "capacity"])
def _extract_kernel(
    F,
    F_SCALE,
    W,
    INV_NORM,
    LOCAL_LABEL,
    CUT,
    TILE_COUNT,
    TILE_ROW_BLOCK,
    TILE_START,
    COUNT,
    OUT_ROW,
    OUT_COL,
    OUT_LOGIT,
    G,
    C,
    D,
    stride_f,
    stride_w,
    scale,
    tile_capacity,
    capacity,
    COSINE: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
):
    """One flagged tile per program: recompute it and append its non-target entries >= cut.

    The grid is the tile list's capacity, so no host sync sits between the two kernels;
    programs past the flagged count return at once.
    """
    pid = tl.program_id(0)
    if pid >= tl.minimum(tl.load(TILE_COUNT), tile_capacity):
        return
    pid_g = tl.load(TILE_ROW_BLOCK + pid)
    c0 = tl.load(TILE_START + pid)
    row0 = pid_g * BLOCK_G
    rows = row0 + tl.arange(0, BLOCK_G)
    row_ok = rows < G
    label = tl.load(LOCAL_LABEL + rows, mask=row_ok, other=-1)
    cut = _raw_cut(CUT, F_SCALE, rows, row_ok, scale, FP8)
    k_tiles = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for it in range(0, k_tiles):  # tiles never straddle a split (splits are whole tiles), so C bounds them
        f, w = _operand_slices(
            F, W, row0, rows, row_ok, c0, C, it, k_tiles, D, stride_f, stride_w, EVEN_K, BLOCK_C, BLOCK_K, TMA
        )
        acc = tl.dot(f, tl.trans(w), acc, input_precision=PRECISION)
    _, cols, col_ok = _tile_columns(c0, C, 0, k_tiles, BLOCK_C)
    if COSINE:
        acc = acc * tl.load(INV_NORM + cols, mask=col_ok, other=0.0)[None, :]
    keep = (acc >= cut[:, None]) & (label[:, None] != cols[None, :]) & col_ok[None, :]
    slot = tl.atomic_add(COUNT + tl.zeros_like(cols)[None, :] + tl.zeros_like(rows)[:, None], 1, mask=keep)
    store = keep & (slot < capacity)  # past capacity: only counted (the caller retries)
    tl.store(OUT_ROW + slot, rows[:, None] + tl.zeros_like(slot), mask=store)
    tl.store(OUT_COL + slot, cols[None, :] + tl.zeros_like(slot), mask=store)
    logit = acc * scale
    if FP8:
        logit = logit * tl.load(F_SCALE + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(OUT_LOGIT + slot, logit, mask=store)


@triton.jit(do_not_specialize=["C", "first_class", "key1", "key2"])
def _sgd_kernel(
    W,
    BUF,
    COMP,
    CLASS_IDS,
    TOUCHED,
    TOUCHED_GRAD,
    BOUNDS,
    INV_NORM,
    LR,
    KEYS,
    SKIP,
    C,
    D,
    stride_w,
    lr,
    momentum,
    weight_decay,
    first_class,
    key1,
    key2,
    HAS_BUF: tl.constexpr,
    HAS_COMP: tl.constexpr,
    HAS_IDS: tl.constexpr,
    DENSE: tl.constexpr,
    PROJECT: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    KEYS_ON_DEVICE: tl.constexpr,
    SKIP_ON_DEVICE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    COMP_MANT_BITS: tl.constexpr,
    COMP_MIN_EXP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """torch.optim.SGD's step on BLOCK_R rows; rows in TOUCHED (sorted) add their gradient, or
    (DENSE) every row adds its row of TOUCHED_GRAD (C x D, contiguous). The new weights are
    written onto the storage grid as the exact weight kernel writes them.

    PROJECT (cosine logits, DENSE only): the gradient comes with respect to the unit rows
    u = w / ||w|| (INV_NORM: 1 / ||w|| per row), already times 1 / ||w|| unless SCALE_GRAD,
    and is taken through the normalisation here, g - u (u . g), from the rows already loaded.
    LR_ON_DEVICE, KEYS_ON_DEVICE: the learning rate (float32) and the rounding keys (two int32)
    are read from LR and KEYS, not taken from the arguments (a step in a CUDA graph).
    SKIP_ON_DEVICE: where SKIP (int32) is nonzero nothing is stored (the loss's verdict)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < C
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    tile = rows[:, None].to(tl.int64) * stride_w + dims[None, :]
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    w32 = tl.load(W + tile, mask=tile_ok, other=0.0).to(tl.float32)
    if DENSE:
        grad = tl.load(TOUCHED_GRAD + rows[:, None].to(tl.int64) * D + dims[None, :], mask=tile_ok, other=0.0)
    else:
        grad = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        lo = tl.load(BOUNDS + pid)
        hi = tl.load(BOUNDS + pid + 1)
        for j in range(lo, hi):  # the touched rows of this block (usually none or one)
            row = tl.load(TOUCHED + j)
            touched = tl.load(TOUCHED_GRAD + tl.cast(j, tl.int64) * D + dims, mask=dim_ok, other=0.0)
            grad += tl.where(rows[:, None] == row, touched[None, :], 0.0)
    if PROJECT:
        inv_norm = tl.load(INV_NORM + rows, mask=row_ok, other=0.0)
        if SCALE_GRAD:
            grad = grad * inv_norm[:, None]
        unit = w32 * inv_norm[:, None]
        grad = grad - unit * tl.sum(unit * grad, axis=1)[:, None]
    ids = tl.load(CLASS_IDS + rows, mask=row_ok, other=0) if HAS_IDS else first_class + rows
    if LR_ON_DEVICE:
        lr = tl.load(LR)
    if KEYS_ON_DEVICE:
        key1 = tl.load(KEYS)
        key2 = tl.load(KEYS + 1)
    if SKIP_ON_DEVICE:  # every load and store below is masked: a held-back step moves no byte more
        # (read once a row: the interpreter takes no scalar in a mask)
        tile_ok = tile_ok & (tl.load(SKIP + rows * 0) == 0)[:, None]
    sgd_store(
        W,
        BUF,
        COMP,
        tile,
        tile_ok,
        w32,
        grad,
        ids,
        dims,
        lr,
        momentum,
        weight_decay,
        key1,
        key2,
        HAS_BUF,
        HAS_COMP,
        STOCHASTIC,
        EXACT_CAST,
        MANT_BITS,
        MIN_EXP,
        MAX_VALUE,
        COMP_MANT_BITS,
        COMP_MIN_EXP,
    )


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _grid(num_rows: int, num_classes: int, block_g: int, block_c: int, device: torch.device):
    """(row blocks, class splits, classes per split): about 4 waves of programs, splits on tile edges.

    (1, 2 or 4 waves measured within 0.5 ms of each other at 1M classes.)
    """
    row_blocks = triton.cdiv(num_rows, block_g)
    wanted = max(1, 4 * _num_programs_target(device) // row_blocks)
    splits = max(1, min(triton.cdiv(num_classes, block_c), wanted))
    per_split = triton.cdiv(triton.cdiv(num_classes, splits), block_c) * block_c
    return row_blocks, triton.cdiv(num_classes, per_split), per_split


def _fp8_args(operand: FeatureOperand) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(features, their row scales or a stand-in, whether they are e4m3 rows)."""
    return operand.values, operand.row_scale if operand.fp8 else operand.values, operand.fp8


def check_offset_operand(logit_offset: torch.Tensor | None, weight: torch.Tensor) -> None:
    """A kernel's per-class logit offsets: float32, contiguous, one per row of ``weight``, on
    its device (the kernels read them by class index, with no strides)."""
    if logit_offset is None:
        return
    if (
        logit_offset.dtype != torch.float32
        or not logit_offset.is_contiguous()
        or logit_offset.shape != (weight.shape[0],)
        or logit_offset.device != weight.device
    ):
        raise ValueError(
            f"logit_offset must be a contiguous float32 tensor of shape ({weight.shape[0]},) on {weight.device}, "
            f"got {logit_offset.dtype} {tuple(logit_offset.shape)} on {logit_offset.device}"
        )


def shard_lse(
    feat_op, weight, inv_norm, local_label, *, scale: float, target_shift: float, cosine: bool, logit_offset=None
):
    """Local (max, sum of exp, target logit) per sample over this shard: 2·G·D·C_r FLOPs.
    ``logit_offset`` (float32, one per class of the shard): added to each class's logits."""
    check_offset_operand(logit_offset, weight)
    feat_op, f_scale, fp8 = _fp8_args(_as_operand(feat_op))
    num_rows, dim = feat_op.shape
    num_classes = weight.shape[0]
    tma = descriptor_loads(feat_op, weight)
    flags = dict(COSINE=cosine, HAS_OFFSET=logit_offset is not None, FP8=fp8)  # both kernels' variant

    def launch(tiles):
        block_g, block_c, block_k, warps, stages = tiles
        row_blocks, splits, per_split = _grid(num_rows, num_classes, block_g, block_c, feat_op.device)
        stats = torch.empty((2, splits, num_rows), dtype=torch.float32, device=feat_op.device)
        _lse_kernel[(row_blocks, splits)](
            block_operand(feat_op, [block_g, block_k], tma),
            f_scale,
            block_operand(weight, [block_c, block_k], tma),
            inv_norm if cosine else weight,
            logit_offset if logit_offset is not None else weight,
            local_label,
            stats[0],
            stats[1],
            num_rows,
            num_classes,
            dim,
            feat_op.stride(0),
            weight.stride(0),
            per_split,
            scale,
            **flags,
            PRECISION=_precision(weight.dtype),
            EVEN_K=dim % block_k == 0,
            BLOCK_G=block_g,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            TMA=tma,
            num_warps=warps,
            num_stages=stages,
        )
        return stats

    if pingpong.applies(feat_op, weight, fp8=fp8, cosine=cosine, offset=logit_offset is not None):
        # the exps beside the products
        stats = pingpong.split_stats(feat_op, weight, local_label, scale, inv_norm if cosine else None)
    else:
        kernel = ("lse_fp8_tma" if fp8 else "filtered_tma") if tma else "filtered"
        variant = ("lse", cosine, fp8, logit_offset is not None)
        stats = launch_fitted(kernel, dim, weight.dtype, feat_op.device, launch, variant)
    split_max, split_sum = stats
    # the splits' terms, then each row's target term (left out by the kernel) folded in
    row_max, row_sum, target = torch.empty((3, num_rows), dtype=torch.float32, device=feat_op.device)
    block_r = 16
    _lse_merge_kernel[(triton.cdiv(num_rows, block_r),)](
        feat_op,
        f_scale,
        weight,
        inv_norm if cosine else split_max,
        logit_offset if logit_offset is not None else split_max,
        local_label,
        split_max,
        split_sum,
        row_max,
        row_sum,
        target,
        num_rows,
        num_classes,
        dim,
        split_max.shape[0],
        feat_op.stride(0),
        weight.stride(0),
        scale,
        target_shift,
        **flags,
        BLOCK_R=block_r,
        BLOCK_D=min(128, triton.next_power_of_2(max(dim, 16))),
        BLOCK_S=64 if feat_op.is_cuda else 16,
    )
    return row_max, row_sum, target


def target_logits(features, row_scale, weight, inv_norm, local_label, scale: float, logit_offset=None):
    """(whether each row's label is a class of this shard, its logit there; 0 elsewhere):
    a gather of the labels' rows and a row dot in float32, the logits the LSE pass leaves
    out of its max and sum. ``row_scale``: fp8 features' row scales (None otherwise)."""
    num_classes = weight.shape[0]
    here = (local_label >= 0) & (local_label < num_classes)
    if num_classes == 0:
        return here, torch.zeros(here.shape, dtype=torch.float32, device=here.device)
    index = torch.where(here, local_label, 0).long()
    rows = (
        weight.view(torch.uint8).index_select(0, index).view(weight.dtype)
        if weight.element_size() == 1
        else weight.index_select(0, index)
    )
    # elementwise, not a matmul: a product here would be cuBLAS's first on this stream in
    # the filtered step and cost its 32 MiB workspace; one G x D float32 copy instead
    logit = rows.float().mul_(features if features.element_size() > 1 else features.float()).sum(dim=1) * scale
    if row_scale is not None:
        logit = logit * row_scale
    if inv_norm is not None:
        logit = logit * inv_norm.index_select(0, index)
    if logit_offset is not None:
        logit = logit + logit_offset.index_select(0, index)
    return here, torch.where(here, logit, 0.0)


def select_entries(feat_op, weight, inv_norm, local_label, cut, *, scale: float, cosine: bool, capacity: int):
    """Every non-target (sample, class, logit) with logit >= cut[sample].

    Returns ((rows, cols, logits) as int64, int64, fp32 tensors, count), or (None, count)
    when more than ``max_entries`` qualify. Two kernels: one pass over the whole shard
    lists the tiles with any hit, a second recomputes just those tiles and writes their
    entries. A list that overflows its ``capacity`` is redone once with the size counted.
    """
    feat_op, f_scale, fp8 = _fp8_args(_as_operand(feat_op))
    num_rows, dim = feat_op.shape
    num_classes = weight.shape[0]
    device = feat_op.device
    tma = descriptor_loads(feat_op, weight)

    def launch(tile_shape):
        block_g, block_c, block_k, warps, stages = tile_shape
        row_blocks, splits, per_split = _grid(num_rows, num_classes, block_g, block_c, feat_op.device)
        limit = max_entries(num_rows)
        common = dict(
            COSINE=cosine,
            FP8=fp8,
            PRECISION=_precision(weight.dtype),
            EVEN_K=dim % block_k == 0,
            BLOCK_G=block_g,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            TMA=tma,
            num_warps=warps,
        )
        feat_arg = block_operand(feat_op, [block_g, block_k], tma)
        weight_arg = block_operand(weight, [block_c, block_k], tma)
        inv = inv_norm if cosine else weight

        def flag(tile_capacity):
            count = torch.zeros(1, dtype=torch.int32, device=device)
            tiles = torch.empty((2, tile_capacity), dtype=torch.int32, device=device)
            _flag_kernel[(row_blocks, splits)](
                feat_arg,
                f_scale,
                weight_arg,
                inv,
                cut,
                count,
                tiles[0],
                tiles[1],
                num_rows,
                num_classes,
                dim,
                feat_op.stride(0),
                weight.stride(0),
                per_split,
                scale,
                tile_capacity,
                num_stages=stages,
                **common,
            )
            return count, tiles

        def extract(tile_count, tiles, entry_capacity):
            count = torch.zeros(1, dtype=torch.int32, device=device)
            out = torch.empty((2, entry_capacity), dtype=torch.int32, device=device)
            logits = torch.empty(entry_capacity, dtype=torch.float32, device=device)
            _extract_kernel[(tiles.shape[1],)](
                feat_arg,
                f_scale,
                weight_arg,
                inv,
                local_label,
                cut,
                tile_count,
                tiles[0],
                tiles[1],
                count,
                out[0],
                out[1],
                logits,
                num_rows,
                num_classes,
                dim,
                feat_op.stride(0),
                weight.stride(0),
                scale,
                tiles.shape[1],
                entry_capacity,
                num_stages=2,
                **common,
            )
            return count, out, logits

        tile_count, tiles = flag(capacity)  # a peaked softmax flags about one tile per sample (its target's)
        count, out, logits = extract(tile_count, tiles, capacity)
        num_tiles, found = torch.cat([tile_count, count]).tolist()  # the one host sync of a step
        if num_tiles > capacity:  # the extraction saw only part of the tiles: list them all, then extract again
            if num_tiles > num_rows + limit:  # each flagged tile beyond the targets' holds a kept entry
                return None, num_tiles
            tile_count, tiles = flag(num_tiles)
            count, out, logits = extract(tile_count, tiles, capacity)
            found = int(count.item())
        if found > capacity:
            if found > limit:
                return None, found
            count, out, logits = extract(tile_count, tiles, found)
        return (out[0, :found].long(), out[1, :found].long(), logits[:found]), found

    kernel = "filtered_tma" if tma else "filtered"
    return launch_fitted(kernel, dim, weight.dtype, device, launch, ("select", cosine, fp8))


def max_entries(num_rows: int) -> int:
    """Kept entries a step may hold before falling back to the exact kernels (12 bytes each)."""
    return int(os.environ.get("HYDRAHEAD_FILTER_MAX_ENTRIES", 64 * num_rows + 65536))


def initial_capacity(num_rows: int) -> int:
    return 4 * num_rows + 4096


def sparse_gradients(feat_op, weight, inv_norm, entries, *, grad_scale: float, cosine: bool, num_rows: int):
    """dF (fp32, G x D) and (touched classes sorted, their fp32 gradient rows) from a list of P entries.

    ``entries`` = (rows, cols, values) with values already P = softmax - onehot; both
    gradients are scaled by ``grad_scale``. Cosine logits: dW is taken through the row
    normalisation of W (the same projection as the exact weight kernel).
    """
    operand = _as_operand(feat_op)
    feat_op = operand.values
    rows, cols, values = entries
    values = values * grad_scale
    dim = feat_op.shape[1]
    grad_feat = torch.zeros(num_rows, dim, dtype=torch.float32, device=feat_op.device)
    touched, slot = torch.unique(cols, sorted=True, return_inverse=True)
    touched_grad = torch.zeros(touched.numel(), dim, dtype=torch.float32, device=feat_op.device)
    for lo in range(0, rows.numel(), _GATHER_ENTRIES):
        r, c, v, s = (x[lo : lo + _GATHER_ENTRIES] for x in (rows, cols, values, slot))
        w_rows = weight[c].float()
        if cosine:
            w_rows *= inv_norm[c, None]
        grad_feat.index_add_(0, r, w_rows.mul_(v[:, None]))
        if operand.fp8:  # the e4m3 rows times their scales: the features the logits saw
            v = v * operand.row_scale[r]
        touched_grad.index_add_(0, s, feat_op[r].float().mul_(v[:, None]))
    if cosine and touched.numel():
        inv = inv_norm[touched, None]
        w_unit = weight[touched].float() * inv
        radial = (w_unit * touched_grad).sum(dim=1, keepdim=True)
        touched_grad = (touched_grad - w_unit * radial) * inv
    return grad_feat, touched, touched_grad


def apply_sgd(weight, touched, touched_grad, update: SGDUpdate) -> None:
    """torch.optim.SGD's step on every row of ``weight``, with the sparse gradient on ``touched``."""
    check_update(weight, update, device_scalars=True)
    if touched.numel() == 0:  # no row has a gradient: a one-entry stand-in keeps the pointers valid
        touched = torch.full((1,), -1, dtype=torch.int64, device=weight.device)
        touched_grad = torch.zeros(1, weight.shape[1], dtype=torch.float32, device=weight.device)
    blocks = triton.cdiv(weight.shape[0], _SGD_ROWS)
    edges = torch.arange(0, blocks + 1, device=weight.device, dtype=torch.int64) * _SGD_ROWS
    bounds = torch.searchsorted(touched, edges).to(torch.int32)
    _launch_sgd(weight, update, update.class_ids, touched_grad.contiguous(), touched, bounds)


def apply_sgd_rows(
    weight,
    grad,
    update: SGDUpdate,
    first_row: int,
    inv_norm=None,
    *,
    grad_scaled: bool = True,
    plan: RoundingPlan | None = None,
) -> None:
    """torch.optim.SGD's step on rows [first_row, first_row + len(grad)) of ``weight``, each with
    its row of the dense ``grad`` (read in float32); the rest of the shard is untouched.

    ``inv_norm`` (cosine logits: 1 / ||w|| of these rows): ``grad`` is the gradient with
    respect to the unit rows, times 1 / ||w|| where ``grad_scaled``, and the kernel takes it
    through the normalisation (g - u (u . g), u = w / ||w||) as it applies the step, so no
    float32 copy of the chunk is made for the projection. ``plan``: ``rounding_plan(weight,
    update)``, made once by a caller that steps a shard chunk by chunk (with the step in a
    device tensor, its keys are a dozen small ops)."""
    check_update(weight, update, device_scalars=True)
    if inv_norm is not None and inv_norm.shape != (grad.shape[0],):
        raise ValueError(f"inv_norm must hold one value per row of grad ({grad.shape[0]}), got {tuple(inv_norm.shape)}")
    rows = slice(first_row, first_row + grad.shape[0])
    class_ids = update.class_ids
    class_ids = class_ids[rows] if isinstance(class_ids, torch.Tensor) else int(class_ids) + first_row
    _launch_sgd(
        weight[rows],
        update,
        class_ids,
        grad.contiguous(),
        None,
        None,
        momentum_buffer=update.momentum_buffer[rows] if update.momentum != 0 else None,
        compensation=update.compensation[rows] if update.compensation is not None else None,
        inv_norm=None if inv_norm is None else inv_norm.float().contiguous(),
        scale_grad=inv_norm is not None and not grad_scaled,  # the scaling is the projection's
        plan=plan,
    )


def _launch_sgd(weight, update, class_ids, grad, touched, bounds, **buffers) -> None:
    """One ``_sgd_kernel`` pass over ``weight``'s rows (``touched`` None: ``grad`` is dense).
    ``buffers``: the momentum buffer and compensation rows matching ``weight`` when it is a
    slice of the shard (by default, the update's own); ``inv_norm`` and ``scale_grad``: the
    cosine projection of a dense gradient (``apply_sgd_rows``); ``plan``: the rounding plan, if
    the caller made it already."""
    num_classes, dim = weight.shape
    inv_norm = buffers.get("inv_norm")
    lr_on_device = isinstance(update.lr, torch.Tensor)
    has_buf = update.momentum != 0
    momentum_buffer = buffers.get("momentum_buffer", update.momentum_buffer)
    compensation = buffers.get("compensation", update.compensation)
    has_ids = isinstance(class_ids, torch.Tensor)
    dense = touched is None
    plan = buffers.get("plan") or rounding_plan(weight, update)
    _sgd_kernel[(triton.cdiv(num_classes, _SGD_ROWS),)](
        weight,
        momentum_buffer if has_buf else weight,
        compensation if compensation is not None else weight,
        class_ids.long() if has_ids else grad,
        grad if dense else touched,
        grad,
        grad if dense else bounds,
        inv_norm if inv_norm is not None else grad,
        update.lr if lr_on_device else grad,
        plan.keys if plan.keys is not None else grad,
        update.skip if update.skip is not None else grad,
        num_classes,
        dim,
        weight.stride(0),
        0.0 if lr_on_device else update.lr,
        update.momentum,
        update.weight_decay,
        0 if has_ids else int(class_ids),
        plan.key1,
        plan.key2,
        HAS_BUF=has_buf,
        HAS_COMP=compensation is not None,
        HAS_IDS=has_ids,
        DENSE=dense,
        PROJECT=inv_norm is not None,
        SCALE_GRAD=bool(buffers.get("scale_grad", False)),
        LR_ON_DEVICE=lr_on_device,
        KEYS_ON_DEVICE=plan.keys is not None,
        SKIP_ON_DEVICE=update.skip is not None,
        **plan.constants,
        BLOCK_R=_SGD_ROWS,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        num_warps=4,
    )


def kept_target_entries(owned_rows, owned_cols, target_logit, lse, grad_filter: float):
    """The target entries P = p_t - 1 whose |P| passes the filter (p_t from the forward)."""
    values = torch.exp(target_logit[owned_rows] - lse[owned_rows]) - 1.0
    keep = values.abs() >= grad_filter
    return owned_rows[keep], owned_cols[keep], values[keep]


def warn_fallback(found: int, limit: int, grad_filter: float) -> None:
    warnings.warn(
        f"head.grad_filter={grad_filter:g} kept {found} softmax entries this step (more than {limit}); "
        "this step ran the exact kernels instead. A larger threshold keeps the filtered path.",
        RuntimeWarning,
        stacklevel=3,
    )


__all__ = [
    "apply_sgd",
    "apply_sgd_rows",
    "initial_capacity",
    "kept_target_entries",
    "select_entries",
    "shard_lse",
    "sparse_gradients",
]
