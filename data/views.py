"""Augmented views: the per-image pipeline that turns one decoded image into N crops."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from data.config import DataConfig


def build_view_transform(cfg: DataConfig, img_size: int) -> v2.Compose:
    """One view: RandomResizedCrop (bicubic) -> optional h-flip -> float in [0, 1] -> Normalize."""
    if not 0.0 < cfg.crop_scale_min <= 1.0:
        raise ValueError(f"data.crop_scale_min must be in (0, 1], got {cfg.crop_scale_min}")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ValueError(f"data.mean and data.std need 3 values (RGB), std > 0; got mean={cfg.mean}, std={cfg.std}")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(
            img_size,
            scale=(cfg.crop_scale_min, 1.0),
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        )
    ]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(cfg.mean), std=list(cfg.std))]
    return v2.Compose(steps)


def make_views(image: Image.Image, transform: v2.Compose, num_views: int, seed: int) -> list[torch.Tensor]:
    """`num_views` independent augmentations of `image`, each (3, S, S) float32; a pure function of `seed`.

    torchvision draws from the global torch RNG, so it is seeded here inside
    `fork_rng`: the caller's RNG state (the training loop's, when the loader runs
    in-process) is left untouched.
    """
    pixels = tv_tensors.Image(v2.functional.pil_to_tensor(image))  # (3, H, W) uint8
    with torch.random.fork_rng(devices=[]):
        # CPU generator only: torch.manual_seed would also seed (and lazily init) accelerators.
        torch.default_generator.manual_seed(seed)
        return [transform(pixels).as_subclass(torch.Tensor) for _ in range(num_views)]
