"""Fused Triton kernels for one shard of the softmax cross-entropy, with the head's SGD update.

Two kernels, 8·G·D·C_r FLOPs in all (the floor when logits are never stored):

forward (sample-stationary, like flash attention; grid = sample blocks x class splits)
    per sample: running max m, sum of exp l, target logit, and A = sum_c exp(z_c - m) w_c.
    Logits live only in registers. After the cross-shard LSE merge (torch collectives),
    the feature gradient is immediate: dF = s/n (exp(m - lse) A - w_target), so the
    backward never touches dF again. 4·G·D·C_r FLOPs (logits, then p @ W).

weight backward + update (weight-stationary; grid = class blocks)
    each program owns BLOCK_C whole rows of W, loops over all samples, recomputes the
    logits, forms P = softmax - onehot and accumulates its rows of dW in registers, then
    applies torch.optim.SGD's step to those rows in place (weight decay added to the
    gradient, momentum buffer, no dampening, no Nesterov). No C_r x D gradient exists.
    A second mode writes dW instead (tests, and users with their own optimizer).
    4·G·D·C_r FLOPs (logits again, then P^T @ F).

Row offsets are 64-bit, so shards past 2^31 elements (25M x 512) index correctly.
Cosine logits (CosFace) normalise the weight rows inside the kernels from per-class
inverse norms computed once per call; ArcFace stays on the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hydrahead.kernels.rounding import INTERPRETED, onto_grid, rounding_plan, sgd_store, to_e5m2
from hydrahead.kernels.tiles import launch_fitted, tile_config


@dataclass
class SGDUpdate:
    """The head's SGD step, applied inside the backward (torch.optim.SGD semantics).

    ``lr`` and ``step`` may be one-element tensors on the weights' device (float32 and int64):
    the gemm and filtered paths' update pass then reads them there, so a step captured in a
    CUDA graph follows a schedule that changes them in place between replays (stochastic
    rounding draws fresh keys from the step each replay). The stationary kernels take
    Python numbers only.

    ``skip``: a one-element int32 tensor on the weights' device that the gemm and filtered
    paths' update reads there: where it holds a nonzero value, the rows, their buffer and
    compensation stay as they were. The fused loss sets it to its own verdict (a loss or a
    row's log-sum-exp that is not finite, or merge checks that fail: ``row_ops.loss_rows``),
    so its in-place step never lands on a bad loss, and a caller may leave the judging to
    its step's one read; a caller does not set it."""

    lr: float | torch.Tensor
    momentum: float = 0.0
    weight_decay: float = 0.0
    momentum_buffer: torch.Tensor | None = None  # like the weight (fp32 or bf16); needed when momentum > 0
    # How the new weights are written back (low-precision storage, hydrahead.optim.low_precision):
    rounding: str = "nearest"  # or "stochastic": draws keyed by (seed, step, salt, global class id, dim)
    seed: int = 0
    step: int | torch.Tensor = 0
    salt: int = 0
    class_ids: torch.Tensor | int = 0  # the rows' global class ids, or the first row's (then consecutive)
    compensation: torch.Tensor | None = None  # Kahan buffer shaped like the weight (bf16 or e5m2), updated in place
    skip: torch.Tensor | None = None  # the loss's verdict on the device: nonzero, the step does not land


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


# Sizes and keys that change from step to step (active rows, list lengths, rounding keys)
# are not specialised on: Triton would otherwise compile a new variant, mid-training,
# whenever one of them first turns up as a multiple of 16 or as 1.
@triton.jit(do_not_specialize=["C", "classes_per_split"])
def _forward_kernel(
    F,
    F_SCALE,
    W,
    INV_NORM,
    LOCAL_LABEL,
    M_OUT,
    L_OUT,
    T_OUT,
    A_OUT,
    G,
    C,
    D,
    stride_f,
    stride_w,
    classes_per_split,
    scale,
    target_shift,
    COSINE: tl.constexpr,
    FP8: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_g = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < G
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    f = tl.load(
        F + rows[:, None].to(tl.int64) * stride_f + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
    )
    label = tl.load(LOCAL_LABEL + rows, mask=row_ok, other=-1)
    if FP8:  # f holds e4m3 rows, each to be multiplied by its scale
        f_scale = tl.load(F_SCALE + rows, mask=row_ok, other=0.0)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    t = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    c_lo = split * classes_per_split
    c_hi = tl.minimum(c_lo + classes_per_split, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < c_hi
        w = tl.load(
            W + cols[:, None].to(tl.int64) * stride_w + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
        )
        z = tl.dot(f, tl.trans(w), input_precision=PRECISION)
        if FP8:
            z = z * f_scale[:, None]
        if COSINE:
            inv = tl.load(INV_NORM + cols, mask=col_ok, other=0.0)
            z = z * inv[None, :]
        z = z * scale
        is_target = label[:, None] == cols[None, :]
        z = tl.where(is_target, z - target_shift, z)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        t += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if COSINE:
            p = p * inv[None, :]  # sum_c p_c w_c / ||w_c||
        if FP8:
            # A in bf16: FP8 tensor cores take K-major operands only, and an fp8 W tile is
            # D-major here (Triton's transposing path measured 3.7x slower than this one).
            if EXACT_CAST:  # the interpreter's bf16 is unreliable: bf16-rounded values in float32, same products
                p16 = onto_grid(p, 0, 0, 0, 0, False, True, 7, -126, 3.3895313892515355e38)
                acc = acc * alpha[:, None] + tl.dot(p16, w.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), w.to(tl.bfloat16))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(w.dtype), w, input_precision=PRECISION)
        m = m_new

    out = split * G + rows
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(L_OUT + out, l, mask=row_ok)
    tl.store(T_OUT + out, t, mask=row_ok)
    tl.store(A_OUT + out[:, None].to(tl.int64) * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _probs_minus_onehot(
    z,
    rows,
    row_ok,
    cols,
    col_ok,
    inv,
    F_SCALE,
    LSE,
    LOCAL_LABEL,
    scale,
    target_shift,
    COSINE: tl.constexpr,
    FP8: tl.constexpr,
):
    """softmax - onehot of the raw products ``z`` (rows x cols), 0 outside the shard's rows
    and classes; with the rows' fp8 scales (ones for other dtypes), which P^T F reuses."""
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))  # +inf: ignored rows get p = 0
    label = tl.load(LOCAL_LABEL + rows, mask=row_ok, other=-1)
    f_scale = tl.full(rows.shape, 1.0, tl.float32)
    if FP8:
        f_scale = tl.load(F_SCALE + rows, mask=row_ok, other=0.0)
        z = z * f_scale[:, None]
    if COSINE:
        z = z * inv[None, :]
    z = z * scale
    is_target = label[:, None] == cols[None, :]
    z = tl.where(is_target, z - target_shift, z)
    p = tl.exp(z - lse[:, None])
    p = tl.where(is_target, p - 1.0, p)
    return tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0), f_scale


@triton.jit(do_not_specialize=["C", "first_class", "key1", "key2"])
def _weight_kernel(
    F,
    FT,
    F_SCALE,
    P_SCALE,
    W,
    INV_NORM,
    LOCAL_LABEL,
    LSE,
    BUF,
    DW,
    COMP,
    CLASS_IDS,
    GRAD_SCALE,
    G,
    C,
    D,
    stride_f,
    stride_ft,
    stride_w,
    scale,
    target_shift,
    lr,
    momentum,
    weight_decay,
    first_class,
    key1,
    key2,
    COSINE: tl.constexpr,
    UPDATE: tl.constexpr,
    HAS_BUF: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    HAS_COMP: tl.constexpr,
    HAS_IDS: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    COMP_MANT_BITS: tl.constexpr,
    COMP_MIN_EXP: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    tile = cols[:, None].to(tl.int64) * stride_w + dims[None, :]
    tile_ok = col_ok[:, None] & dim_ok[None, :]
    w = tl.load(W + tile, mask=tile_ok, other=0.0)
    inv = tl.zeros([BLOCK_C], tl.float32)
    if COSINE:
        inv = tl.load(INV_NORM + cols, mask=col_ok, other=0.0)
    if FP8:
        p_scale = tl.load(P_SCALE)

    grad = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        row_ok = rows < G
        f = tl.load(
            F + rows[:, None].to(tl.int64) * stride_f + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
        )
        z = tl.dot(f, tl.trans(w), input_precision=PRECISION)
        p, f_scale = _probs_minus_onehot(
            z, rows, row_ok, cols, col_ok, inv, F_SCALE, LSE, LOCAL_LABEL, scale, target_shift, COSINE, FP8
        )
        if FP8:
            # P^T F with F's row scales folded into P (they sit on the summed axis), P in e5m2;
            # F^T's tile is K-major, as FP8 tensor cores want their operands.
            ft = tl.load(
                FT + dims[:, None].to(tl.int64) * stride_ft + rows[None, :],
                mask=dim_ok[:, None] & row_ok[None, :],
                other=0.0,
            )
            p8 = to_e5m2(p * (f_scale * p_scale)[:, None], EXACT_CAST)
            grad = tl.dot(tl.trans(p8), tl.trans(ft), grad)
        else:
            grad += tl.dot(tl.trans(p.to(f.dtype)), f, input_precision=PRECISION)

    if FP8:
        grad = grad / p_scale
    grad = grad * tl.load(GRAD_SCALE).to(tl.float32)  # d loss / d (w, or w / ||w|| for cosine logits)
    w32 = w.to(tl.float32)
    if COSINE:
        w_unit = w32 * inv[:, None]
        radial = tl.sum(w_unit * grad, axis=1)
        grad = (grad - w_unit * radial[:, None]) * inv[:, None]
    if UPDATE:
        if HAS_IDS:
            ids = tl.load(CLASS_IDS + cols, mask=col_ok, other=0)
        else:
            ids = first_class + cols
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
    else:
        tl.store(DW + tile, grad.to(DW.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["C", "first_class", "key1", "key2"])
def _weight_sliced_kernel(
    F,
    FT,
    F_SCALE,
    P_SCALE,
    W,
    INV_NORM,
    LOCAL_LABEL,
    LSE,
    BUF,
    COMP,
    CLASS_IDS,
    GRAD_SCALE,
    G,
    C,
    D,
    stride_f,
    stride_ft,
    stride_w,
    scale,
    target_shift,
    lr,
    momentum,
    weight_decay,
    first_class,
    key1,
    key2,
    COSINE: tl.constexpr,
    HAS_BUF: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    HAS_COMP: tl.constexpr,
    HAS_IDS: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    COMP_MANT_BITS: tl.constexpr,
    COMP_MIN_EXP: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The weight kernel for a batch that fits one tile (G <= BLOCK_G): the logits of BLOCK_C
    classes against every sample, summed over D in BLOCK_K slices; then, slice by slice of
    D, that slice of dW = P^T F and the update of the same slice. No register holds a whole
    row, so blocks of 64 classes fit without spilling, and each block reads F (from L2)
    twice where the row-holding kernel reads it once per sample block."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < G
    w_rows = W + cols[:, None].to(tl.int64) * stride_w
    inv = tl.zeros([BLOCK_C], tl.float32)
    if COSINE:
        inv = tl.load(INV_NORM + cols, mask=col_ok, other=0.0)

    z = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        f = tl.load(F + rows[:, None] * stride_f + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.dot(f, tl.trans(w), z, input_precision=PRECISION)
    p, f_scale = _probs_minus_onehot(
        z, rows, row_ok, cols, col_ok, inv, F_SCALE, LSE, LOCAL_LABEL, scale, target_shift, COSINE, FP8
    )
    grad_scale = tl.load(GRAD_SCALE).to(tl.float32)
    if FP8:
        # F's row scales folded into P (they sit on the summed axis), P in e5m2, F^T's slices
        # K-major, as FP8 tensor cores want their operands
        p_scale = tl.load(P_SCALE)
        p_op = tl.trans(to_e5m2(p * (f_scale * p_scale)[:, None], EXACT_CAST))
        grad_scale = grad_scale / p_scale
    else:
        p_op = tl.trans(p.to(F.dtype.element_ty))
    if HAS_IDS:
        ids = tl.load(CLASS_IDS + cols, mask=col_ok, other=0)
    else:
        ids = first_class + cols

    radial = tl.zeros([BLOCK_C], tl.float32)
    if COSINE:  # the projection needs whole rows of dW . w first: one more pass of products
        for d0 in range(0, D, BLOCK_K):
            ds = d0 + tl.arange(0, BLOCK_K)
            grad = _grad_slice(F, FT, p_op, rows, row_ok, ds, D, stride_f, stride_ft, PRECISION, FP8)
            w32 = tl.load(w_rows + ds[None, :], mask=col_ok[:, None] & (ds < D)[None, :], other=0.0).to(tl.float32)
            radial += tl.sum(w32 * grad, axis=1)
        radial = radial * grad_scale * inv * inv  # (w / ||w||) . dW, over ||w||
    # Not pipelined: the update's loads staged through shared memory (2 or 3 stages) left room
    # for one program an SM, not two, and measured 30-50% slower (docs/kernels.md).
    for d0 in tl.range(0, D, BLOCK_K, num_stages=1):
        ds = d0 + tl.arange(0, BLOCK_K)
        tile_ok = col_ok[:, None] & (ds < D)[None, :]
        grad = _grad_slice(F, FT, p_op, rows, row_ok, ds, D, stride_f, stride_ft, PRECISION, FP8) * grad_scale
        w32 = tl.load(w_rows + ds[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        if COSINE:
            grad = (grad - w32 * radial[:, None]) * inv[:, None]
        sgd_store(
            W,
            BUF,
            COMP,
            cols[:, None].to(tl.int64) * stride_w + ds[None, :],
            tile_ok,
            w32,
            grad,
            ids,
            ds,
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


@triton.jit
def _grad_slice(F, FT, p_op, rows, row_ok, ds, D, stride_f, stride_ft, PRECISION: tl.constexpr, FP8: tl.constexpr):
    """Columns ``ds`` of P^T F (``p_op`` = P^T as the products take it), float32."""
    d_ok = ds < D
    if FP8:
        ft = tl.load(
            FT + ds[:, None].to(tl.int64) * stride_ft + rows[None, :], mask=d_ok[:, None] & row_ok[None, :], other=0.0
        )
        return tl.dot(p_op, tl.trans(ft))
    f = tl.load(F + rows[:, None] * stride_f + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return tl.dot(p_op, f, input_precision=PRECISION)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _block_d(dim: int) -> int:
    """The exact kernels hold whole rows: D rounded up to a power of two (tl.dot's sides are >= 16)."""
    return max(16, triton.next_power_of_2(dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands would otherwise run as tf32 on the tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_programs_target(device: torch.device) -> int:
    """One resident program per SM: the tiles leave room for just one, so more only adds waves."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


FP8 = torch.float8_e4m3fn
_E5M2_TOP = 15  # operands of the softmax side are scaled so their largest magnitude is at most 2^15 (e5m2 max 57,344)


@dataclass
class FeatureOperand:
    """The features as the kernels read them: in the weights' dtype, or, next to fp8 weights,
    e4m3 rows with one float32 scale each (f = row_scale * values) and the transposed copy
    that the weight kernel's FP8 P^T F reads (FP8 tensor cores take K-major operands only)."""

    values: torch.Tensor
    row_scale: torch.Tensor | None = None
    transposed: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.row_scale is not None

    @property
    def shape(self) -> torch.Size:
        return self.values.shape


def feature_operand(features: torch.Tensor, weight_dtype: torch.dtype) -> FeatureOperand:
    """``features`` prepared for weights of ``weight_dtype`` (e4m3 rows scaled to reach 448)."""
    if weight_dtype != FP8:
        return FeatureOperand(features.to(weight_dtype).contiguous())
    amax = features.detach().abs().amax(dim=1).float()
    row_scale = torch.where(amax > 0, amax / 448.0, 1.0).contiguous()
    values = (features.float() / row_scale[:, None]).to(FP8).contiguous()
    return FeatureOperand(values, row_scale, values.t().contiguous())


def operand_scale(largest: torch.Tensor) -> torch.Tensor:
    """The power of two that brings magnitudes up to ``largest`` to at most 2^15, one for each
    value of ``largest`` (a 1-D device tensor: no host sync). The weight kernel's P =
    softmax - onehot, times the features' row scales, becomes e5m2 this way: |P| <= 1 lands
    at most at 2^15 (e5m2's largest is 57,344), and probabilities down to 2^-29 stay normal,
    below any entry of a 100M-class softmax that carries weight."""
    return torch.exp2(_E5M2_TOP - torch.ceil(torch.log2(largest.float().clamp_min(2.0**-100)))).reshape(-1)


def _as_operand(feat_op) -> FeatureOperand:
    return feat_op if isinstance(feat_op, FeatureOperand) else FeatureOperand(feat_op)


def forward_splits(
    num_rows: int, num_classes: int, device: torch.device, tiles: tuple | None = None
) -> tuple[int, int]:
    """(splits, classes per split) of the forward: enough programs to fill the device
    (``tiles``: the forward's; its preferred ones by default)."""
    block_g, block_c, _, _ = tiles or tile_config("forward", device)
    row_blocks = triton.cdiv(num_rows, block_g)
    splits = max(1, min(triton.cdiv(num_classes, block_c), _num_programs_target(device) // row_blocks))
    per_split = triton.cdiv(triton.cdiv(num_classes, splits), block_c) * block_c
    return triton.cdiv(num_classes, per_split), per_split


def shard_forward(feat_op, weight, inv_norm, local_label, *, scale: float, target_shift: float, cosine: bool):
    """Local (max, sum of exp, target logit, A = sum exp(z - max) w) per sample over this shard.

    Classes are split across programs so that small batches still fill the GPU; the
    splits are merged here with the same log-sum-exp algebra the ranks use.
    ``feat_op``: a tensor in the weights' dtype, or a ``FeatureOperand`` (fp8 weights).
    """
    operand = _as_operand(feat_op)
    feats = operand.values
    num_rows, dim = feats.shape
    num_classes = weight.shape[0]

    def launch(tiles):
        block_g, block_c, warps, stages = tiles
        splits, per_split = forward_splits(num_rows, num_classes, feats.device, tiles)
        stats = torch.empty((3, splits, num_rows), dtype=torch.float32, device=feats.device)
        partial = torch.empty((splits, num_rows, dim), dtype=torch.float32, device=feats.device)
        _forward_kernel[(triton.cdiv(num_rows, block_g), splits)](
            feats,
            operand.row_scale if operand.fp8 else feats,
            weight,
            inv_norm if cosine else weight,
            local_label,
            stats[0],
            stats[1],
            stats[2],
            partial,
            num_rows,
            num_classes,
            dim,
            feats.stride(0),
            weight.stride(0),
            per_split,
            scale,
            target_shift,
            COSINE=cosine,
            FP8=operand.fp8,
            PRECISION=_precision(weight.dtype),
            EXACT_CAST=INTERPRETED,
            BLOCK_G=block_g,
            BLOCK_C=block_c,
            BLOCK_D=_block_d(dim),
            num_warps=warps,
            num_stages=stages,
        )
        return splits, stats, partial

    splits, stats, partial = launch_fitted("forward", dim, weight.dtype, feats.device, launch, (cosine, operand.fp8))
    split_max, split_sum, split_target = stats
    if splits == 1:
        return split_max[0], split_sum[0], split_target[0], partial[0]
    row_max = split_max.amax(dim=0)
    rescale = torch.exp(split_max - row_max)  # 0 for empty splits (max = -inf)
    accumulated = torch.mul(partial[0], rescale[0, :, None])  # one G x D buffer; the partials are freed on return
    for split in range(1, splits):
        accumulated.addcmul_(partial[split], rescale[split, :, None])
    return row_max, (split_sum * rescale).sum(dim=0), split_target.sum(dim=0), accumulated


def check_update(weight: torch.Tensor, update: SGDUpdate | None, *, device_scalars: bool = False) -> tuple[bool, bool]:
    """(has a momentum buffer, names its rows by listed class ids) for ``update`` on ``weight``;
    a ValueError for buffers or ids that do not match the rows, and for an lr or step held in
    a tensor (or a skip flag) where the kernel takes numbers (``device_scalars`` False) or of
    the wrong kind."""
    if update is None:
        return False, False
    for name, dtype in (("lr", torch.float32), ("step", torch.int64)):
        value = getattr(update, name)
        if not isinstance(value, torch.Tensor):
            continue
        if not device_scalars:
            raise ValueError(
                f"SGDUpdate.{name} in a tensor is read on the device by the gemm and filtered paths' update "
                "pass only; the stationary kernels take a number (exact_kernels='gemm'; 'auto' "
                "picks them for fp8 rows and a small global batch: exact_gemm.FP8_GEMM_MIN_ROWS)"
            )
        if value.numel() != 1 or value.dtype != dtype or value.device != weight.device:
            raise ValueError(
                f"SGDUpdate.{name} as a tensor must hold one {dtype} value on the weights' device "
                f"({weight.device}), got {tuple(value.shape)} {value.dtype} on {value.device}"
            )
    if update.skip is not None:
        if not device_scalars:
            raise ValueError(
                "SGDUpdate.skip is read on the device by the gemm and filtered paths' update pass only; "
                "the stationary kernels cannot hold a step back"
            )
        skip = update.skip
        if not isinstance(skip, torch.Tensor):
            raise ValueError(f"SGDUpdate.skip must be one int32 value on the weights' device, got {skip!r}")
        if skip.numel() != 1 or skip.dtype != torch.int32 or skip.device != weight.device:
            raise ValueError(
                f"SGDUpdate.skip must be one int32 value on the weights' device ({weight.device}), got "
                f"{tuple(skip.shape)} {skip.dtype} on {skip.device}"
            )
    has_buf = update.momentum != 0
    if has_buf and (update.momentum_buffer is None or update.momentum_buffer.shape != weight.shape):
        raise ValueError("SGDUpdate with momentum needs a momentum_buffer shaped like the weight shard")
    if has_buf and update.momentum_buffer.stride() != weight.stride():
        raise ValueError("momentum_buffer must have the weight shard's layout")
    compensation = update.compensation
    if compensation is not None and (compensation.shape != weight.shape or compensation.stride() != weight.stride()):
        raise ValueError("the Kahan compensation buffer must have the weight shard's shape and layout")
    has_ids = isinstance(update.class_ids, torch.Tensor)
    if has_ids and update.class_ids.shape != (weight.shape[0],):
        raise ValueError(
            f"SGDUpdate.class_ids must hold one id per weight row ({weight.shape[0]}), "
            f"got {tuple(update.class_ids.shape)}"
        )
    return has_buf, has_ids


def shard_weight_backward(
    feat_op,
    weight,
    inv_norm,
    local_label,
    lse,
    *,
    scale: float,
    target_shift: float,
    cosine: bool,
    grad_scale: float | torch.Tensor,
    update: SGDUpdate | None,
) -> torch.Tensor | None:
    """Recompute P tile by tile and either apply ``update`` to ``weight`` in place or return dW
    (float32 for fp8 weights). ``grad_scale`` may be a one-element device tensor: the kernel
    reads it from memory, so the host need not wait for the value."""
    operand = _as_operand(feat_op)
    feats = operand.values
    num_rows, dim = feats.shape
    num_classes = weight.shape[0]
    has_buf, has_ids = check_update(weight, update)
    compensation = update.compensation if update is not None else None
    class_ids = update.class_ids if update is not None else 0
    plan = rounding_plan(weight, update)
    grad_weight = None
    if update is None:
        grad_weight = torch.empty_like(weight, dtype=torch.float32 if weight.dtype == FP8 else weight.dtype)
    p_scale = operand_scale(operand.row_scale.max()) if operand.fp8 else None

    if update is not None and num_rows <= SLICED_MAX_ROWS:
        options = dict(scale=scale, target_shift=target_shift, cosine=cosine, grad_scale=grad_scale)
        _launch_sliced(operand, weight, inv_norm, local_label, lse, update, plan, p_scale, **options)
        return None

    def launch(tiles):
        block_g, block_c, warps, stages = tiles
        _weight_kernel[(triton.cdiv(num_classes, block_c),)](
            feats,
            operand.transposed if operand.fp8 else feats,
            operand.row_scale if operand.fp8 else feats,
            p_scale if operand.fp8 else feats,
            weight,
            inv_norm if cosine else weight,
            local_label,
            lse,
            update.momentum_buffer if has_buf else weight,
            grad_weight if grad_weight is not None else weight,
            compensation if compensation is not None else weight,
            class_ids.long() if has_ids else local_label,
            _device_scalar(grad_scale, feats.device),
            num_rows,
            num_classes,
            dim,
            feats.stride(0),
            num_rows,
            weight.stride(0),
            scale,
            target_shift,
            update.lr if update else 0.0,
            update.momentum if update else 0.0,
            update.weight_decay if update else 0.0,
            0 if has_ids else int(class_ids),
            plan.key1,
            plan.key2,
            COSINE=cosine,
            UPDATE=update is not None,
            HAS_BUF=has_buf,
            PRECISION=_precision(weight.dtype),
            FP8=operand.fp8,
            HAS_COMP=compensation is not None,
            HAS_IDS=has_ids,
            **plan.constants,
            BLOCK_G=block_g,
            BLOCK_C=block_c,
            BLOCK_D=_block_d(dim),
            num_warps=warps,
            num_stages=stages,
        )

    launch_fitted(
        "weight_fp8" if operand.fp8 else "weight",
        dim,
        weight.dtype,
        feats.device,
        launch,
        (cosine, update is not None, has_buf, compensation is not None, has_ids),
    )
    return grad_weight


# The sliced weight kernel holds P for the whole batch: 256 rows x 64 classes of float32
# logits is 64 registers a thread at 8 warps.
SLICED_MAX_ROWS = 256


def sliced_block_g(num_rows: int, fp8: bool) -> int:
    """The sliced weight kernel's batch block: the whole batch, a power of two, and at least the
    K that wgmma takes (16 for bf16, 32 for fp8), since dW's product sums over the batch."""
    return max(32 if fp8 else 16, triton.next_power_of_2(num_rows))


def _launch_sliced(
    operand, weight, inv_norm, local_label, lse, update, plan, p_scale, *, scale, target_shift, cosine, grad_scale
):
    """``shard_weight_backward``'s update through ``_weight_sliced_kernel`` (a batch of at most
    SLICED_MAX_ROWS rows), with the rounding plan and fp8 P scale it has made (and checked)."""
    feats = operand.values
    num_rows, dim = feats.shape
    num_classes = weight.shape[0]
    has_buf = update.momentum != 0
    has_ids = isinstance(update.class_ids, torch.Tensor)
    compensation = update.compensation

    def launch(tiles):
        block_c, block_k, warps, stages = tiles
        _weight_sliced_kernel[(triton.cdiv(num_classes, block_c),)](
            feats,
            operand.transposed if operand.fp8 else feats,
            operand.row_scale if operand.fp8 else feats,
            p_scale if operand.fp8 else feats,
            weight,
            inv_norm if cosine else weight,
            local_label,
            lse,
            update.momentum_buffer if has_buf else weight,
            compensation if compensation is not None else weight,
            update.class_ids.long() if has_ids else local_label,
            _device_scalar(grad_scale, feats.device),
            num_rows,
            num_classes,
            dim,
            feats.stride(0),
            num_rows,
            weight.stride(0),
            scale,
            target_shift,
            update.lr,
            update.momentum,
            update.weight_decay,
            0 if has_ids else int(update.class_ids),
            plan.key1,
            plan.key2,
            COSINE=cosine,
            HAS_BUF=has_buf,
            PRECISION=_precision(weight.dtype),
            FP8=operand.fp8,
            HAS_COMP=compensation is not None,
            HAS_IDS=has_ids,
            **plan.constants,
            BLOCK_G=sliced_block_g(num_rows, operand.fp8),
            BLOCK_C=block_c,
            BLOCK_K=min(block_k, _block_d(dim)),
            num_warps=warps,
            num_stages=stages,
        )

    launch_fitted(
        "weight_sliced",
        dim,
        weight.dtype,
        feats.device,
        launch,
        (cosine, has_buf, compensation is not None, has_ids, operand.fp8),
    )


def _device_scalar(value: float | torch.Tensor, device: torch.device, name: str = "grad_scale") -> torch.Tensor:
    """A one-element float32 tensor on ``device``: a fill for a Python number, no host read for a tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
        return value.detach().reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(value), dtype=torch.float32, device=device)


def inverse_row_norms(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """1 / max(||w_c||, eps) per class, in fp32 (as F.normalize divides)."""
    if weight.dtype == FP8:  # no float8 promotion in torch: upcast in row blocks
        return torch.cat([inverse_row_norms(block.float(), eps) for block in weight.split(1 << 16)])
    return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).clamp_min(eps).reciprocal()


def target_shift_for(margin_type: str, scale: float, margin: float) -> float:
    """How much the target logit is lowered: s*m for CosFace, nothing otherwise."""
    return scale * margin if margin_type == "cosface" else 0.0


__all__ = [
    "FeatureOperand",
    "SGDUpdate",
    "check_update",
    "feature_operand",
    "inverse_row_norms",
    "operand_scale",
    "shard_forward",
    "shard_weight_backward",
    "target_shift_for",
]
