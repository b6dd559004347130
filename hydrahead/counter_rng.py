"""Counter-based random numbers: pure functions of (seed, stream, index), in int64 torch ops.

Every value is a splitmix64-style hash of its coordinates, so nothing is stored, any
element can be computed alone, and CPU and CUDA give bit-identical integers (the float
transforms after the hash agree to rounding). Procedural data and the head's
initialisation draw from here, each from its own stream id.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "UINT64_MAX",
    "counter_hash",
    "counter_hash_int",
    "counter_key",
    "counter_normal",
    "counter_uniform",
    "keyed_hash",
    "keyed_uniform",
    "stream_keys",
]

_MASK64 = UINT64_MAX = (1 << 64) - 1  # seeds are any int64 or uint64
# splitmix64 constants (Steele, Lea and Flood 2014).
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A uint64 held in a Python int, as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix64_int(z: int) -> int:
    """splitmix64 finaliser on Python ints (used for keys and as the test reference)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


_GAMMA_S, _MUL1_S, _MUL2_S = _signed(_GAMMA), _signed(_MUL1), _signed(_MUL2)


def _shr(x: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign-extended bits makes it logical.
    shifted = torch.bitwise_right_shift(x, bits, out=out)
    return shifted.bitwise_and_((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on an int64 tensor, in place (multiplication wraps mod 2**64).

    A bijection of 64-bit values. In place with one scratch buffer: fresh allocations
    cost more than the arithmetic here.
    """
    scratch = torch.empty_like(x)
    for bits, multiplier in ((30, _MUL1_S), (27, _MUL2_S), (31, None)):
        x.bitwise_xor_(_shr(x, bits, out=scratch))
        if multiplier is not None:
            x.mul_(multiplier)
    return x


def stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """Two 64-bit keys (as int64) for one (seed, stream) pair."""
    k1 = _mix64_int(_mix64_int(seed) + (2 * stream + 1) * _GAMMA)
    k2 = _mix64_int(k1 + _GAMMA)
    return _signed(k1), _signed(k2)


def counter_key(seed: int, stream: int) -> int:
    """One 64-bit unsigned value (a Python int) for a (seed, stream) pair: a scalar draw."""
    return _mix64_int(stream_keys(seed, stream)[0])


def counter_hash(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash (int64) of each element of ``index`` under (seed, stream).

    Two keyed rounds rather than one: with a single ``mix(index + key)``, two seeds would
    give the same stream shifted by ``key2 - key1``.
    """
    return keyed_hash(*stream_keys(seed, stream), index)


def keyed_hash(k1: int, k2: int, index: torch.Tensor) -> torch.Tensor:
    """``counter_hash`` under the stream keys (k1, k2) of ``stream_keys``."""
    h = _mix64(index.long() + k1)
    return _mix64(h.bitwise_xor_(k2))


def counter_hash_int(seed: int, stream: int, index: int) -> int:
    """``counter_hash`` of one index, on Python ints (no tensor, no device): int64 value."""
    k1, k2 = stream_keys(seed, stream)
    return _signed(_mix64_int(_mix64_int(index + k1) ^ (k2 & _MASK64)))


def counter_uniform(seed: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in the open interval (0, 1), one per element of ``index``."""
    return _uniform52(counter_hash(seed, stream, index))


def keyed_uniform(k1: int, k2: int, index: torch.Tensor) -> torch.Tensor:
    """``counter_uniform`` under the stream keys (k1, k2) of ``stream_keys``."""
    return _uniform52(keyed_hash(k1, k2, index))


def _uniform52(h: torch.Tensor) -> torch.Tensor:
    # 52 bits: v + 0.5 is then exact in float64, so u is never 0 nor 1.
    return (_shr(h, 12).double() + 0.5) * 2.0**-52


def counter_normal(seed: int, stream: int, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard normal float32 vectors: shape ``index.shape + (dim,)``.

    Components ``j`` and ``j + ceil(dim / 2)`` come from the hash of (index, j).
    """
    return _normals(counter_hash(seed, stream, index), dim)


def _normals(base: torch.Tensor, dim: int) -> torch.Tensor:
    # One 64-bit hash per pair of components, then Box-Muller: the pair's top 24 bits
    # give the radius, the next 24 the angle (24-bit uniforms are exact in float32).
    # u >= 2**-25 truncates the tails beyond 5.9 sigma, which is harmless here.
    pairs = (dim + 1) // 2
    counter = torch.arange(pairs, device=base.device, dtype=torch.int64).mul_(_GAMMA_S)
    h = _mix64(base.unsqueeze(-1) + counter)
    radius = _shr(h, 40).float().add_(0.5).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
    angle = h.bitwise_right_shift_(16).bitwise_and_(0xFFFFFF).float()
    angle.mul_(2.0 * math.pi * 2.0**-24)
    # Component j is the cosine of pair j for j < pairs, the sine of pair j - pairs after.
    z = torch.cat((torch.cos(angle).mul_(radius), angle.sin_().mul_(radius)), dim=-1)
    return z[..., :dim]
