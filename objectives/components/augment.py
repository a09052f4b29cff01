"""Photometric view augmentations of SimCLR / BYOL / MoCo v3, per sample on a batch, in torch.

The data pipeline crops and flips (RandomResizedCrop + horizontal flip on uint8) and
normalises with data.mean/std; the colour part of the recipes runs here, on the
training device, one random draw per sample, vectorised over the batch:

    un-normalise to [0, 1] -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p)
    -> solarise (p) -> re-normalise

the order of torchvision's pipeline in moco-v3 main_moco.py (`augmentation1/2`, BYOL's
recipe) and of SimCLR's data_util.py. Each op follows torchvision's functional op of
the same name on a single image (`torchvision.transforms.v2.functional`): brightness,
contrast (towards the mean of the grayscale image), saturation (towards the grayscale
image) and hue (a shift in HSV) in a random order per sample, as `ColorJitter` does;
grayscale with ITU-R 601 weights; separable Gaussian blur with reflect padding;
solarisation x >= 0.5 -> 1 - x (BYOL; the same as PIL's threshold 128 on uint8 pixels).

Random numbers come from torch's global CPU generator (the training loop seeds it per
micro-step, so a resumed run draws the same), a fixed number per sample whatever the
outcome; work is done in float32 on the input's device, the output has the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from objectives.configs import ViewAugmentConfig

# Blur sigmas are given in pixels of a 224-px image (SimCLR, BYOL, MoCo v3) and scale with the image side.
BLUR_REFERENCE_SIZE = 224
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
SOLARIZE_THRESHOLD = 0.5


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) for broadcasting over images."""
    return values.view(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> luma (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, clamped to [0, 1]; factor (B,)."""
    return (x * _per_sample(factor)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean of the grayscale image: f * x + (1 - f) * mean, clamped; factor (B,)."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    f = _per_sample(factor)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image: f * x + (1 - f) * gray, clamped; factor (B,)."""
    f = _per_sample(factor)
    return (f * x + (1 - f) * rgb_to_grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 1) (hexcone model; hue 0 where max = min)."""
    r, g, b = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    gray = chroma == 0
    safe = torch.where(gray, torch.ones_like(chroma), chroma)
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    # Which channel is the maximum decides the sector; ties go to red, then green (as torchvision).
    hue = torch.where(
        value == r,
        ((g - b) / safe) % 6,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(gray, torch.zeros_like(hue), hue / 6)
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) HSV (hue in [0, 1)) -> RGB: channel_n = v - v * s * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    hue, saturation, value = x.unbind(dim=1)
    channels = []
    for n in (5.0, 3.0, 1.0):  # red, green, blue
        k = (n + 6 * hue) % 6
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, dim=1).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` (B,) turns, in [-0.5, 0.5]."""
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-d Gaussian kernels (B, K) on taps -(K-1)/2 .. (K-1)/2, as torchvision's gaussian_blur."""
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=sigma.dtype)  # (K,)
    weights = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)  # (B, K)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur of each image with its own sigma (B,), odd kernel_size, reflect padding."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    b, c, h, w = x.shape
    pad = kernel_size // 2
    kernels = gaussian_kernels(sigma.to(x.dtype), kernel_size).repeat_interleave(c, dim=0)  # (B*C, K)
    planes = x.reshape(1, b * c, h, w)
    planes = F.conv2d(F.pad(planes, (pad, pad, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=b * c)
    planes = F.conv2d(F.pad(planes, (0, 0, pad, pad), mode="reflect"), kernels[:, None, :, None], groups=b * c)
    return planes.reshape(b, c, h, w)


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Invert the pixels at or above `threshold`: where(x >= t, 1 - x, x)."""
    return torch.where(x >= threshold, 1 - x, x)


def blur_kernel_size(img_size: int, sigma_max: float) -> int:
    """Odd kernel covering +-3 sigma of the largest sigma (in pixels), at most the image side."""
    radius = max(1, math.ceil(3 * sigma_max))
    radius = min(radius, max(1, (img_size - 1) // 2))
    return 2 * radius + 1


class ViewAugment:
    """The photometric part of one view's recipe, applied per sample to a normalised batch.

    `ViewAugment(cfg, mean, std)(images)`: images (B, 3, H, W) normalised with mean/std ->
    augmented images, normalised the same way, same dtype and device.
    """

    def __init__(self, cfg: ViewAugmentConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        problems = cfg.problems("augment")
        if problems:
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
        self.cfg = cfg
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def _ranges(self) -> list[tuple[float, float]]:
        """Uniform ranges of the four jitter factors (torchvision ColorJitter)."""
        c = self.cfg
        return [
            (max(0.0, 1 - c.brightness), 1 + c.brightness),
            (max(0.0, 1 - c.contrast), 1 + c.contrast),
            (max(0.0, 1 - c.saturation), 1 + c.saturation),
            (-c.hue, c.hue),
        ]

    def draw(self, batch: int) -> dict[str, torch.Tensor]:
        """All random parameters of a batch, from torch's global CPU generator, in a fixed order."""
        c = self.cfg
        u = torch.rand(batch, 13)  # one row of draws per sample
        lo, hi = torch.tensor(self._ranges()).unbind(dim=1)  # (4,), (4,)
        sigma_lo, sigma_hi = c.blur_sigma
        return {
            "jitter": u[:, 0] < c.jitter_prob,
            "order": torch.argsort(u[:, 1:5], dim=1),  # a random permutation of the 4 ops per sample
            "factors": lo + (hi - lo) * u[:, 5:9],  # (B, 4): brightness, contrast, saturation, hue
            "gray": u[:, 9] < c.grayscale_prob,
            "blur": u[:, 10] < c.blur_prob,
            "sigma": sigma_lo + (sigma_hi - sigma_lo) * u[:, 11],
            "solarize": u[:, 12] < c.solarize_prob,
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        params = {k: v.to(images.device) for k, v in self.draw(images.shape[0]).items()}
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        x = (images.float() * std + mean).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
        x = self.apply(x, params)
        return ((x - mean) / std).to(images.dtype)

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ops on [0, 1] images with drawn parameters (see `draw`)."""
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        x = x.clone()
        jitter, order, factors = params["jitter"], params["order"], params["factors"]
        for slot in range(4):
            for op_index, op in enumerate(ops):
                idx = (jitter & (order[:, slot] == op_index)).nonzero().flatten()
                if idx.numel():
                    x[idx] = op(x[idx], factors[idx, op_index])
        idx = params["gray"].nonzero().flatten()
        if idx.numel():
            x[idx] = rgb_to_grayscale(x[idx]).expand(-1, 3, -1, -1)
        idx = params["blur"].nonzero().flatten()
        if idx.numel():
            scale = x.shape[-1] / BLUR_REFERENCE_SIZE
            size = blur_kernel_size(min(x.shape[-2:]), self.cfg.blur_sigma[1] * scale)
            x[idx] = gaussian_blur(x[idx], params["sigma"][idx] * scale, size)
        idx = params["solarize"].nonzero().flatten()
        if idx.numel():
            x[idx] = solarize(x[idx])
        return x
