"""What an objective asks the data pipeline for: views and per-sample masks (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MaskSpec:
    """A patch mask the data pipeline draws per sample, in its loader workers.

    kind: a generator registered in `data.masks.MASK_GENERATORS` ("random": a uniform
    random subset, as MAE; "block": BEiT's block-wise mask; "group": a uniform random subset
    of square groups of patches, as SimMIM; "multiblock": I-JEPA's context block and
    `targets` target blocks, (1 + targets, N) per sample). ratio: fraction of patches (or
    groups) masked (unused by "multiblock"). group_px: side in pixels of a "group" kind's
    groups, a multiple of the model's patch size.
    """

    kind: str
    ratio: float
    group_px: int = 0
    targets: int = 0
    # Independent masks per sample (one per global crop: iBOT); above 1 the batch's mask is (B, count, N).
    count: int = 1


@dataclass(frozen=True)
class DataNeeds:
    """What an objective asks the data pipeline for.

    views: number of independently augmented crops of each image; a batch carries
    them as `batch["views"]`, a list of `views` tensors of shape (B, 3, H, W), followed by
    `local_views` smaller crops when asked for.
    mask: if set, a batch also carries `batch["mask"]`, a bool tensor (B, N) over
    the patch grid of the model (True = masked), drawn from the sample's seed ((B, K, N)
    for a kind with K masks per sample).
    """

    views: int = 1
    mask: MaskSpec | None = None
    # Multi-crop (DINO, iBOT): `local_views` more crops of `local_size` px with crop area in
    # `local_scale`, after the `views` global ones in `batch["views"]` (B, 3, local_size, local_size).
    local_views: int = 0
    local_size: int = 0
    local_scale: tuple[float, float] = (0.05, 0.4)
