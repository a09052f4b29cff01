"""Masks on the model side: MAE's keep/restore indices, and a batch's mask (or one drawn here).

The masks themselves are drawn per sample by the data pipeline (`data.masks`); an
objective called directly, without `batch["mask"]`, draws them from torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data.masks import draw_masks
from data.needs import MaskSpec


@dataclass
class RandomMask:
    """Per-sample random masking (MAE, Sec. 3): shuffle patches, keep the first K."""

    keep_idx: torch.Tensor  # (B, K) indices of visible patches, in shuffled order
    mask: torch.Tensor  # (B, N) 1 = masked (removed), 0 = visible, in the original order
    restore_idx: torch.Tensor  # (B, N) argsort of the shuffle: un-shuffles decoder tokens


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> RandomMask:
    """Mask round(N * mask_ratio) patches per sample, chosen uniformly without replacement."""
    num_keep = int(num_patches * (1 - mask_ratio))
    if not 0 < num_keep < num_patches:
        raise ValueError(f"mask_ratio={mask_ratio} leaves {num_keep} of {num_patches} patches visible")
    noise = torch.rand(batch, num_patches, generator=generator, device=device)  # (B, N)
    shuffle_idx = torch.argsort(noise, dim=1)  # ascending: smallest noise is kept
    restore_idx = torch.argsort(shuffle_idx, dim=1)
    keep_idx = shuffle_idx[:, :num_keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, restore_idx)
    return RandomMask(keep_idx=keep_idx, mask=mask, restore_idx=restore_idx)


def masking_from_mask(mask: torch.Tensor) -> RandomMask:
    """The gather indices of a given (B, N) bool mask (True = masked) with the same count per row.

    Visible patches are kept in ascending position order (the encoder does not care
    about the order of its tokens; the decoder restores the original order).
    """
    counts = mask.sum(dim=1)
    if mask.ndim != 2 or bool((counts != counts[0]).any()):
        raise ValueError(f"mask must be (B, N) with the same number of masked patches per row; got {tuple(mask.shape)}")
    num_keep = mask.shape[1] - int(counts[0])
    # Stable sort on the mask value: visible (0) first, each group in position order.
    shuffle_idx = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    restore_idx = torch.argsort(shuffle_idx, dim=1)
    return RandomMask(keep_idx=shuffle_idx[:, :num_keep], mask=mask.float(), restore_idx=restore_idx)


def batch_mask(
    batch: dict[str, Any], spec: MaskSpec, grid: tuple[int, int], device: torch.device, *, patch_size: int = 1
) -> torch.Tensor:
    """(B, N) bool mask of a batch: `batch["mask"]` (drawn by the data pipeline), else one drawn for `spec`."""
    mask = batch.get("mask")
    if mask is None:
        mask = draw_masks(spec, batch["views"][0].shape[0], grid, device, patch_size=patch_size)
    return mask.to(device=device, dtype=torch.bool)
