"""Augmented views: the per-image pipeline that turns one decoded image into N crops.

Order, cheapest first: RandomResizedCrop and the flip run on uint8 tensors
(torch's uint8 antialiased bicubic kernel: ~0.4 ms for a 300x280 -> 224 crop on
this project's 2-core machine, PIL's resize ~1.4 ms). Views leave the loader
workers as uint8 - a quarter of the bytes through shared memory - and are
converted to float and normalised a whole batch at a time in the main process
(`ToNormalizedFloat`). `scripts/bench_data.py` measures the whole path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from data.config import DataConfig

# RandomResizedCrop's default aspect-ratio range (w / h), as torchvision and MAE use it.
CROP_RATIO: tuple[float, float] = (3 / 4, 4 / 3)


class ChannelsLastResizedCrop(v2.RandomResizedCrop):
    """RandomResizedCrop with the same parameters (same RNG draws) whose uint8 kernel runs channels-last.

    torch's antialiased bicubic resize has a vectorised uint8 path for 4-D
    channels-last input; torchvision's kernel reaches it only for some strides.
    Here the crop is always laid out channels-last first (~0.3 ms instead of ~0.6 ms
    for a 300x280 -> 224 crop on this project's machine). Other inputs: torchvision's.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or inpt.dtype != torch.uint8 or inpt.ndim != 3:
            return super().transform(inpt, params)
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        crop = inpt.as_subclass(torch.Tensor)[:, top : top + height, left : left + width]  # (3, h, w)
        crop = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)  # (1, 3, h, w)
        out = torch.nn.functional.interpolate(crop, size=self.size, mode="bicubic", antialias=True)[0]
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


class ToNormalizedFloat(v2.Transform):
    """uint8 image(s) (..., C, H, W) -> float32 `(x / 255 - mean) / std`: v2.ToDtype(scale=True) then v2.Normalize, fused.

    Bit-identical to those two transforms (same operations in the same order) but
    one dispatch and one output allocation instead of two of each.
    """

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # (C, 1, 1)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # Like v2.ToDtype: images (tv_tensors.Image or plain tensors) only.
        if not (isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor):
            return inpt
        if inpt.dtype != torch.uint8:
            raise TypeError(f"ToNormalizedFloat expects a uint8 image, got {inpt.dtype}")
        out = inpt.as_subclass(torch.Tensor).to(torch.float32).mul_(1.0 / 255)
        out = out.sub_(self.mean).div_(self.std)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def build_view_transform(cfg: DataConfig, img_size: int, *, scale: tuple[float, float] | None = None) -> v2.Compose:
    """One view of a uint8 (3, H, W) image: RandomResizedCrop (bicubic) -> optional h-flip, still uint8.

    scale: the crop's area range, (data.crop_scale_min, 1) unless given (a multi-crop's local views).
    Validates mean/std too: `ToNormalizedFloat(cfg.mean, cfg.std)` completes the view, per batch.
    """
    if not 0.0 < cfg.crop_scale_min <= 1.0:
        raise ValueError(f"data.crop_scale_min must be in (0, 1], got {cfg.crop_scale_min}")
    scale = (cfg.crop_scale_min, 1.0) if scale is None else (float(scale[0]), float(scale[1]))
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"crop scale must be 0 < low <= high <= 1, got {scale}")
    if len(cfg.mean) != 3 or len(cfg.std) != 3 or min(cfg.std) <= 0:
        raise ValueError(f"data.mean and data.std need 3 values (RGB), std > 0; got mean={cfg.mean}, std={cfg.std}")
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    steps: list[v2.Transform] = [
        ChannelsLastResizedCrop(
            img_size,
            scale=scale,
            ratio=CROP_RATIO,
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        )
    ]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def draft_min_size(img_size: int, crop_scale_min: float, ratio: tuple[float, float] = CROP_RATIO) -> int:
    """Smallest short side an image may be decoded at so that no RandomResizedCrop of it is below `img_size`.

    torchvision's RandomResizedCrop (v2 `make_params`) on an H x W image draws a
    target area t in [s * H * W, H * W] and an aspect r = w / h in `ratio`, and
    crops w = round(sqrt(t r)), h = round(sqrt(t / r)); after 10 misses it falls
    back to a centre crop spanning the full width or height with its aspect clamped
    into `ratio`, whose short side (`ratio` holds 1) is the image's. A crop's
    shorter side is therefore at least

        min(round(sqrt(s * c * H * W)), min(H, W)),   c = min over r of min(r, 1 / r)

    (c = 3/4 for ratio (3/4, 4/3)). With min(H, W) >= m, H * W >= m^2, so every
    crop keeps >= img_size pixels on both sides when

        m >= img_size / sqrt(s * c)   and   m >= img_size,

    i.e. m = max(img_size, ceil(img_size / sqrt(s * c))): for 224 px, 579 at
    s = 0.2 (MAE), 366 at s = 0.5, 259 at s = 1. It is tight for square images
    (a crop of area s * m^2 and aspect 3/4 exists) and conservative by up to
    sqrt(W / H) for others.
    """
    if img_size < 1:
        raise ValueError(f"img_size must be >= 1, got {img_size}")
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
    if not 0.0 < ratio[0] <= 1.0 <= ratio[1]:
        # With 1 in the range, the fallback crop's short side is the image's short side.
        raise ValueError(f"ratio must be (low, high) with 0 < low <= 1 <= high, got {ratio}")
    # min(r, 1/r) is largest at r = 1, so over [low, high] its minimum is at an end.
    squareness = min(ratio[0], 1 / ratio[1])
    # The small tolerance keeps an exact quotient (e.g. 224 / sqrt(1 * 1)) from being
    # pushed up one pixel by float rounding.
    return max(img_size, math.ceil(img_size / math.sqrt(crop_scale_min * squareness) - 1e-9))


def make_views(
    image: Image.Image | torch.Tensor,
    transform: v2.Compose,
    num_views: int,
    seed: int,
    *,
    extra: tuple[tuple[v2.Compose, int], ...] = (),
) -> list[torch.Tensor]:
    """`num_views` independent augmentations of `image` (PIL, or a (3, H, W) uint8 tensor), each (3, S, S) uint8,
    then `count` of each (transform, count) in `extra` (a multi-crop's local views).

    A pure function of `seed`; the first `num_views` do not depend on `extra`.

    torchvision draws from the global torch RNG, so it is seeded here inside
    `fork_rng`: the caller's RNG state (the training loop's, when the loader runs
    in-process) is left untouched.
    """
    if isinstance(image, Image.Image):
        image = v2.functional.pil_to_tensor(image)
    pixels = tv_tensors.Image(image)  # (3, H, W) uint8
    with torch.random.fork_rng(devices=[]):
        # CPU generator only: torch.manual_seed would also seed (and lazily init) accelerators.
        torch.default_generator.manual_seed(seed)
        views = [transform(pixels).as_subclass(torch.Tensor) for _ in range(num_views)]
        for other, count in extra:
            views += [other(pixels).as_subclass(torch.Tensor) for _ in range(count)]
        return views
