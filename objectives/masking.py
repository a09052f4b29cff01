"""Mask generators shared by the masked-modeling objectives."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
