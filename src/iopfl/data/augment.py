"""Training-time augmentation of whole batches, on the batch's own device.

Every transform works on a batch at once: one ``affine_grid`` + ``grid_sample`` warps all samples
(flips, quarter turns, scale, rotation and shift folded into one matrix per sample), masks follow the
same grid with nearest sampling, and the photometric changes are broadcast per-sample factors. All
randomness comes from the ``torch.Generator`` the caller passes (local training's per seed/round/site
generator), so a resumed run draws exactly what an uninterrupted one draws.

Inputs are z-scored per image, so intensity changes are defined in that space: brightness shifts by
a fraction of one standard deviation, contrast scales about the mean (0), gamma acts on the sample's
own [min, max] range mapped to [0, 1]. The same geometric transform applies to every channel, which
keeps the 2.5D prostate input's three neighbouring slices aligned; per-channel colour jitter applies
only when the channels are colours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from iopfl.seeding import normal_on

#: largest shift, as a fraction of the image side (small: polyps and organs sit anywhere in the frame)
TRANSLATE = 0.05
#: the largest blur σ in pixels per unit of intensity strength (strength 0.2 → 1 px)
BLUR_PER_STRENGTH = 5.0


@dataclass(frozen=True)
class AugmentSettings:
    """The ``standard`` recipe's knobs.

    ``scale``: zoom drawn log-uniformly from [1/(1+scale), 1+scale]; ``rotate``: degrees, uniform in
    ±rotate (on top of a random quarter turn); ``intensity``: photometric strength (0 turns brightness,
    contrast, gamma, colour, noise and blur off); ``colour``: channels are colours (RGB), not slices.
    """

    scale: float = 0.15
    rotate: float = 15.0
    intensity: float = 0.2
    colour: bool = False


def _uniform(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """U[0, 1) of ``shape`` from ``generator`` (a CPU generator: small draws are made there and moved)."""
    return torch.rand(shape, generator=generator).to(device)


def _signed(generator: torch.Generator, n: int, device: torch.device) -> torch.Tensor:
    """U[-1, 1) ``[n]``."""
    return 2.0 * _uniform(generator, (n,), device) - 1.0


def affine_matrices(
    n: int, height: int, width: int, settings: AugmentSettings, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``[n, 2, 3]`` sampling matrices for ``F.affine_grid``: random h/v flips, quarter turns, zoom,
    rotation and shift. The rotation is composed in pixel units (D⁻¹·A·D, D = half the side lengths) so
    that a non-square image is rotated, not sheared."""
    u = _uniform(generator, (n, 7), device)
    flips = torch.where(u[:, :2] < 0.5, -1.0, 1.0)  # [n, 2]
    turns = torch.floor(4 * u[:, 2]).clamp(max=3) * (math.pi / 2)
    log_zoom = math.log1p(settings.scale) * (2 * u[:, 3] - 1)
    angle = turns + math.radians(settings.rotate) * (2 * u[:, 4] - 1)
    shift = 2 * TRANSLATE * (2 * u[:, 5:7] - 1)  # normalised units
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [n, 2, 2]
    linear = rot * torch.exp(log_zoom)[:, None, None] * flips[:, None, :]
    half = torch.tensor([width / 2, height / 2], device=device)
    linear = linear * half[None, None, :] / half[None, :, None]  # D⁻¹·A·D
    return torch.cat([linear, shift[:, :, None]], dim=2)


def warp(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``images [B, C, H, W]`` (bilinear) and ``masks [B, H, W]`` (nearest, so labels are never
    blended) through the same ``theta [B, 2, 3]``; outside the frame the image is 0 (the mean of a
    z-scored image) and the mask is background."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(
        masks[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return warped, labels[:, 0].round().to(masks.dtype)


def intensity(images: torch.Tensor, strength: float, colour: bool, generator: torch.Generator) -> torch.Tensor:
    """Gamma, contrast and brightness per sample, plus light per-channel gain/offset when ``colour``;
    ``images [B, C, H, W]`` z-scored. Strength s: γ and contrast in [e^-s, e^s], brightness ±s."""
    b, c = images.shape[:2]
    dev = images.device
    gamma, contrast, brightness = (
        torch.exp(strength * _signed(generator, b, dev)),
        torch.exp(strength * _signed(generator, b, dev)),
        strength * _signed(generator, b, dev),
    )
    lo = images.amin(dim=(1, 2, 3), keepdim=True)
    span = (images.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    out = lo + ((images - lo) / span).clamp_min(0) ** gamma[:, None, None, None] * span
    out = out * contrast[:, None, None, None] + brightness[:, None, None, None]
    if colour:
        jitter = (strength / 2) * (2 * _uniform(generator, (b, c, 2), dev) - 1)  # [B, C, (gain, offset)]
        out = out * torch.exp(jitter[..., 0])[..., None, None] + jitter[..., 1, None, None]
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of ``images [B, C, H, W]`` with one σ per sample (``sigma [B]`` px, 0 =
    unchanged), as one grouped convolution per axis over all B·C planes; edges replicated."""
    b, c, h, w = images.shape
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigma.clamp_min(1e-6)[:, None] ** 2))  # [B, 2r+1]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B·C, 2r+1]
    planes = images.reshape(1, b * c, h, w)
    planes = F.conv2d(F.pad(planes, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    planes = F.conv2d(F.pad(planes, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return planes.reshape(b, c, h, w)


def noise_and_blur(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Half the samples (drawn) get Gaussian noise of σ ∈ [0, s/2] (z-score units), half a Gaussian blur
    of σ ∈ [0, 5·s] px; ``images [B, C, H, W]``."""
    b = images.shape[0]
    dev = images.device
    u = _uniform(generator, (b, 4), dev)
    noise_sigma = torch.where(u[:, 0] < 0.5, strength / 2 * u[:, 1], 0.0)
    blur_sigma = torch.where(u[:, 2] < 0.5, BLUR_PER_STRENGTH * strength * u[:, 3], 0.0)
    noisy = images + noise_sigma[:, None, None, None] * normal_on(tuple(images.shape), generator, dev)
    radius = math.ceil(3 * BLUR_PER_STRENGTH * strength)
    return gaussian_blur(noisy, blur_sigma, radius) if radius > 0 else noisy


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, settings: AugmentSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``standard`` recipe on a training batch: ``images [B, C, H, W]`` float, ``masks [B, H, W]``
    integer class maps → the same shapes and dtypes, on the input's device."""
    height, width = images.shape[-2:]
    theta = affine_matrices(len(images), height, width, settings, generator, images.device)
    images, masks = warp(images, masks, theta)
    images = intensity(images, settings.intensity, settings.colour, generator)
    return noise_and_blur(images, settings.intensity, generator), masks
