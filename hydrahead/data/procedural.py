"""Procedural classification data, generated from (seed, global sample index) alone.

Every value is a pure function of the seed and an index, computed by a counter-based hash
in plain int64 torch ops. Hence every rank, world size and resumed run sees the same
stream; nothing is stored per class, so 100M classes cost no memory; and the same code
runs on the GPU, so generating a batch never limits a benchmark.

What the data looks like:
- the class of a sample is Zipf-distributed over popularity ranks, and ranks map to class
  ids through a bijection that spreads popular classes over the whole id range (so every
  contiguous head shard gets its share of them);
- classes come in families of ``family_size`` consecutive ids whose latent vectors are
  near-duplicates: hard negatives for the classifier;
- the feature of a sample is a fixed random nonlinear rendering of its class latent, plus
  Gaussian noise.

Integer hashing is bit-identical on CPU and CUDA; the float transforms after it (log, cos,
tanh, matmul) agree to rounding.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from hydrahead.checks import check_int
from hydrahead.counter_rng import UINT64_MAX, counter_hash, counter_key, counter_normal, counter_uniform

__all__ = [
    "ProceduralFeatures",
    "counter_hash",
    "counter_normal",
    "counter_uniform",
    "zipf_ranks",
]

# Stream ids: each random quantity draws from its own stream, so they are independent.
_LABEL, _NOISE, _CENTER, _OFFSET, _RENDER, _PERMUTE = range(6)

# The eval split reads sample ids with bit 62 set, train ones below 2**62: the two splits
# can never share a sample. (Bit 63 is left alone so sample ids stay non-negative.)
_MAX_INDEX = 1 << 62
_SPLIT_OFFSET = {"train": 0, "eval": _MAX_INDEX}

# Render matrix entries are N(0, RENDER_SCALE^2); with unit latents every pre-activation
# is then N(0, RENDER_SCALE^2): tanh is clearly nonlinear there without saturating.
_RENDER_SCALE = 1.5
# Zipf ranks drawn from an exact table, before the continuous tail takes over.
_ZIPF_EXACT_RANKS = 32
# Class ids are multiplied by a stride < num_classes in int64: keep the product < 2**62.
_MAX_CLASSES = 1 << 31


@functools.lru_cache(maxsize=32)
def _zipf_tables(num_classes: int, exponent: float, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """Cumulative weights of the exact head ranks, the head's mass and the tail's mass.

    Cached so that drawing labels on a GPU neither copies the table nor syncs each batch.
    """
    head = min(num_classes, _ZIPF_EXACT_RANKS)
    head_cdf = np.cumsum(np.arange(1, head + 1, dtype=np.float64) ** -exponent)
    # Mass of x^-s over [head + 0.5, C + 0.5); zero when the table holds every rank.
    lo, log_span, t = head + 0.5, math.log((num_classes + 0.5) / (head + 0.5)), 1.0 - exponent
    if abs(t) < 1e-12:
        tail_mass = log_span
    else:
        tail_mass = lo**t * math.expm1(t * log_span) / t
    return torch.tensor(head_cdf, device=device), float(head_cdf[-1]), tail_mass


def zipf_ranks(u: torch.Tensor, num_classes: int, exponent: float) -> torch.Tensor:
    """Map uniforms in (0, 1) to 0-based popularity ranks: P(rank k - 1) ~ k^-exponent.

    The first ``_ZIPF_EXACT_RANKS`` ranks carry exactly the Zipf weights k^-s (a lookup
    in a table of that size). The tail inverts in closed form the CDF of the continuous
    density x^-s on [head + 0.5, C + 0.5) and rounds to the nearest rank, so rank k gets
    the integral over [k - 0.5, k + 0.5): k^-s to within s(s+1) / (24 k^2) (midpoint
    rule), under 0.1% past the head. ``exponent`` 0 is uniform; the log1p/expm1 form stays
    accurate near exponent 1, and 1 itself takes the log form.
    """
    u = u.double()
    head_cdf, head_mass, tail_mass = _zipf_tables(num_classes, exponent, u.device)
    head = head_cdf.numel()
    lo, log_span, t = head + 0.5, math.log((num_classes + 0.5) / (head + 0.5)), 1.0 - exponent

    v = u * (head_mass + tail_mass)
    head_rank = torch.searchsorted(head_cdf, v, right=True).clamp_(max=head - 1)
    if num_classes == head:
        return head_rank

    # Fraction w of the way through the tail's mass, then the inverse CDF of x^-s.
    w = ((v - head_mass) / tail_mass).clamp_(0.0, 1.0)
    if abs(t) < 1e-12:
        x = torch.exp(w * log_span)
    else:
        x = torch.exp(torch.log1p(w * math.expm1(t * log_span)) / t)
    # Round x to the nearest rank, head + 1..C (the clamp catches rounding at the top).
    tail_rank = torch.floor(x.mul_(lo).add_(0.5)).clamp_(head + 1, num_classes).long() - 1
    return torch.where(v < head_mass, head_rank, tail_rank)


def _tanh_gain(scale: float) -> float:
    """1 / RMS of tanh(scale * z), z ~ N(0, 1): makes the rendered signal unit-RMS."""
    z, w = np.polynomial.hermite_e.hermegauss(80)
    mean_square = float(np.sum(w * np.tanh(scale * z) ** 2) / np.sum(w))
    return 1.0 / math.sqrt(mean_square)


def _check_float(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def _check_index_tensor(name: str, value: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")


class ProceduralFeatures:
    """Feature vectors and labels of a synthetic C-class problem, by global sample index.

    ``labels(i)``, ``features(i)`` and ``batch(i)`` depend only on the constructor
    arguments and the sample indices ``i`` (int64, in [0, 2**62)), never on call order
    or batch composition (features at most up to the rounding of the matmul).
    ``split="eval"`` gives held-out samples: the same classes and class distribution,
    drawn from a disjoint range of sample ids.

    Class ``c`` belongs to family ``c // family_size``; its latent is
    ``normalise(center(family) + family_spread * offset(c))`` with hashed standard normal
    ``center`` and ``offset``, so a family's classes are near-duplicates (cosine about
    ``1 / (1 + family_spread**2)``). A sample's feature is
    ``tanh(A @ latent) * gain + noise * n`` with a fixed hashed matrix ``A``
    (feature_dim x latent_dim), ``gain`` making the first term unit-RMS per coordinate,
    and ``n`` standard normal per sample.
    """

    input_kind = "features"

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        *,
        seed: int = 0,
        family_size: int = 4,
        family_spread: float = 0.3,
        noise: float = 0.5,
        zipf_exponent: float = 1.0,
        split: str = "train",
        latent_dim: int | None = None,
        device: torch.device | str | None = None,
    ):
        check_int("num_classes", num_classes, 1, _MAX_CLASSES)
        check_int("feature_dim", feature_dim, 1)
        check_int("seed", seed, -(1 << 63), UINT64_MAX)
        check_int("family_size", family_size, 1)
        _check_float("family_spread", family_spread)
        _check_float("noise", noise)
        _check_float("zipf_exponent", zipf_exponent)
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {tuple(_SPLIT_OFFSET)}, got {split!r}")
        latent_dim = feature_dim if latent_dim is None else latent_dim
        check_int("latent_dim", latent_dim, 1)

        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.latent_dim = latent_dim
        self.seed = seed
        self.family_size = family_size
        self.family_spread = float(family_spread)
        self.noise = float(noise)
        self.zipf_exponent = float(zipf_exponent)
        self.split = split
        self.device = torch.device("cpu" if device is None else device)

        # Rank -> class id: c = (stride * rank + offset) mod C, a bijection as
        # gcd(stride, C) = 1. A stride near C / golden ratio (Fibonacci hashing) spreads
        # consecutive ranks evenly over [0, C), so popular classes land on every shard.
        stride = max(1, round(num_classes * (math.sqrt(5) - 1) / 2))
        while math.gcd(stride, num_classes) != 1:
            stride += 1
        self._stride = stride % num_classes
        self._offset = counter_key(seed, _PERMUTE) % num_classes

        # The only stored parameters; they do not grow with num_classes.
        rows = torch.arange(feature_dim, device=self.device)
        self._render = counter_normal(seed, _RENDER, rows, latent_dim).mul_(_RENDER_SCALE)
        self._gain = _tanh_gain(_RENDER_SCALE)

    # -- public API -------------------------------------------------------------------

    def labels(self, indices: torch.Tensor) -> torch.Tensor:
        """Class id (int64, in [0, num_classes)) of each sample index."""
        return self._labels(self._sample_ids(indices))

    def features(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Features (len(indices) x feature_dim, float32) of each sample index.

        ``labels``, when given, must be ``self.labels(indices)``; passing them only
        saves recomputing them.
        """
        ids = self._sample_ids(indices)
        if labels is None:
            labels = self._labels(ids)
        else:
            labels = self._check_class_ids("labels", labels)
            if labels.shape != ids.shape:
                raise ValueError(f"labels must have the shape of indices {tuple(ids.shape)}, got {tuple(labels.shape)}")
        return self._features(ids, labels)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)`` of the sample indices, on ``self.device``."""
        ids = self._sample_ids(indices)
        labels = self._labels(ids)
        return self._features(ids, labels), labels

    def class_latents(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Unit-norm latent vectors (len(class_ids) x latent_dim) of the given classes."""
        return self._latents(self._check_class_ids("class_ids", class_ids))

    def render(self, latents: torch.Tensor) -> torch.Tensor:
        """The noise-free feature of a latent: ``tanh(A @ latent) * gain``."""
        return torch.tanh(latents @ self._render.T).mul_(self._gain)

    # -- internals --------------------------------------------------------------------

    def _sample_ids(self, indices: torch.Tensor) -> torch.Tensor:
        _check_index_tensor("indices", indices)
        return (
            indices.to(self.device, torch.int64, non_blocking=True) + _SPLIT_OFFSET[self.split]
        )  # a blocking copy would sync

    def _check_class_ids(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        _check_index_tensor(name, ids)
        ids = ids.to(self.device, torch.int64)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_classes):
            raise ValueError(f"{name} must lie in [0, {self.num_classes})")
        return ids

    def _labels(self, ids: torch.Tensor) -> torch.Tensor:
        u = counter_uniform(self.seed, _LABEL, ids)
        ranks = zipf_ranks(u, self.num_classes, self.zipf_exponent)
        # stride, rank < 2**31, so the product cannot overflow int64.
        return ranks.mul_(self._stride).add_(self._offset).remainder_(self.num_classes)

    def _latents(self, class_ids: torch.Tensor) -> torch.Tensor:
        center = counter_normal(self.seed, _CENTER, class_ids // self.family_size, self.latent_dim)
        offset = counter_normal(self.seed, _OFFSET, class_ids, self.latent_dim)
        return F.normalize(center.add_(offset, alpha=self.family_spread), dim=-1)

    def _features(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if ids.device.type == "cpu":
            # Zipf batches repeat classes: render each distinct class once. Not on GPUs,
            # where torch.unique would block the host on every batch.
            classes, inverse = torch.unique(labels, return_inverse=True)
            x = self.render(self._latents(classes))[inverse]
        else:
            x = self.render(self._latents(labels))
        if self.noise > 0:
            x.add_(counter_normal(self.seed, _NOISE, ids, self.feature_dim), alpha=self.noise)
        return x
