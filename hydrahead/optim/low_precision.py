"""Head weights stored in bf16 or fp8 with no fp32 master copy: rounding and compensation.

A weight stored in a format with m mantissa bits moves only when an update exceeds half
its ulp (2^(e - m) for |w| in [2^e, 2^(e+1))): with bf16 (m = 7) an update below w/256
rounds away entirely, and in fp8 e4m3 (m = 3) below w/16. Two remedies, alone or together:

- **Stochastic rounding**: round x up or down to its two neighbouring representable
  values with probabilities that make the mean exact: ``q * floor(x / q + u)`` with ``q``
  the ulp at x and u uniform in [0, 1). Small updates then move the weight sometimes,
  and on average by the right amount. The uniforms come from the counter generator keyed
  by (seed, step, global class id, dim), so a run is reproducible and independent of how
  classes are split over ranks.
- **Kahan compensation**: a per-element buffer keeps what the last rounding lost,
  ``c = (w + delta + c_old) - stored``, and adds it to the next update. Stored in bf16
  (or e5m2) it costs 2 (1) bytes per element.

Formats: bfloat16 (8-bit exponent, 7 mantissa bits), float8 e4m3fn (4-bit exponent, bias
7: normals from 2^-6, subnormals down to 2^-9, largest 448, no infinities; values
beyond 448 saturate here) and float8 e5m2 (2 mantissa bits, down to 2^-16, largest
57,344). All arithmetic before the final rounding is float64 in these reference
functions, so the only error is the one the rounding makes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from hydrahead.counter_rng import counter_hash, counter_hash_int

__all__ = [
    "FORMATS",
    "LowPrecisionUpdate",
    "device_rounding_keys",
    "round_nearest",
    "round_to_storage",
    "rounding_keys",
    "rounding_uniforms",
    "stochastic_round",
    "ulp",
]

_ROUNDING_STREAM = 4000  # counter-hash stream reserved for stochastic rounding
ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class Format:
    mantissa_bits: int
    min_normal_exponent: int
    max_value: float


FORMATS = {
    torch.float32: Format(23, -126, torch.finfo(torch.float32).max),
    torch.bfloat16: Format(7, -126, torch.finfo(torch.bfloat16).max),
    torch.float16: Format(10, -14, 65504.0),
    torch.float8_e4m3fn: Format(3, -6, 448.0),
    torch.float8_e5m2: Format(2, -14, 57344.0),
}


def _format(dtype: torch.dtype) -> Format:
    if dtype not in FORMATS:
        raise ValueError(f"no rounding rule for {dtype}; known: {', '.join(str(d) for d in FORMATS)}")
    return FORMATS[dtype]


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s representable values around each |x| (float64): 2^(e - m),
    e = max(floor(log2 |x|), smallest normal exponent)."""
    fmt = _format(dtype)
    _, exponent = torch.frexp(x.double())  # x = mantissa * 2^exponent, |mantissa| in [0.5, 1)
    e = (exponent - 1).clamp(min=fmt.min_normal_exponent)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - fmt.mantissa_bits)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, uniform: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to ``dtype``, up or down, with E[result] = x (before saturation).

    ``uniform``: values in [0, 1), one per element. Saturates at the format's largest
    finite value (fp8 e4m3 has no infinity). NaN stays NaN.
    """
    fmt = _format(dtype)
    x64 = x.double()
    q = ulp(x64, dtype)
    rounded = torch.floor(x64 / q + uniform.double()) * q  # x / q and the product are exact: q is a power of 2
    return rounded.clamp(-fmt.max_value, fmt.max_value).to(dtype)


def round_nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to nearest (ties to even), saturating at the format's largest value."""
    fmt = _format(dtype)
    return x.double().clamp(-fmt.max_value, fmt.max_value).to(dtype)


_MASK32 = 0xFFFFFFFF
_MIX32_MUL1, _MIX32_MUL2 = 0x7FEB352D, 0x846CA68B  # a 32-bit finaliser with low bias (two multiplies)
_DIM_STRIDE32 = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive dims over the hash's input


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser on uint32 values held in int64 (products wrap; the mask keeps 32 bits).
    ``hydrahead.kernels.rounding.mix32`` is the same function in Triton, bit for bit."""
    x = x ^ (x >> 16)
    x = (x * _MIX32_MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MIX32_MUL2) & _MASK32
    return x ^ (x >> 16)


def rounding_keys(seed: int, step: int, salt: int = 0) -> tuple[int, int]:
    """Two 32-bit keys for one step's draws, from the 64-bit counter hash of (seed, step, salt)."""
    return _rounding_keys(int(seed), int(step), int(salt))


@functools.lru_cache(maxsize=64)
def _rounding_keys(seed: int, step: int, salt: int) -> tuple[int, int]:
    # On Python ints (a torch hash was some twenty small host ops, 40 us), and cached: the
    # exact step asks once per class chunk (32 chunks at G = 4096 x 1M).
    key = counter_hash_int(seed, _ROUNDING_STREAM, 2 * step + salt)
    return key & _MASK32, (key >> 32) & _MASK32


def device_rounding_keys(seed: int, step: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """``rounding_keys`` of a step held in a one-element int64 tensor, computed on its device as
    two int32 values (the keys' bits): no host read, so a CUDA graph replay that advances
    ``step`` in place draws fresh bits."""
    key = counter_hash(int(seed), _ROUNDING_STREAM, step.reshape(1) * 2 + int(salt))
    halves = torch.cat([key & _MASK32, (key >> 32) & _MASK32])
    return torch.where(halves >= 1 << 31, halves - (1 << 32), halves).to(torch.int32)


def rounding_uniforms(seed: int, step: int, class_ids: torch.Tensor, dim: int, salt: int = 0) -> torch.Tensor:
    """(len(class_ids), dim) float64 uniforms in (0, 1) from (seed, step, class id, dim).

    The step is folded into two 32-bit keys, the (class, dim) pair is the counter: a
    class's draws are the same whichever rank owns it. ``salt`` (0 or 1) gives a second,
    independent set for the same step, for a second rounding of the same rows in one step.
    The fused kernels draw the same bits with the same 32-bit integer arithmetic (class ids
    below 2^32): hash_row = mix(class ^ k1), hash = mix((hash_row + d * 0x9E3779B9) ^ k2),
    u = (2 * (hash >> 9) + 1) / 2^24. Each u is a multiple of 2^-24 whose complement 1 - u
    is exact in float32, so a float32 rounding decision ``frac >= 1 - u`` is exact.
    """
    k1, k2 = rounding_keys(seed, step, salt)
    row_hash = mix32((class_ids.long() & _MASK32) ^ k1)
    dims = torch.arange(dim, device=class_ids.device, dtype=torch.int64)
    h = mix32(((row_hash[:, None] + dims * _DIM_STRIDE32) & _MASK32) ^ k2)
    return ((h >> 9) * 2 + 1).double() * 2.0**-24


@dataclass
class LowPrecisionUpdate:
    """How an update is written back to the stored weights.

    ``rounding``: "nearest" or "stochastic"; ``seed`` and ``step`` key the stochastic draws.
    """

    rounding: str = "nearest"
    seed: int = 0
    step: int = 0
    salt: int = 0  # 1: the draws of a second rounding in the same step (settling deferred steps)

    def __post_init__(self):
        check_rounding(self.rounding)


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


@torch.no_grad()
def round_to_storage(
    exact: torch.Tensor,
    dtype: torch.dtype,
    class_ids: torch.Tensor,
    how: LowPrecisionUpdate,
    compensation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of ``exact`` values (rows, D) as stored in ``dtype``, rounded as ``how`` says.

    ``class_ids``: the rows' global class ids (keys of the stochastic draws).
    ``compensation`` (rows, D), the Kahan buffer of these rows: added to ``exact`` first,
    then overwritten in place with what this rounding lost.
    (``hydrahead.kernels.rounding.round_rows`` rounds float32 rows without compensation
    bit for bit the same way, in one kernel.)
    """
    exact = exact.double()
    if compensation is not None:
        exact = exact + compensation.double()
    if dtype == torch.float64:
        stored = exact
    elif how.rounding == "stochastic":
        stored = stochastic_round(
            exact, dtype, rounding_uniforms(how.seed, how.step, class_ids, exact.shape[1], how.salt)
        )
    else:
        stored = round_nearest(exact, dtype)
    if compensation is not None:
        compensation.copy_(round_nearest(exact - stored.double(), compensation.dtype))
    return stored.to(dtype)
