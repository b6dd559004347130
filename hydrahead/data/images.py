"""Procedural images: the procedural classification problem rendered as pictures.

A sample's class, and its class latent, are exactly those of ``ProceduralFeatures``
(same seed, same counter hash). The latent is turned into K coefficients by that class's
fixed random rendering ``tanh(A @ latent)``, and the coefficients weight K fixed random
plane waves ("Fourier features"), each with its own frequency, phase and colour:

    image = tanh(contrast * sum_k a_k(latent) * colour_k * wave_k(x - shift)) * gain
            + noise * n

The frequencies are in cycles per image, so one class looks alike at every resolution;
their amplitudes fall as 1/frequency, like natural images. Each sample gets its own
translation ``shift`` (up to ``max_shift`` of the image side) and its own pixel noise
``n``, both from the counter hash of its index.

A batch costs one (B x 2K) @ (2K x 3HW) matrix product plus elementwise work, on the
given device; the stored basis (2K x 3HW) does not grow with the number of classes, and
nothing is stored per class.
"""

from __future__ import annotations

import math

import torch

from hydrahead.checks import check_int
from hydrahead.counter_rng import counter_hash, counter_normal, counter_uniform
from hydrahead.data.procedural import (
    _SPLIT_OFFSET,
    ProceduralFeatures,
    _check_float,
    _check_index_tensor,
    _tanh_gain,
)

__all__ = ["ProceduralImages"]

# Streams of their own, past those of procedural.py (0-5), so the draws are independent.
_BASIS, _SHIFT_Y, _SHIFT_X, _PIXEL_NOISE = range(16, 20)

# With the pre-activation at unit variance, tanh at this gain is clearly nonlinear but
# rarely saturated (as in ProceduralFeatures).
_CONTRAST = 1.5


def _generator_seed(seed: int, stream: int, index: int = 0) -> int:
    """A non-negative 63-bit seed for a torch.Generator from the counter hash."""
    h = counter_hash(seed, stream, torch.tensor([index], dtype=torch.int64))
    return int(h.item()) & ((1 << 63) - 1)


def _fourier_basis(
    seed: int, image_size: int, num_components: int, max_frequency: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies (K x 2: y, x cycles per image) and basis (2K x 3*S*S, cos then sin).

    Built in float64 on the CPU from a seeded generator, so every device gets the same
    basis up to the final cast.
    """
    gen = torch.Generator().manual_seed(_generator_seed(seed, _BASIS))
    k = num_components
    # Keep every wave below the Nyquist frequency of this resolution.
    top = max(1.0, min(max_frequency, image_size / 2))
    radius = torch.rand(k, generator=gen, dtype=torch.float64).mul_(math.log(top)).exp_()
    angle = torch.rand(k, generator=gen, dtype=torch.float64) * (2 * math.pi)
    phase = torch.rand(k, generator=gen, dtype=torch.float64) * (2 * math.pi)
    colour = torch.randn(k, 3, generator=gen, dtype=torch.float64)
    frequencies = torch.stack((radius * angle.sin(), radius * angle.cos()), dim=1)

    # 1/f amplitudes, scaled so that unit-RMS coefficients give a unit-variance
    # pre-activation (a wave's mean square is 1/2).
    weight = colour / radius[:, None]
    weight *= math.sqrt(2.0 / (weight.pow(2).sum().item() / 3))

    coords = (torch.arange(image_size, dtype=torch.float64) + 0.5) / image_size
    theta = (
        frequencies[:, 0, None, None] * coords[None, :, None] + frequencies[:, 1, None, None] * coords[None, None, :]
    ) * (2 * math.pi) + phase[:, None, None]  # K x S x S
    waves = torch.cat((theta.cos(), theta.sin())).float()  # 2K x S x S
    basis = waves[:, None] * weight.float().repeat(2, 1)[:, :, None, None]  # 2K x 3 x S x S
    return frequencies.float().to(device), basis.reshape(2 * k, -1).to(device)


class ProceduralImages:
    """3 x S x S float images and labels of a synthetic C-class problem, by sample index.

    Labels and class latents are those of ``ProceduralFeatures`` with the same
    ``num_classes``, ``seed``, ``family_size``, ``family_spread``, ``zipf_exponent`` and
    ``split``; so are the determinism and resumability guarantees: ``batch(i)`` depends
    only on the constructor arguments and the indices (up to matmul rounding).
    ``noise`` is the standard deviation of the per-pixel noise; the noise-free image has
    unit RMS per pixel.
    """

    input_kind = "images"

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        *,
        seed: int = 0,
        family_size: int = 4,
        family_spread: float = 0.3,
        noise: float = 0.5,
        zipf_exponent: float = 1.0,
        split: str = "train",
        num_components: int = 64,
        latent_dim: int = 64,
        max_frequency: float = 8.0,
        max_shift: float = 0.125,
        device: torch.device | str | None = None,
    ):
        check_int("image_size", image_size, 1)
        check_int("num_components", num_components, 1)
        _check_float("noise", noise)
        _check_float("max_frequency", max_frequency)
        _check_float("max_shift", max_shift)
        # The class side: labels, latents and latent -> coefficients, noise-free.
        self._classes = ProceduralFeatures(
            num_classes,
            num_components,
            seed=seed,
            family_size=family_size,
            family_spread=family_spread,
            noise=0.0,
            zipf_exponent=zipf_exponent,
            split=split,
            latent_dim=latent_dim,
            device=device,
        )
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed
        self.noise = float(noise)
        self.max_shift = float(max_shift)
        self.split = split
        self.device = self._classes.device
        self._frequencies, self._basis = _fourier_basis(seed, image_size, num_components, max_frequency, self.device)
        self._gain = _tanh_gain(_CONTRAST)

    def labels(self, indices: torch.Tensor) -> torch.Tensor:
        """Class id (int64) of each sample index."""
        return self._classes.labels(indices)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)``: B x 3 x S x S float32 and B int64, on ``self.device``."""
        _check_index_tensor("indices", indices)
        coefficients, labels = self._classes.batch(indices)
        ids = (
            indices.to(self.device, torch.int64, non_blocking=True) + _SPLIT_OFFSET[self.split]
        )  # a blocking copy would sync
        shift = torch.stack([counter_uniform(self.seed, stream, ids) for stream in (_SHIFT_Y, _SHIFT_X)], dim=-1)
        shift = shift.float().mul_(2.0).sub_(1.0).mul_(self.max_shift)
        images = self._render(coefficients, shift)
        if self.noise > 0:
            pixels = 3 * self.image_size**2
            noise = counter_normal(self.seed, _PIXEL_NOISE, ids, pixels)
            images.add_(noise.view_as(images), alpha=self.noise)
        return images, labels

    def render(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Noise-free, unshifted images (len(class_ids) x 3 x S x S) of the given classes."""
        return self._render(self._classes.render(self._classes.class_latents(class_ids)))

    def _render(self, coefficients: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        if shift is None:
            mix = torch.cat((coefficients, torch.zeros_like(coefficients)), dim=1)
        else:
            # Translating by d turns wave k's phase by psi = -2 pi f_k . d, and
            # cos(t + psi) = cos(t) cos(psi) - sin(t) sin(psi): the shift only changes
            # the mixing weights, never costing a pass over the pixels.
            psi = (shift @ self._frequencies.T).mul_(-2.0 * math.pi)
            mix = torch.cat((coefficients * psi.cos(), coefficients * psi.sin().neg_()), dim=1)
        images = torch.tanh((mix @ self._basis).mul_(_CONTRAST)).mul_(self._gain)
        return images.view(len(coefficients), 3, self.image_size, self.image_size)
