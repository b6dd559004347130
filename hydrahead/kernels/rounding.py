"""The Triton side of low-precision storage: rounding onto a format's grid inside kernels.

The definitions are the pure-torch ones of ``hydrahead.optim.low_precision`` (the formats,
the stochastic draws keyed by seed, step, class id and dim, round-to-nearest), written
again for Triton; each helper here names its torch twin, and the tests compare them bit
for bit. The fused SGD kernels (``shard_ce``, ``filtered``) round their updates with
``onto_grid``; ``round_rows`` rounds rows outside them (the deferred steps that active rows
catch up on before a loss, settles) in one launch instead of ~60 elementwise int64
hashing launches: its results equal ``round_to_storage``'s bit for bit (float32 input,
no Kahan compensation, which stays on the torch path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hydrahead.optim.low_precision import FORMATS, LowPrecisionUpdate, device_rounding_keys, rounding_keys

__all__ = [
    "INTERPRETED",
    "RoundingPlan",
    "mix32",
    "onto_grid",
    "round_rows",
    "rounding_plan",
    "sgd_store",
    "signed32",
    "storage_grid",
    "to_e5m2",
]

# Triton's interpreter (3.9) loses the carry when a float8 conversion rounds up into the next
# binade (1.97 -> 1.0 in e4m3); interpreted kernels round onto the grid first, exactly as the
# hardware conversion does, so the conversion itself has nothing left to round.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------
# In-kernel helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def mix32(x):
    """``hydrahead.optim.low_precision.mix32`` on uint32: the two must agree bit for bit
    (tests/test_low_precision.py compares them)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def grid_spacing(x, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """(spacing, 1 / spacing) of a format's grid around each x: powers of two, float32 normals."""
    e = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, MIN_EXP)
    e = tl.maximum(e - MANT_BITS, -126)  # finer spacings (tiny bf16 subnormals) are not needed
    return ((e + 127) << 23).to(tl.float32, bitcast=True), ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def onto_grid(
    x,
    ids,
    dims,
    key1,
    key2,
    STOCHASTIC: tl.constexpr,
    NEAREST: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
):
    """x (float32) rounded onto a storage grid in float32 arithmetic, exactly, then saturated.

    STOCHASTIC: up or down with the draws of rounding_uniforms (keyed by class id and dim).
    NEAREST: ties to even, as the hardware conversion does (used under the interpreter,
    whose float8 conversion loses the carry when rounding up into the next binade).
    Otherwise x is left for the conversion to round.
    """
    if STOCHASTIC:
        row_hash = mix32(ids.to(tl.uint32) ^ key1)
        h = mix32((row_hash[:, None] + dims[None, :].to(tl.uint32) * 0x9E3779B9) ^ key2)
        u = ((h >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
        spacing, inverse = grid_spacing(x, MANT_BITS, MIN_EXP)
        t = x * inverse  # exact: a power of two
        below = tl.floor(t)
        x = (below + tl.where(t - below >= 1.0 - u, 1.0, 0.0)) * spacing
    elif NEAREST:
        spacing, inverse = grid_spacing(x, MANT_BITS, MIN_EXP)
        t = x * inverse
        r = tl.floor(t + 0.5)
        r = tl.where((r - t == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)  # ties to even
        x = r * spacing
    return tl.where(x > MAX_VALUE, MAX_VALUE, tl.where(x < -MAX_VALUE, -MAX_VALUE, x))


@triton.jit
def sgd_store(
    W,
    BUF,
    COMP,
    offsets,
    mask,
    w32,
    grad,
    ids,
    dims,
    lr,
    momentum,
    weight_decay,
    key1,
    key2,
    HAS_BUF: tl.constexpr,
    HAS_COMP: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    COMP_MANT_BITS: tl.constexpr,
    COMP_MIN_EXP: tl.constexpr,
):
    """torch.optim.SGD's step (weight decay added to the gradient, momentum buffer, no
    dampening, no Nesterov) on one tile of rows whose float32 values are ``w32``; the new
    weights are written onto the storage grid (with the Kahan buffer's compensation, and
    what this rounding loses written back to it). ``ids``: the rows' global class ids."""
    step = grad + weight_decay * w32
    if HAS_BUF:
        buf = momentum * tl.load(BUF + offsets, mask=mask, other=0.0).to(tl.float32) + step
        tl.store(BUF + offsets, buf.to(BUF.dtype.element_ty), mask=mask)
        step = buf
    new = w32 - lr * step
    if HAS_COMP:  # Kahan: what earlier roundings lost joins this update
        new = new + tl.load(COMP + offsets, mask=mask, other=0.0).to(tl.float32)
    stored = onto_grid(
        new,
        ids,
        dims,
        key1.to(tl.uint32, bitcast=True),
        key2.to(tl.uint32, bitcast=True),
        STOCHASTIC,
        EXACT_CAST,
        MANT_BITS,
        MIN_EXP,
        MAX_VALUE,
    ).to(W.dtype.element_ty)
    tl.store(W + offsets, stored, mask=mask)
    if HAS_COMP:
        lost = new - stored.to(tl.float32)
        lost = onto_grid(lost, ids, dims, 0, 0, False, EXACT_CAST, COMP_MANT_BITS, COMP_MIN_EXP, 3.0e38)
        tl.store(COMP + offsets, lost.to(COMP.dtype.element_ty), mask=mask)


@triton.jit
def to_e5m2(x, EXACT_CAST: tl.constexpr):
    if EXACT_CAST:
        x = onto_grid(x, 0, 0, 0, 0, False, True, 2, -14, 57344.0)
    return x.to(tl.float8e5)


# ----------------------------------------------------------------------------------------
# Kernel arguments
# ----------------------------------------------------------------------------------------


def storage_grid(dtype: torch.dtype) -> tuple[int, int, float]:
    """(mantissa bits, smallest normal exponent, largest finite value) of the weights' format."""
    if dtype == torch.float64:
        return 52, -1022, float(torch.finfo(torch.float64).max)
    fmt = FORMATS[dtype]
    return fmt.mantissa_bits, fmt.min_normal_exponent, float(fmt.max_value)


def signed32(key: int) -> int:
    """A 32-bit key as the signed int a kernel argument holds (the kernel bitcasts it back)."""
    return key - (1 << 32) if key >= 1 << 31 else key


@dataclass
class RoundingPlan:
    """How an update kernel writes W: the draws' keys and the storage grids, as kernel arguments.

    ``keys``: with a step held in a device tensor (``SGDUpdate.step``), the two keys as an int32
    tensor on the device, which the kernel reads (key1 and key2 are then 0)."""

    key1: int
    key2: int
    constants: dict
    keys: torch.Tensor | None = None


def rounding_plan(weight: torch.Tensor, update) -> RoundingPlan:
    """The plan for an ``SGDUpdate`` (or None: plain nearest writes) into ``weight``'s format."""
    stochastic = update is not None and update.rounding == "stochastic"
    keys = None
    if stochastic and isinstance(update.step, torch.Tensor):
        keys, (key1, key2) = device_rounding_keys(update.seed, update.step, update.salt), (0, 0)
    else:
        key1, key2 = rounding_keys(update.seed, update.step, update.salt) if stochastic else (0, 0)
    mant_bits, min_exp, max_value = storage_grid(weight.dtype)
    compensation = update.compensation if update is not None else None
    comp_bits, comp_min_exp, _ = storage_grid(compensation.dtype if compensation is not None else torch.float32)
    return RoundingPlan(
        signed32(key1),
        signed32(key2),
        dict(
            STOCHASTIC=stochastic,
            MANT_BITS=mant_bits,
            MIN_EXP=min_exp,
            MAX_VALUE=max_value,
            COMP_MANT_BITS=comp_bits,
            COMP_MIN_EXP=comp_min_exp,
            EXACT_CAST=INTERPRETED and weight.dtype in (torch.bfloat16, torch.float8_e4m3fn),
        ),
        keys,
    )


# ----------------------------------------------------------------------------------------
# Rows rounded outside the update kernels
# ----------------------------------------------------------------------------------------


_BLOCK_ROWS = 32
_BLOCK_DIMS = 128


@triton.jit(do_not_specialize=["num_rows", "key1", "key2"])
def _round_rows_kernel(
    X,
    IDS,
    OUT,
    num_rows,
    D,
    key1,
    key2,
    STOCHASTIC: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    ok = row_ok[:, None] & (dims < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + dims[None, :]
    x = tl.load(X + offsets, mask=ok, other=0.0)
    ids = tl.load(IDS + rows, mask=row_ok, other=0)
    y = onto_grid(
        x,
        ids,
        dims,
        key1.to(tl.uint32, bitcast=True),
        key2.to(tl.uint32, bitcast=True),
        STOCHASTIC,
        EXACT_CAST,
        MANT_BITS,
        MIN_EXP,
        MAX_VALUE,
    )
    tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=ok)


def round_rows(
    exact: torch.Tensor, dtype: torch.dtype, class_ids: torch.Tensor, how: LowPrecisionUpdate
) -> torch.Tensor:
    """``round_to_storage(exact, dtype, class_ids, how)`` for float32 ``exact`` (rows, D) and
    no compensation: the rows in ``dtype`` (bfloat16 or float8_e4m3fn), in one kernel."""
    if exact.dim() != 2 or exact.dtype != torch.float32:
        raise ValueError(f"exact must be 2-D float32 rows, got {exact.dtype} {tuple(exact.shape)}")
    if class_ids.shape != (exact.shape[0],):
        raise ValueError(f"class_ids must hold one id per row ({exact.shape[0]}), got {tuple(class_ids.shape)}")
    if dtype not in (torch.bfloat16, torch.float8_e4m3fn):
        raise ValueError(f"round_rows stores bfloat16 or float8_e4m3fn, not {dtype}")
    exact = exact.contiguous()
    out = torch.empty(exact.shape, dtype=dtype, device=exact.device)
    if exact.numel() == 0:
        return out
    stochastic = how.rounding == "stochastic"
    key1, key2 = rounding_keys(how.seed, how.step, how.salt) if stochastic else (0, 0)
    mant_bits, min_exp, max_value = storage_grid(dtype)
    grid = (triton.cdiv(exact.shape[0], _BLOCK_ROWS), triton.cdiv(exact.shape[1], _BLOCK_DIMS))
    _round_rows_kernel[grid](
        exact,
        class_ids.to(torch.int64).contiguous(),
        out,
        exact.shape[0],
        exact.shape[1],
        signed32(key1),
        signed32(key2),
        STOCHASTIC=stochastic,
        EXACT_CAST=INTERPRETED,
        MANT_BITS=mant_bits,
        MIN_EXP=min_exp,
        MAX_VALUE=max_value,
        BLOCK_R=_BLOCK_ROWS,
        BLOCK_D=_BLOCK_DIMS,
    )
    return out
