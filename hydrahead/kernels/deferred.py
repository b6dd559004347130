"""Paying the zero-gradient SGD steps that rows owe, in one pass over the shard.

``hydrahead.optim.deferred_sgd.pay_owed_steps`` is the definition: each row that sat out n
steps is multiplied by the product of those steps' 2x2 maps of (weight, momentum), in
float32. Written with torch ops, a settle of a 25M x 512 shard gathers the owing rows,
makes six float32 temporaries of them and scatters them back: about 450 ms on an H200,
twelve times the bytes it must move. Here one kernel reads each row's weight and buffer
once, looks its map up by the steps it owes, and writes the row back onto the storage
grid (``rounding.onto_grid``: stochastically, keyed by class id, as ``round_rows`` does)
and the buffer beside it; rows that owe nothing are not touched. ``paid_rows`` writes the
paid rows to a new tensor instead, rounded to nearest, and leaves the shard as it is.

The float32 arithmetic is the torch path's (products, then their sum); a GPU may fuse a
product and the sum into one rounding, so a row can differ from the torch path's in the
last bit before it is rounded into storage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hydrahead.kernels.rounding import INTERPRETED, onto_grid, signed32, storage_grid
from hydrahead.optim.low_precision import LowPrecisionUpdate, rounding_keys

__all__ = ["paid_copy", "pay_rows_in_place", "supported"]

_BLOCK_ROWS = 16


@triton.jit(do_not_specialize=["num_rows", "updates", "class_start", "key1", "key2"])
def _pay_kernel(
    W,
    BUF,
    ROW_UPDATES,
    MAPS,
    OUT,
    num_rows,
    D,
    stride_w,
    stride_buf,
    stride_out,
    updates,
    class_start,
    key1,
    key2,
    HAS_BUF: tl.constexpr,
    IN_PLACE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    MANT_BITS: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr,
    BUF_ONTO_GRID: tl.constexpr,
    BUF_MANT_BITS: tl.constexpr,
    BUF_MIN_EXP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    owed = updates - tl.load(ROW_UPDATES + rows, mask=row_ok, other=updates)
    if IN_PLACE:  # rows that owe nothing keep their stored bits
        row_ok = row_ok & (owed > 0)
    maps = MAPS + owed.to(tl.int64) * 4  # float64 2x2 per lag, rounded to float32 as the torch path does
    m00 = tl.load(maps, mask=row_ok, other=1.0).to(tl.float32)
    m01 = tl.load(maps + 1, mask=row_ok, other=0.0).to(tl.float32)
    m10 = tl.load(maps + 2, mask=row_ok, other=0.0).to(tl.float32)
    m11 = tl.load(maps + 3, mask=row_ok, other=1.0).to(tl.float32)
    ids = class_start + rows.to(tl.int64)
    wide = rows.to(tl.int64)[:, None]
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (dims < D)[None, :]
        w = tl.load(W + wide * stride_w + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BUF:
            b = tl.load(BUF + wide * stride_buf + dims[None, :], mask=ok, other=0.0).to(tl.float32)
            new = m00[:, None] * w + m01[:, None] * b
            if IN_PLACE:
                new_b = m10[:, None] * w + m11[:, None] * b
                if BUF_ONTO_GRID:  # the interpreter's bf16 conversion: round onto the grid first
                    new_b = onto_grid(new_b, ids, dims, 0, 0, False, True, BUF_MANT_BITS, BUF_MIN_EXP, 3.0e38)
                tl.store(BUF + wide * stride_buf + dims[None, :], new_b.to(BUF.dtype.element_ty), mask=ok)
        else:
            new = m00[:, None] * w
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
        )
        tl.store(OUT + wide * stride_out + dims[None, :], stored.to(OUT.dtype.element_ty), mask=ok)


def _launch(weight, buffer, row_updates, updates: int, maps, out, *, in_place, how, class_start) -> None:
    num_rows, dim = weight.shape
    if not supported(weight, buffer):
        raise ValueError(f"owed steps are paid here for float32, bf16 or e4m3 rows, got {weight.dtype}")
    if row_updates.dtype != torch.int32 or row_updates.shape != (num_rows,) or not row_updates.is_contiguous():
        raise ValueError(f"row_updates must be a contiguous int32 tensor of {num_rows} counts")
    if maps.dtype != torch.float64 or maps.dim() != 3 or maps.shape[1:] != (2, 2) or not maps.is_contiguous():
        raise ValueError(f"maps must be a contiguous float64 table of 2 x 2 maps, got {maps.dtype} {tuple(maps.shape)}")
    if num_rows == 0:
        return
    # float32 rows hold the float32 arithmetic exactly: nothing to round (onto_grid's spacings
    # stop at 2^-126 and would round values far below it)
    stochastic = how is not None and how.rounding == "stochastic" and weight.dtype != torch.float32
    key1, key2 = rounding_keys(how.seed, how.step, how.salt) if stochastic else (0, 0)
    mant_bits, min_exp, max_value = storage_grid(weight.dtype)
    buf_on_grid = INTERPRETED and buffer is not None and buffer.dtype == torch.bfloat16
    buf_bits, buf_min_exp, _ = storage_grid(buffer.dtype) if buffer is not None else (0, 0, 0.0)
    _pay_kernel[(triton.cdiv(num_rows, _BLOCK_ROWS),)](
        weight,
        buffer if buffer is not None else weight,
        row_updates,
        maps,
        out,
        num_rows,
        dim,
        weight.stride(0),
        buffer.stride(0) if buffer is not None else 0,
        out.stride(0),
        updates,
        class_start,
        signed32(key1),
        signed32(key2),
        HAS_BUF=buffer is not None,
        IN_PLACE=in_place,
        STOCHASTIC=stochastic,
        EXACT_CAST=INTERPRETED and weight.dtype != torch.float32,
        MANT_BITS=mant_bits,
        MIN_EXP=min_exp,
        MAX_VALUE=max_value,
        BUF_ONTO_GRID=buf_on_grid,
        BUF_MANT_BITS=buf_bits,
        BUF_MIN_EXP=buf_min_exp,
        BLOCK_R=_BLOCK_ROWS,
        BLOCK_D=min(256, max(16, triton.next_power_of_2(dim))),
    )


def supported(weight: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether these rows can be paid here: float32, bfloat16 or e4m3 rows with unit-stride
    rows, a float32 or bfloat16 buffer."""
    return (
        weight.dim() == 2
        and weight.dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn)
        and weight.stride(1) == 1
        and (buffer is None or (buffer.dtype in (torch.float32, torch.bfloat16) and buffer.stride(1) == 1))
    )


@torch.no_grad()
def pay_rows_in_place(
    weight, buffer, row_updates, updates: int, maps, *, how: LowPrecisionUpdate | None = None, class_start: int = 0
) -> None:
    """Every row that owes steps (``updates - row_updates`` > 0) paid and stored in place:
    its weight rounded as ``how`` says (None: to nearest), its buffer beside it."""
    _launch(weight, buffer, row_updates, updates, maps, weight, in_place=True, how=how, class_start=class_start)


@torch.no_grad()
def paid_copy(weight, buffer, row_updates, updates: int, maps) -> torch.Tensor:
    """A new tensor like ``weight`` holding every row with its owed steps paid, rounded to
    nearest; the shard and its buffer are left as they are."""
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    _launch(weight, buffer, row_updates, updates, maps, out, in_place=False, how=None, class_start=0)
    return out
