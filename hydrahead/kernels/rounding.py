"""Rows rounded into their storage format on the device, with the fused kernels' own draws.

The fused SGD kernels round each update into the stored format themselves. Rows rounded
outside them (the deferred steps that active rows catch up on before a loss, settles)
went through ``hydrahead.optim.low_precision.round_to_storage``: exact, but for a step's
~8,000 active rows x 512 dims some 60 elementwise launches of int64 hashing. This is the
same rounding in one launch: the same 32-bit draws (``_mix32`` of class id, dim and the
step's keys) and the same float32 decision, so its results equal ``round_to_storage``'s
bit for bit (for float32 input and no Kahan compensation, which stays on the torch path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hydrahead.kernels.shard_ce import _INTERPRETED, _onto_grid, _signed32, _storage_grid
from hydrahead.optim.low_precision import LowPrecisionUpdate, rounding_keys

__all__ = ["round_rows"]

_BLOCK_ROWS = 32
_BLOCK_DIMS = 128


@triton.jit(do_not_specialize=["num_rows", "key1", "key2"])
def _round_rows_kernel(
    X, IDS, OUT, num_rows, D, key1, key2,
    STOCHASTIC: tl.constexpr, EXACT_CAST: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,
    MAX_VALUE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    ok = row_ok[:, None] & (dims < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + dims[None, :]
    x = tl.load(X + offsets, mask=ok, other=0.0)
    ids = tl.load(IDS + rows, mask=row_ok, other=0)
    y = _onto_grid(x, ids, dims, key1.to(tl.uint32, bitcast=True), key2.to(tl.uint32, bitcast=True),
                   STOCHASTIC, EXACT_CAST, MANT_BITS, MIN_EXP, MAX_VALUE)
    tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=ok)


def round_rows(exact: torch.Tensor, dtype: torch.dtype, class_ids: torch.Tensor, how: LowPrecisionUpdate) -> torch.Tensor:
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
    mant_bits, min_exp, max_value = _storage_grid(dtype)
    grid = (triton.cdiv(exact.shape[0], _BLOCK_ROWS), triton.cdiv(exact.shape[1], _BLOCK_DIMS))
    _round_rows_kernel[grid](
        exact, class_ids.to(torch.int64).contiguous(), out, exact.shape[0], exact.shape[1], _signed32(key1), _signed32(key2),
        STOCHASTIC=stochastic, EXACT_CAST=_INTERPRETED, MANT_BITS=mant_bits, MIN_EXP=min_exp, MAX_VALUE=max_value,
        BLOCK_R=_BLOCK_ROWS, BLOCK_D=_BLOCK_DIMS,
    )
    return out
