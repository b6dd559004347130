"""The exact head step's backward as one Triton pass that writes P, then two library GEMMs.

The stationary kernels (``shard_ce``) hold a block x D fp32 accumulator in registers, which
limits them to 32- and 64-row blocks and leaves them bound by L2 traffic at 3x their
arithmetic floor. This path keeps every matrix product a plain GEMM instead:

forward   ``filtered.shard_lse``: per sample (max, sum of exp, target) over the shard,
          2·G·D·C_r FLOPs on GEMM-shaped tiles (no D-wide accumulator).
backward  class chunk by class chunk (a G x chunk buffer of P and a chunk x D one of
          dW, 256 MiB each at most; HYDRAHEAD_EXACT_CHUNK_MIB overrides it):
          ``_probs_kernel`` recomputes the chunk's logits and writes
          P = g·(softmax - onehot) (g = the logit scale times the incoming gradient over
          the valid labels; times 1/||w_c|| for cosine logits) in the weights' dtype;
          dF += P W_c and dW_c = P^T F run on cuBLAS, and ``filtered.apply_sgd_rows``
          applies torch.optim.SGD's step to the chunk's rows (one pass over them, their
          momentum buffer and dW_c). 6·G·D·C_r FLOPs. On sm_90 with bf16 rows the dW
          product and the step run as one kernel (``dw_update``), which at batches of up to
          256 rows also computes dF from the rows it loads: no dW_c, no third read of W.

Extra memory: the P chunk, one chunk of dW (in the rows' dtype), each within the chunk
budget, and dF; no C_r x D tensor. fp8 rows: P is written in e5m2 twice, scaled for dF and,
transposed, for dW (FP8 tensor cores take K-major operands only), and both products run
through ``torch._scaled_mm``. The dF copy holds the softmax part only and g·w_y is
subtracted exactly (a gather): in e5m2 every row's target entry g(p_y - 1), p_y small,
rounds to the same wrong value, which put dF up to 11% off. ``auto`` takes this path
for fp8 rows from a global batch of ``FP8_GEMM_MIN_ROWS`` (docs/kernels.md).

The Triton pass loads F and W, and stores P (and P^T), through tensor descriptors where
the operands allow it (``tiles.descriptor_loads``). It is persistent: as many programs as
the GPU holds at once (``tiles.resident_programs``) walk the chunk's tiles, so each
program's load pipeline stays full from one tile to the next.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hydrahead.kernels import dw_update, pingpong
from hydrahead.kernels.filtered import _operand_slices, apply_sgd_rows, check_offset_operand, target_logits
from hydrahead.kernels.rounding import INTERPRETED, rounding_plan, to_e5m2
from hydrahead.kernels.shard_ce import (
    FP8,
    FeatureOperand,
    SGDUpdate,
    _as_operand,
    _device_scalar,
    _precision,
    check_update,
    operand_scale,
)
from hydrahead.kernels.tiles import block_operand, descriptor_loads, launch_fitted, resident_programs

EXACT_KERNELS = ("auto", "gemm", "stationary")
# dW_c and the update in one warp-specialised kernel (``dw_update``) where it applies and is
# faster (batches of 64 to 4,096 rows on sm_90); HYDRAHEAD_FUSED_DW_UPDATE=0 keeps the product and pass.
FUSED_DW_UPDATE = os.environ.get("HYDRAHEAD_FUSED_DW_UPDATE", "1") != "0"
_CHUNK_MIB = 256  # the P chunk's size; HYDRAHEAD_EXACT_CHUNK_MIB overrides it
_PROGRAMS: dict[tuple, int] = {}  # the persistent P kernel's grid, per compiled variant


@triton.jit
def _store_probs(
    acc,
    row0,
    c0,
    F_SCALE,
    INV_NORM,
    OFFSET,
    LSE,
    GRAD_SCALE,
    P_SCALES,
    P,
    P_T,
    G,
    c_lo,
    c_hi,
    g_store,
    c_store,
    stride_p,
    stride_pt,
    scale,
    COSINE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    FP8: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    TMA: tl.constexpr,
):
    """The epilogue of one tile: its logits ``acc`` (rows row0.., classes c0..) into P (and P^T).

    Every entry as a softmax entry, the targets' too: ``_fix_targets`` then writes those
    (shifted logit, one-hot taken off). A branch for the tiles holding a target kept two
    tiles of float32 live where it joined the common path, and spilled registers (488
    bytes a thread at 128 x 256 x 128 with fp8 rows)."""
    # In log2 units, so each exp is one exp2.
    LOG2E: tl.constexpr = 1.4426950408889634
    rows = row0 + tl.arange(0, BLOCK_G)
    row_ok = rows < G
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < c_hi
    z2 = acc * (scale * LOG2E)
    if FP8:  # e4m3 feature rows: each logit times its row's scale
        f_scale = tl.load(F_SCALE + rows, mask=row_ok, other=0.0)
        z2 = z2 * f_scale[:, None]
    if COSINE:
        inv = tl.load(INV_NORM + cols, mask=col_ok, other=0.0)
        z2 = z2 * inv[None, :]
    if HAS_OFFSET:  # as in the LSE pass: P is the softmax of the offset logits
        z2 = z2 + tl.load(OFFSET + cols, mask=col_ok, other=0.0)[None, :] * LOG2E
    lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * LOG2E  # +inf: ignored rows get p = 0
    soft = tl.exp2(z2 - lse2[:, None])
    p = soft
    valid = row_ok[:, None] & col_ok[None, :]
    p = tl.where(valid, p * tl.load(GRAD_SCALE), 0.0)
    stored = (rows < g_store)[:, None] & (cols < c_store)[None, :]
    if FP8:
        # e5m2, scaled by powers of two so the largest possible magnitude lands at most at
        # 2^15 (operand_scale). For dF = P W_c, the softmax part only, over ||w_c||: every
        # row's target entry g(p - 1) would round alike (two mantissa bits: up to 11% off, the
        # same way in every row), so the caller subtracts g w_y exactly. For dW = P^T F, all
        # of P times the rows' scales (on the summed axis); 1 / ||w_c|| goes on the product.
        p_feat = tl.where(valid, soft * tl.load(GRAD_SCALE), 0.0)
        p_feat = p_feat * inv[None, :] if COSINE else p_feat
        for_features = to_e5m2(p_feat * tl.load(P_SCALES), EXACT_CAST)
        for_weights = to_e5m2(p * (f_scale * tl.load(P_SCALES + 1))[:, None], EXACT_CAST)
        if TMA:  # the transposed tile goes through shared memory in one piece, not byte by byte
            P.store([row0, c0 - c_lo], for_features)
            P_T.store([c0 - c_lo, row0], tl.trans(for_weights))
        else:
            out = P + rows[:, None].to(tl.int64) * stride_p + (cols - c_lo)[None, :]
            tl.store(out, for_features, mask=stored)
            out_t = P_T + (cols - c_lo)[None, :].to(tl.int64) * stride_pt + rows[:, None]
            tl.store(out_t, for_weights, mask=stored)
    else:
        if COSINE:
            p = p * inv[None, :]
        if TMA:  # the descriptor's bounds are the chunk's: nothing past them is written
            P.store([row0, c0 - c_lo], p.to(P.dtype))
        else:
            out = P + rows[:, None].to(tl.int64) * stride_p + (cols - c_lo)[None, :]
            tl.store(out, p.to(P.dtype.element_ty), mask=stored)


@triton.jit(do_not_specialize=["c_lo", "c_hi", "g_store", "c_store"])
def _probs_kernel(
    F,
    F_SCALE,
    W,
    INV_NORM,
    OFFSET,
    LSE,
    GRAD_SCALE,
    P_SCALES,
    P,
    P_T,
    G,
    D,
    c_lo,
    c_hi,
    g_store,
    c_store,
    stride_f,
    stride_w,
    stride_p,
    stride_pt,
    scale,
    COSINE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    FP8: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
):
    """P for rows [0, G) and classes [c_lo, c_hi) into P (and, FP8, P's transpose into P_T);
    the stores cover [0, g_store) x [c_lo, c_store) with zeros outside the valid block, the
    padding that the FP8 products' multiples of 16 need. With TMA, F, W, P and P_T are
    tensor descriptors; W's covers every class (those past c_hi count as invalid), P's the
    stored block.

    Persistent: program i takes tiles i, i + programs, ... in one flat loop over (tile, D
    slice), so the next tile's slices load while this one's epilogue runs and its stores
    drain (one tile per program left the pipeline to fill again for each 4-8 slices). The
    result does not depend on the number of programs."""
    # Tiles are numbered row block first: the programs at work together read the same W tile.
    row_tiles = tl.cdiv(g_store, BLOCK_G)
    tiles = row_tiles * tl.cdiv(c_store - c_lo, BLOCK_C)
    k_tiles = tl.cdiv(D, BLOCK_K)
    first = tl.program_id(0)
    programs = tl.num_programs(0)
    my_tiles = tl.cdiv(tiles - first, programs)
    acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for it in range(0, my_tiles * k_tiles):
        tile = first + (it // k_tiles) * programs
        row0 = (tile % row_tiles) * BLOCK_G
        c0 = c_lo + (tile // row_tiles) * BLOCK_C
        rows = row0 + tl.arange(0, BLOCK_G)
        k = it % k_tiles
        f, w = _operand_slices(
            F, W, row0, rows, rows < G, c0, c_hi, k, k_tiles, D, stride_f, stride_w, EVEN_K, BLOCK_C, BLOCK_K, TMA
        )
        acc = tl.dot(f, tl.trans(w), acc, input_precision=PRECISION)
        if k == k_tiles - 1:
            _store_probs(
                acc, row0, c0, F_SCALE, INV_NORM, OFFSET, LSE, GRAD_SCALE, P_SCALES, P, P_T,
                G, c_lo, c_hi, g_store, c_store, stride_p, stride_pt, scale,
                COSINE, HAS_OFFSET, FP8, EXACT_CAST, BLOCK_G, BLOCK_C, TMA,
            )  # fmt: skip
            acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)


@triton.jit
def _fix_targets(
    LOCAL_LABEL,
    TARGET,
    LSE,
    GRAD_SCALE,
    INV_NORM,
    F_SCALE,
    P_SCALES,
    P,
    P_T,
    G,
    c_lo,
    c_hi,
    stride_p,
    stride_pt,
    COSINE: tl.constexpr,
    FP8: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Each target entry of the chunk's P (and P^T), from its row's shifted target logit
    (TARGET) and log-sum-exp: g(p_y - 1) (times 1/||w_y|| for cosine logits), what P holds
    there for bf16 and fp32 rows; fp8 rows hold, as every other entry, the softmax part
    g p_y (over ||w_y||) for dF and all of P times the row's scale for dW. Rows whose label
    lies outside [c_lo, c_hi), and ignored rows (log-sum-exp +inf), are left alone. Stream
    order puts this after the P kernel's stores, so nothing races."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < G
    label = tl.load(LOCAL_LABEL + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    here = row_ok & (label >= c_lo) & (label < c_hi) & (lse < float("inf"))
    col = (label - c_lo).to(tl.int64)
    soft = tl.exp(tl.load(TARGET + rows, mask=here, other=0.0) - tl.where(here, lse, 0.0))
    grad_scale = tl.load(GRAD_SCALE)
    value = (soft - 1.0) * grad_scale
    if FP8:
        soft = soft * grad_scale
        if COSINE:
            soft = soft * tl.load(INV_NORM + label, mask=here, other=0.0)
        f_scale = tl.load(F_SCALE + rows, mask=here, other=0.0)
        tl.store(P + rows.to(tl.int64) * stride_p + col, to_e5m2(soft * tl.load(P_SCALES), EXACT_CAST), mask=here)
        for_weights = to_e5m2(value * (f_scale * tl.load(P_SCALES + 1)), EXACT_CAST)
        tl.store(P_T + col * stride_pt + rows, for_weights, mask=here)
    else:
        if COSINE:
            value = value * tl.load(INV_NORM + label, mask=here, other=0.0)
        tl.store(P + rows.to(tl.int64) * stride_p + col, value.to(P.dtype.element_ty), mask=here)


@triton.jit
def _transpose_kernel(X, OUT, num_rows, num_cols, out_width, stride_x, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[d, r] = X[r, d] for a num_rows x num_cols X, and zeros in OUT's columns
    [num_rows, out_width): one tile through shared memory, where an elementwise transposing
    copy of one-byte values runs at a few percent of the copy bandwidth."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile = tl.load(
        X + r[:, None].to(tl.int64) * stride_x + d[None, :],
        mask=(r < num_rows)[:, None] & (d < num_cols)[None, :],
        other=0,
    )
    out = OUT + d[None, :].to(tl.int64) * out_width + r[:, None]
    tl.store(out, tile, mask=(r < out_width)[:, None] & (d < num_cols)[None, :])


def _transposed_padded(rows: torch.Tensor, width: int) -> torch.Tensor:
    """rows^T (one-byte elements) as a dim x width contiguous tensor, zero past len(rows)."""
    num_rows, dim = rows.shape
    out = torch.empty(dim, width, dtype=rows.dtype, device=rows.device)
    block = 16 if INTERPRETED or not rows.is_cuda else 64
    grid = (triton.cdiv(width, block), triton.cdiv(dim, block))
    _transpose_kernel[grid](
        rows.view(torch.uint8),
        out.view(torch.uint8),
        num_rows,
        dim,
        width,
        rows.stride(0),
        BLOCK_R=block,
        BLOCK_D=block,
    )
    return out


# Measured (D = 512, C_r = 1M): the fp8 gemm path takes 7.2 and 8.9 ms at G = 256 and 512
# against the stationary kernels' 13.2 and 18.6 ms (one H200,
# benchmarks/results/head_kernels_fp8_small_g.json), and 7.3-8.5 ms against 14.3-14.6 at
# G = 32, 64 and 128 (one H100, head_kernels_fp8_below_256.json). Its extra memory stays
# within the chunk budget as G shrinks (0.69-0.80 GiB against 8-17 MiB); below 32 rows it
# is unmeasured, so those batches stay on the stationary kernels.
FP8_GEMM_MIN_ROWS = 32


def resolve_exact_kernels(
    choice: str, weight_dtype: torch.dtype, dim: int = 16, device_type: str = "cpu", num_rows: int | None = None
) -> str:
    """``head.exact_kernels`` with auto resolved: gemm for fp32 and bf16 rows; for fp8 rows
    gemm from ``FP8_GEMM_MIN_ROWS`` samples (``num_rows``, the global batch; None: large)
    where it fits, stationary below. Gemm with fp8 rows on a GPU needs a width that is a
    multiple of 16 (the FP8 library products do)."""
    if choice not in EXACT_KERNELS:
        raise ValueError(f"exact_kernels must be one of {EXACT_KERNELS}, got {choice!r}")
    gemm_fits = weight_dtype != FP8 or device_type != "cuda" or dim % 16 == 0
    if choice == "auto":
        if weight_dtype != FP8:
            return "gemm"
        large = num_rows is None or num_rows >= FP8_GEMM_MIN_ROWS
        return "gemm" if gemm_fits and large else "stationary"
    if choice == "gemm" and not gemm_fits:
        raise ValueError(f"exact_kernels='gemm' with fp8 rows needs a width that is a multiple of 16, got D={dim}")
    return choice


def chunk_classes(num_rows: int, dtype: torch.dtype, num_classes: int, dim: int = 0, cosine: bool = False) -> int:
    """Classes per chunk (a multiple of 256): the G x chunk P buffer, and the chunk x ``dim``
    dW_c beside it, each within HYDRAHEAD_EXACT_CHUNK_MIB. fp8 rows write P twice (for dF
    and, transposed, for dW), one byte each, and get dW_c back in bf16; ``cosine``: dW_c is
    projected apart, in float32 beside the unit rows (two float32 copies; with the update
    the pass projects it instead). (``dim`` 0: no dW_c.) Small
    batches are bound by dW_c: at G = 256 it would otherwise take twice P's bytes."""
    budget = int(float(os.environ.get("HYDRAHEAD_EXACT_CHUNK_MIB", _CHUNK_MIB)) * 2**20)
    fp8 = dtype == FP8
    element = dtype.itemsize
    grad_element = 8 if cosine else (2 if fp8 else element)
    per_class = max(max(1, num_rows) * (2 if fp8 else element), dim * grad_element, 1)
    return max(256, min(budget // per_class // 256 * 256, triton.cdiv(num_classes, 256) * 256))


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (bf16 operands stay bf16 on the GPU)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _scaled_matmul(a: torch.Tensor, b: torch.Tensor, inverse_scale: torch.Tensor) -> torch.Tensor:
    """(a @ b) * inverse_scale for fp8 ``a`` (row-major) and ``b`` (column-major): FP8 tensor
    cores with float32 accumulation and a bf16 result on the GPU (cuBLASLt takes no float32
    result for e5m2 x e4m3), the same values multiplied in float32 elsewhere."""
    if a.is_cuda:
        one = torch.ones((), device=a.device)
        return torch._scaled_mm(a, b, scale_a=inverse_scale.reshape(()), scale_b=one, out_dtype=torch.bfloat16)
    return torch.mm(a.float(), b.float()) * inverse_scale


def _target_rows(weight, inv_norm, local_label, lse, grad_scale, num_classes) -> torch.Tensor:
    """g w_y (cosine: g w_y / ||w_y||) for each row whose label is a class of this shard and
    whose loss counts, zero for the others: what the one-hot entries of P contribute to dF.
    A gather, exact in float32, with no reduction over rows."""
    here = (local_label >= 0) & (local_label < num_classes) & torch.isfinite(lse)
    index = torch.where(here, local_label, 0).long()
    rows = weight.view(torch.uint8).index_select(0, index).view(weight.dtype).float()  # any 1-byte dtype
    if inv_norm is not None:
        rows *= inv_norm.index_select(0, index)[:, None]
    return rows * (grad_scale.float() * here)[:, None]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _ProbsPass:
    """The launches of ``_probs_kernel`` over one backward's chunks (their shared arguments)."""

    def __init__(
        self, operand: FeatureOperand, weight, inv_norm, local_label, lse, grad_scale, options, offset=None, target=None
    ):
        check_offset_operand(offset, weight)
        self.operand, self.weight, self.local_label, self.lse = operand, weight, local_label, lse
        self.offset = offset
        self.inv_norm, self.grad_scale, self.options = inv_norm, grad_scale, options
        num_rows = operand.shape[0]
        self.padded_rows = _round_up(num_rows, 16) if operand.fp8 else num_rows
        self.tma = descriptor_loads(operand.values, weight)  # once per backward, not per chunk
        self.p_scales = None
        if operand.fp8:  # (for dF, for dW): powers of two, kept on the device, both in one set of ops
            row_max = operand.row_scale.max()
            largest_inv = inv_norm.max() if options["cosine"] and inv_norm.numel() else torch.ones_like(row_max)
            self.p_scales = operand_scale(torch.stack([largest_inv, row_max]) * grad_scale)
        if target is None:  # each row's shifted target logit (0 off this shard), for ``_fix_targets``
            here, logit = target_logits(
                operand.values,
                operand.row_scale if operand.fp8 else None,
                weight,
                inv_norm if options["cosine"] else None,
                local_label,
                options["scale"],
                offset,
            )
            target = torch.where(here, logit - options["target_shift"], 0.0)
        self.target = target.contiguous()

    def write(self, c_lo: int, c_hi: int, stored_width: int):
        """P over classes [c_lo, c_hi): a rows x stored_width tensor (fp8: e5m2, rows padded to 16
        with zeros, and its transpose beside it; padded columns zero)."""
        operand, weight, options = self.operand, self.weight, self.options
        feats = operand.values
        num_rows, dim = feats.shape
        tma = self.tma
        if operand.fp8:
            probs = torch.empty(self.padded_rows, stored_width, dtype=torch.float8_e5m2, device=feats.device)
            probs_t = torch.empty(stored_width, self.padded_rows, dtype=torch.float8_e5m2, device=feats.device)
        else:  # rows 16-byte aligned, so the chunk's last, odd width can be a descriptor too
            row_width = _round_up(stored_width, 16 // weight.element_size()) if tma else stored_width
            probs = torch.empty(num_rows, row_width, dtype=weight.dtype, device=feats.device)[:, :stored_width]
            probs_t = probs

        kernel = ("probs_fp8_tma" if operand.fp8 else "probs_tma") if tma else "probs"
        variant = (options["cosine"], operand.fp8, self.offset is not None)

        def launch(tiles):
            block_g, block_c, block_k, warps, stages = tiles
            num_tiles = triton.cdiv(self.padded_rows, block_g) * triton.cdiv(stored_width, block_c)
            key = (kernel, tiles, dim, weight.dtype, feats.device, variant)
            if key not in _PROGRAMS:  # compiled, not run: how many of its programs fit at once
                compiled = _probs_kernel.warmup(*args(tiles), grid=(1,), **meta(tiles)) if feats.is_cuda else None
                _PROGRAMS[key] = resident_programs(compiled, feats.device)
            _probs_kernel[(min(num_tiles, _PROGRAMS[key]),)](*args(tiles), **meta(tiles))

        def args(tiles):
            block_g, block_c, block_k, _, _ = tiles
            return (
                block_operand(feats, [block_g, block_k], tma),
                operand.row_scale if operand.fp8 else feats,
                block_operand(weight, [block_c, block_k], tma),
                self.inv_norm if options["cosine"] else weight,
                self.offset if self.offset is not None else weight,
                self.lse,
                self.grad_scale,
                self.p_scales if operand.fp8 else self.grad_scale,
                block_operand(probs, [block_g, block_c], tma),
                block_operand(probs_t, [block_c, block_g], tma and operand.fp8),
                num_rows,
                dim,
                c_lo,
                c_hi,
                self.padded_rows,
                c_lo + stored_width,
                feats.stride(0),
                weight.stride(0),
                probs.stride(0),
                probs_t.stride(0),
                options["scale"],
            )

        def meta(tiles):
            block_g, block_c, block_k, warps, stages = tiles
            return dict(
                COSINE=options["cosine"],
                HAS_OFFSET=self.offset is not None,
                FP8=operand.fp8,
                EXACT_CAST=INTERPRETED,
                PRECISION=_precision(weight.dtype),
                EVEN_K=dim % block_k == 0,
                BLOCK_G=block_g,
                BLOCK_C=block_c,
                BLOCK_K=block_k,
                TMA=tma,
                num_warps=warps,
                num_stages=stages,
            )

        flags = dict(fp8=operand.fp8, cosine=options["cosine"], offset=self.offset is not None, kind="probs")
        if tma and pingpong.applies(feats, weight, **flags):  # the exps beside the products
            inv_norm = self.inv_norm if options["cosine"] else None
            pingpong.write_probs(probs, feats, weight, self.lse, self.grad_scale, options["scale"], c_lo, inv_norm)
        else:
            launch_fitted(kernel, dim, weight.dtype, feats.device, launch, variant)
        block = 1024 if feats.is_cuda else 16
        _fix_targets[(triton.cdiv(num_rows, block),)](
            self.local_label,
            self.target,
            self.lse,
            self.grad_scale,
            self.inv_norm if options["cosine"] else self.target,
            operand.row_scale if operand.fp8 else self.target,
            self.p_scales if operand.fp8 else self.target,
            probs,
            probs_t,
            num_rows,
            c_lo,
            c_hi,
            probs.stride(0),
            probs_t.stride(0),
            COSINE=options["cosine"],
            FP8=operand.fp8,
            EXACT_CAST=INTERPRETED,
            BLOCK=block,
        )
        return probs, probs_t


def exact_backward(
    feats: torch.Tensor | FeatureOperand,
    weight: torch.Tensor,
    inv_norm: torch.Tensor | None,
    local_label: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    target_shift: float,
    cosine: bool,
    grad_scale: float | torch.Tensor,
    update: SGDUpdate | None,
    want_features: bool = True,
    want_weight: bool = True,
    logit_offset: torch.Tensor | None = None,
    target_logit: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dF, dW) of the exact loss from the merged log-sum-exp ``lse`` (+inf on ignored rows).

    dF is float32 (G x D, with respect to the unit features for cosine logits). With
    ``update`` the SGD step is applied to ``weight`` in place and dW is None; otherwise dW
    (in the weights' dtype; float32 for fp8 rows) when ``want_weight``. ``grad_scale``
    (incoming gradient over the valid labels, times the logit scale, as for
    ``shard_weight_backward``) may be a one-element device tensor: nothing here reads it on
    the host. ``feats``: the features in the weights' dtype, or their ``FeatureOperand``
    (fp8 rows: e4m3 features with row scales and their transpose). ``logit_offset`` (float32,
    one per class): the constants the forward's LSE pass added to each class's logits.
    ``target_logit``: the LSE pass's third output (each row's shifted target logit where its
    label is a class of this shard), which spares the backward its own gather of those rows.
    """
    operand = _as_operand(feats)
    feats = operand.values
    if operand.fp8 != (weight.dtype == FP8) or (not operand.fp8 and feats.dtype != weight.dtype):
        raise ValueError(f"features ({feats.dtype}) must come as the weights' operand ({weight.dtype})")
    check_update(weight, update, device_scalars=True)
    num_rows, dim = feats.shape
    num_classes = weight.shape[0]
    want_weight = want_weight or update is not None
    # bf16 and fp32 rows: dF starts as the first chunk's product, with no zero fill before it
    first_product = want_features and not operand.fp8 and num_classes > 0 and num_rows > 0
    grad_feat = None
    if want_features and not first_product:
        grad_feat = torch.zeros(num_rows, dim, dtype=torch.float32, device=feats.device)
    grad_weight = None
    if want_weight and update is None:
        grad_weight = torch.empty_like(weight, dtype=torch.float32 if operand.fp8 else weight.dtype)
    if num_classes == 0 or num_rows == 0 or not (want_features or want_weight):
        return grad_feat, grad_weight
    grad_scale = _device_scalar(grad_scale, feats.device)
    probs_pass = _ProbsPass(
        operand,
        weight,
        inv_norm,
        local_label,
        lse,
        grad_scale,
        dict(scale=scale, target_shift=target_shift, cosine=cosine),
        logit_offset,
        target_logit,
    )
    # with the update, the cosine projection runs inside the update pass: no float32 chunk copies
    project_apart = cosine and update is None
    chunk = chunk_classes(num_rows, weight.dtype, num_classes, dim if want_weight else 0, project_apart)
    plan = rounding_plan(weight, update) if update is not None else None  # once: the chunks share it
    fused = FUSED_DW_UPDATE and update is not None and num_rows > 0
    fused_lr = fused_skip = None  # the lr and the verdict on the device, made once for the fused chunks
    for c_lo in range(0, num_classes, chunk):
        c_hi = min(num_classes, c_lo + chunk)
        rows = weight[c_lo:c_hi]
        width = c_hi - c_lo
        if operand.fp8:
            stored = _round_up(width, 16)
            probs, probs_t = probs_pass.write(c_lo, c_hi, stored)
            if c_lo == 0:  # after the first P launch, so the GPU runs it while the host queues these
                # F as the dW product's column-major operand, rows padded to 16
                feats_t = torch.zeros(dim, probs_pass.padded_rows, dtype=FP8, device=feats.device)
                feats_t[:, :num_rows] = operand.transposed
                # One allocation each: a scale pointer 4 bytes into a tensor is a candidate cause of
                # the CUBLAS_STATUS_NOT_SUPPORTED seen for the second product (not yet rerun on a GPU).
                inverse_scales = [scale.reciprocal().reshape(()).clone() for scale in probs_pass.p_scales]
                if grad_feat is not None:  # the one-hot part of dF, left out of the fp8 P
                    target_rows = _target_rows(
                        weight, inv_norm if cosine else None, local_label, lse, grad_scale, num_classes
                    )
                    grad_feat -= target_rows
            if grad_feat is not None:  # W_c as the column-major operand: a transposed copy, padded
                rows_t = _transposed_padded(rows, stored)
                grad_feat += _scaled_matmul(probs, rows_t.t(), inverse_scales[0])[:num_rows]
            if not want_weight:
                continue
            # bf16, as the product returns it: the update reads it in float32 (an exact widening)
            chunk_grad = _scaled_matmul(probs_t, feats_t.t(), inverse_scales[1])[:width]
            if project_apart:
                chunk_grad = chunk_grad.float() * inv_norm[c_lo:c_hi, None]
        else:
            probs, _ = probs_pass.write(c_lo, c_hi, width)
            fused_here = fused and not cosine and dw_update.fused_update_applies(probs, feats, rows, update)
            # at small batches the fused kernel also takes dF's product, from the rows it loads anyway
            kernel_df = fused_here and want_features and dw_update.takes_features_grad(num_rows)
            if want_features and not kernel_df:  # before the update moves these rows
                product = matmul_fp32(probs, rows)
                grad_feat = product if grad_feat is None else grad_feat.add_(product)
            if not want_weight:
                continue
            if fused_here:
                if fused_lr is None:
                    fused_lr = _device_scalar(update.lr, feats.device, "lr")
                    fused_skip = update.skip  # none given (a caller's own update): the step lands
                    if fused_skip is None:
                        fused_skip = torch.zeros((), dtype=torch.int32, device=feats.device)
                product = dw_update.fused_dw_update(
                    probs,
                    feats,
                    rows,
                    update.momentum_buffer[c_lo:c_hi],
                    lr=fused_lr,
                    momentum=update.momentum,
                    weight_decay=update.weight_decay,
                    features_grad=kernel_df,
                    skip=fused_skip,
                )
                if kernel_df:
                    grad_feat = product if grad_feat is None else grad_feat.add_(product)
                continue
            # dW_c in the rows' dtype: the update adds it in float32; its rounding to bf16 is
            # far below the stored rows' own, and halves the bytes the update pass reads.
            chunk_grad = torch.mm(probs.t(), feats)
        if project_apart:  # through the row normalisation: P already carries 1 / ||w_c||
            # in place, so the chunk holds two float32 copies (dW_c and the unit rows) at most
            unit = rows.to(torch.float32, copy=True).mul_(inv_norm[c_lo:c_hi, None])
            chunk_grad = chunk_grad.float()
            chunk_grad.addcmul_(unit, torch.einsum("cd,cd->c", unit, chunk_grad)[:, None], value=-1.0)
        if update is not None:  # cosine: projected inside the pass (fp8's dW_c without 1 / ||w_c|| yet)
            norms = inv_norm[c_lo:c_hi] if cosine else None
            apply_sgd_rows(weight, chunk_grad, update, c_lo, norms, grad_scaled=not operand.fp8, plan=plan)
        else:
            grad_weight[c_lo:c_hi] = chunk_grad
    return grad_feat, grad_weight


__all__ = [
    "EXACT_KERNELS",
    "FP8_GEMM_MIN_ROWS",
    "chunk_classes",
    "exact_backward",
    "matmul_fp32",
    "resolve_exact_kernels",
]
