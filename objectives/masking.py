"""Mask generators shared by the masked-modeling objectives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from objectives.base import MaskSpec


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


def random_patch_mask(grid: tuple[int, int], generator: torch.Generator, *, ratio: float) -> torch.Tensor:
    """(N,) bool, True = masked: N - int(N * (1 - ratio)) patches chosen uniformly (MAE's count rule)."""
    n = grid[0] * grid[1]
    num_keep = int(n * (1 - ratio))
    if not 0 < num_keep < n:
        raise ValueError(f"mask ratio {ratio} leaves {num_keep} of {n} patches visible")
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:num_keep]] = False
    return mask


# kind -> generator(grid, generator, *, ratio) -> (N,) bool. Module-level functions, so
# that the partials built from them pickle into DataLoader worker processes.
MASK_GENERATORS: dict[str, Callable[..., torch.Tensor]] = {"random": random_patch_mask}


def mask_generator(spec: MaskSpec) -> Callable[[tuple[int, int], torch.Generator], torch.Tensor]:
    """`make(grid, generator) -> (N,) bool` for a MaskSpec (picklable)."""
    if spec.kind not in MASK_GENERATORS:
        raise ValueError(f"unknown mask kind {spec.kind!r}; known: {', '.join(sorted(MASK_GENERATORS))}")
    return partial(MASK_GENERATORS[spec.kind], ratio=spec.ratio)
