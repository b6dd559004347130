"""The exact head step's backward as one Triton pass that writes P, then two library GEMMs.

The stationary kernels (``shard_ce``) hold a block x D fp32 accumulator in registers, which
limits them to 32- and 64-row blocks and leaves them bound by L2 traffic at 3x their
arithmetic floor. This path keeps every matrix product a plain GEMM instead:

forward   ``filtered.shard_lse``: per sample (max, sum of exp, target) over the shard,
          2·G·D·C_r FLOPs on GEMM-shaped tiles (no D-wide accumulator).
backward  class chunk by class chunk (a G x chunk buffer, ``chunk_bytes`` at most):
          ``_probs_kernel`` recomputes the chunk's logits and writes
          P = g·(softmax - onehot) (g = the logit scale times the incoming gradient over
          the valid labels; times 1/||w_c|| for cosine logits) in the weights' dtype;
          dF += P W_c runs on cuBLAS (fp32 accumulation and output); ``_update_kernel``
          computes dW_c = P^T F tile by tile and applies torch.optim.SGD's step to the tile
          in its epilogue, so no gradient reaches memory (cosine logits, whose projection
          needs whole rows, and dW wanted without an update: dW_c on cuBLAS, then
          ``filtered.apply_sgd_rows``). 6·G·D·C_r FLOPs.

Extra memory: the P chunk, one chunk of dW in fp32 and dF; no C_r x D tensor. fp8 weights
stay on the stationary kernels (FP8 tensor cores take K-major operands only, and W_c is
D-major in P W_c).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hydrahead.kernels.filtered import apply_sgd_rows
from hydrahead.kernels.rounding import rounding_plan, sgd_store
from hydrahead.kernels.shard_ce import FP8, SGDUpdate, _as_operand, _device_scalar, _precision, check_update
from hydrahead.kernels.tiles import launch_fitted

EXACT_KERNELS = ("auto", "gemm", "stationary")
_CHUNK_MIB = 128  # the P chunk's size; HYDRAHEAD_EXACT_CHUNK_MIB overrides it


@triton.jit(do_not_specialize=["c_lo", "c_hi"])
def _probs_kernel(
    F,
    W,
    INV_NORM,
    LOCAL_LABEL,
    LSE,
    GRAD_SCALE,
    P,
    G,
    D,
    c_lo,
    c_hi,
    stride_f,
    stride_w,
    stride_p,
    scale,
    target_shift,
    COSINE: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 (row blocks) runs fastest: the programs resident together read the same W tile.
    LOG2E: tl.constexpr = 1.4426950408889634
    rows = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    row_ok = rows < G
    c0 = c_lo + tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < c_hi
    acc = tl.zeros([BLOCK_G, BLOCK_C], tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        dims = k * BLOCK_K + tl.arange(0, BLOCK_K)
        if EVEN_K:
            f_mask = row_ok[:, None]
            w_mask = col_ok[:, None]
        else:
            f_mask = row_ok[:, None] & (dims < D)[None, :]
            w_mask = col_ok[:, None] & (dims < D)[None, :]
        f = tl.load(F + rows[:, None].to(tl.int64) * stride_f + dims[None, :], mask=f_mask, other=0.0)
        w = tl.load(W + cols[:, None].to(tl.int64) * stride_w + dims[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(f, tl.trans(w), acc, input_precision=PRECISION)
    # In log2 units, so each exp is one exp2; the target's entries sit behind a scalar branch.
    z2 = acc * (scale * LOG2E)
    if COSINE:
        inv = tl.load(INV_NORM + cols, mask=col_ok, other=0.0)
        z2 = z2 * inv[None, :]
    lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * LOG2E  # +inf: ignored rows get p = 0
    label = tl.load(LOCAL_LABEL + rows, mask=row_ok, other=-1)
    has_target = tl.max(((label >= c0) & (label < c0 + BLOCK_C)).to(tl.int32)) > 0
    if has_target:
        is_target = label[:, None] == cols[None, :]
        z2 = tl.where(is_target, z2 - target_shift * LOG2E, z2)
    p = tl.exp2(z2 - lse2[:, None])
    if has_target:
        p = tl.where(is_target, p - 1.0, p)
    p = p * tl.load(GRAD_SCALE)
    if COSINE:
        p = p * inv[None, :]
    out = P + rows[:, None].to(tl.int64) * stride_p + (cols - c_lo)[None, :]
    tl.store(out, p.to(P.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["C", "first_class", "key1", "key2"])
def _update_kernel(
    P,
    F,
    W,
    BUF,
    COMP,
    CLASS_IDS,
    G,
    C,
    D,
    stride_p,
    stride_f,
    stride_w,
    lr,
    momentum,
    weight_decay,
    first_class,
    key1,
    key2,
    PRECISION: tl.constexpr,
    HAS_BUF: tl.constexpr,
    HAS_COMP: tl.constexpr,
    HAS_IDS: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    COMP_MANT_BITS: tl.constexpr,
    COMP_MIN_EXP: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW = P^T F for a BLOCK_C x BLOCK_N tile of the chunk's rows, the SGD step applied to
    that tile in the epilogue: the gradient never reaches memory."""
    # Axis 0 (slices of D) runs fastest: the programs resident together read the same P tile.
    dims = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_ok = dims < D
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    acc = tl.zeros([BLOCK_C, BLOCK_N], tl.float32)
    for k in range(0, tl.cdiv(G, BLOCK_K)):
        rows = k * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < G
        p = tl.load(
            P + rows[:, None].to(tl.int64) * stride_p + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        )
        f = tl.load(
            F + rows[:, None].to(tl.int64) * stride_f + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
        )
        acc = tl.dot(tl.trans(p), f, acc, input_precision=PRECISION)
    tile = cols[:, None].to(tl.int64) * stride_w + dims[None, :]
    tile_ok = col_ok[:, None] & dim_ok[None, :]
    w32 = tl.load(W + tile, mask=tile_ok, other=0.0).to(tl.float32)
    ids = tl.load(CLASS_IDS + cols, mask=col_ok, other=0) if HAS_IDS else first_class + cols
    sgd_store(
        W,
        BUF,
        COMP,
        tile,
        tile_ok,
        w32,
        acc,
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


def _fused_update(probs, feats, weight, update: SGDUpdate, c_lo: int) -> None:
    """The SGD step on rows [c_lo, c_lo + probs.shape[1]) from dW = P^T F, in one kernel."""
    num_rows, dim = feats.shape
    width = probs.shape[1]
    rows = slice(c_lo, c_lo + width)
    has_buf = update.momentum != 0
    compensation = update.compensation[rows] if update.compensation is not None else None
    class_ids = update.class_ids
    has_ids = isinstance(class_ids, torch.Tensor)
    plan = rounding_plan(weight, update)
    chunk_rows = weight[rows]

    def launch(tiles):
        block_c, block_n, block_k, warps, stages = tiles
        _update_kernel[(triton.cdiv(dim, block_n), triton.cdiv(width, block_c))](
            probs,
            feats,
            chunk_rows,
            update.momentum_buffer[rows] if has_buf else chunk_rows,
            compensation if compensation is not None else chunk_rows,
            class_ids[rows].long() if has_ids else chunk_rows,
            num_rows,
            width,
            dim,
            probs.stride(0),
            feats.stride(0),
            weight.stride(0),
            update.lr,
            update.momentum,
            update.weight_decay,
            0 if has_ids else int(class_ids) + c_lo,
            plan.key1,
            plan.key2,
            PRECISION=_precision(weight.dtype),
            HAS_BUF=has_buf,
            HAS_COMP=compensation is not None,
            HAS_IDS=has_ids,
            **plan.constants,
            BLOCK_C=block_c,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=warps,
            num_stages=stages,
        )

    launch_fitted(
        "update",
        dim,
        weight.dtype,
        feats.device,
        launch,
        (has_buf, compensation is not None, has_ids, plan.constants["STOCHASTIC"]),
    )


def fused_update_enabled(cosine: bool) -> bool:
    """Whether the update runs in the dW product's epilogue (``_update_kernel``) rather than as
    cuBLAS's dW then a pass over the rows. Cosine logits need whole rows for their
    projection, so they take the second way. HYDRAHEAD_GEMM_UPDATE=separate forces it (for
    measuring the two against each other)."""
    return not cosine and os.environ.get("HYDRAHEAD_GEMM_UPDATE", "fused") != "separate"


def resolve_exact_kernels(choice: str, weight_dtype: torch.dtype) -> str:
    """``head.exact_kernels`` with auto resolved: gemm for fp32 and bf16 rows, stationary for fp8."""
    if choice not in EXACT_KERNELS:
        raise ValueError(f"exact_kernels must be one of {EXACT_KERNELS}, got {choice!r}")
    if choice == "auto":
        return "stationary" if weight_dtype == FP8 else "gemm"
    if choice == "gemm" and weight_dtype == FP8:
        raise ValueError("exact_kernels='gemm' takes fp32 or bf16 rows; fp8_e4m3 rows run on 'stationary'")
    return choice


def chunk_classes(num_rows: int, dtype: torch.dtype, num_classes: int) -> int:
    """Classes per chunk: the G x chunk P buffer within HYDRAHEAD_EXACT_CHUNK_MIB (a multiple of 256)."""
    budget = int(float(os.environ.get("HYDRAHEAD_EXACT_CHUNK_MIB", _CHUNK_MIB)) * 2**20)
    per_class = max(1, num_rows) * torch.empty((), dtype=dtype).element_size()
    return max(256, min(budget // per_class // 256 * 256, triton.cdiv(num_classes, 256) * 256))


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (bf16 operands stay bf16 on the GPU)."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _write_probs(feats, weight, inv_norm, local_label, lse, grad_scale, probs, c_lo, c_hi, options):
    num_rows, dim = feats.shape

    def launch(tiles):
        block_g, block_c, block_k, warps, stages = tiles
        _probs_kernel[(triton.cdiv(num_rows, block_g), triton.cdiv(c_hi - c_lo, block_c))](
            feats,
            weight,
            inv_norm if options["cosine"] else weight,
            local_label,
            lse,
            grad_scale,
            probs,
            num_rows,
            dim,
            c_lo,
            c_hi,
            feats.stride(0),
            weight.stride(0),
            probs.stride(0),
            options["scale"],
            options["target_shift"],
            COSINE=options["cosine"],
            PRECISION=_precision(weight.dtype),
            EVEN_K=dim % block_k == 0,
            BLOCK_G=block_g,
            BLOCK_C=block_c,
            BLOCK_K=block_k,
            num_warps=warps,
            num_stages=stages,
        )

    launch_fitted("probs", dim, weight.dtype, feats.device, launch, (options["cosine"],))


def exact_backward(
    feats: torch.Tensor,
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dF, dW) of the exact loss from the merged log-sum-exp ``lse`` (+inf on ignored rows).

    dF is float32 (G x D, with respect to the unit features for cosine logits). With
    ``update`` the SGD step is applied to ``weight`` in place and dW is None; otherwise dW
    (in the weights' dtype) when ``want_weight``. ``grad_scale`` (incoming gradient over the
    valid labels, times the logit scale, as for ``shard_weight_backward``) may be a
    one-element device tensor: nothing here reads it on the host. ``feats``: the features
    in the weights' dtype (or their ``FeatureOperand``).
    """
    feats = _as_operand(feats).values
    if weight.dtype == FP8:
        raise ValueError("the gemm backward takes fp32 or bf16 rows; fp8 rows run on the stationary kernels")
    if feats.dtype != weight.dtype:
        raise ValueError(f"features ({feats.dtype}) must come in the weights' dtype ({weight.dtype})")
    check_update(weight, update)
    num_rows, dim = feats.shape
    num_classes = weight.shape[0]
    want_weight = want_weight or update is not None
    grad_feat = torch.zeros(num_rows, dim, dtype=torch.float32, device=feats.device) if want_features else None
    grad_weight = torch.empty_like(weight) if want_weight and update is None else None
    if num_classes == 0 or num_rows == 0 or not (want_features or want_weight):
        return grad_feat, grad_weight
    options = dict(scale=scale, target_shift=target_shift, cosine=cosine)
    grad_scale = _device_scalar(grad_scale, feats.device)
    chunk = chunk_classes(num_rows, weight.dtype, num_classes)
    fuse_update = fused_update_enabled(cosine)
    probs_buffer = torch.empty(num_rows, min(chunk, num_classes), dtype=weight.dtype, device=feats.device)
    for c_lo in range(0, num_classes, chunk):
        c_hi = min(num_classes, c_lo + chunk)
        probs = probs_buffer[:, : c_hi - c_lo]
        _write_probs(feats, weight, inv_norm, local_label, lse, grad_scale, probs, c_lo, c_hi, options)
        rows = weight[c_lo:c_hi]
        if grad_feat is not None:  # before the update moves these rows
            grad_feat += _matmul_fp32(probs, rows)
        if not want_weight:
            continue
        if update is not None and fuse_update:
            _fused_update(probs, feats, weight, update, c_lo)
            continue
        chunk_grad = _matmul_fp32(probs.t(), feats)
        if cosine:  # through the row normalisation: P already carries 1 / ||w_c||
            unit = rows.float() * inv_norm[c_lo:c_hi, None]
            chunk_grad -= unit * (unit * chunk_grad).sum(dim=1, keepdim=True)
        if update is not None:
            apply_sgd_rows(weight, chunk_grad, update, c_lo)
        else:
            grad_weight[c_lo:c_hi] = chunk_grad
    return grad_feat, grad_weight


__all__ = ["EXACT_KERNELS", "chunk_classes", "exact_backward", "resolve_exact_kernels"]
