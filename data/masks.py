"""Per-sample patch masks, drawn in the loader workers (or from torch's global RNG for direct calls).

Generators are module-level functions `make(grid, generator, *, ratio) -> (N,) bool` (True =
masked), so that the partials built from them pickle into DataLoader worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from data.needs import MaskSpec


def random_patch_mask(grid: tuple[int, int], generator: torch.Generator, *, ratio: float) -> torch.Tensor:
    """(N,) bool, True = masked: N - int(N * (1 - ratio)) patches chosen uniformly (MAE's count rule)."""
    n = grid[0] * grid[1]
    num_keep = int(n * (1 - ratio))
    if not 0 < num_keep < n:
        raise ValueError(f"mask ratio {ratio} leaves {num_keep} of {n} patches visible")
    mask = torch.ones(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:num_keep]] = False
    return mask


# BEiT's block-wise masking (BEiT v2 masking_generator.py, PRETRAINING.md): 75 of 196
# patches, blocks of at least 16 patches, aspect ratio in [0.3, 1 / 0.3].
BLOCK_MIN_PATCHES_AT_196 = 16
BLOCK_MIN_ASPECT = 0.3
# Draws per block before the block loop gives up and tops up with single patches.
_BLOCK_TRIES = 10


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform int in [0, high]."""
    return int(torch.randint(high + 1, (), generator=generator))


def block_patch_mask_with_blocks(
    grid: tuple[int, int],
    generator: torch.Generator,
    *,
    ratio: float,
    min_patches: int | None = None,
    min_aspect: float = BLOCK_MIN_ASPECT,
) -> tuple[torch.Tensor, list[tuple[int, int, int, int]], int]:
    """Block-wise mask: (mask (N,) bool, blocks [(top, left, h, w)], patches added by the top-up).

    Exactly round(N * ratio) patches are masked. Rectangles are added while they
    fit: target area uniform in [min_patches, still missing], aspect h / w
    log-uniform in [min_aspect, 1 / min_aspect]; a rectangle is kept only if its
    rounded h x w has >= min_patches patches, its aspect is within the bounds, and
    it masks between 1 and the missing count of new patches. When no rectangle
    fits in `_BLOCK_TRIES` draws, the rest is topped up with random single patches
    (as the BEiT v2 generator does to hit the exact count). min_patches defaults
    to 16 at a 14 x 14 grid, scaled with the grid area (at least 1).
    """
    height, width = grid
    n = height * width
    target = round(n * ratio)
    if not 0 < target < n:
        raise ValueError(f"block mask ratio {ratio} masks {target} of {n} patches; need 0 < count < {n}")
    if min_patches is None:
        min_patches = max(1, round(BLOCK_MIN_PATCHES_AT_196 * n / 196))
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    max_aspect = 1 / min_aspect
    mask = torch.zeros(height, width, dtype=torch.bool)
    blocks: list[tuple[int, int, int, int]] = []
    count = 0
    while count < target:
        missing = target - count
        placed = False
        for _ in range(_BLOCK_TRIES):
            area = _uniform(generator, min_patches, max(min_patches, missing))
            aspect = math.exp(_uniform(generator, math.log(min_aspect), math.log(max_aspect)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= h <= height and 1 <= w <= width and h * w >= min_patches):
                continue
            if not min_aspect <= h / w <= max_aspect:
                continue
            top, left = _randint(generator, height - h), _randint(generator, width - w)
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= missing:
                mask[top : top + h, left : left + w] = True
                blocks.append((top, left, h, w))
                count += new
                placed = True
                break
        if not placed:
            break
    topped_up = target - count
    if topped_up:
        free = (~mask).flatten().nonzero().squeeze(1)
        chosen = free[torch.randperm(free.numel(), generator=generator)[:topped_up]]
        mask.view(-1)[chosen] = True
    return mask.flatten(), blocks, topped_up


def block_patch_mask(grid: tuple[int, int], generator: torch.Generator, *, ratio: float) -> torch.Tensor:
    """(N,) bool, True = masked: BEiT's block-wise mask of exactly round(N * ratio) patches."""
    return block_patch_mask_with_blocks(grid, generator, ratio=ratio)[0]


def group_patch_mask(grid: tuple[int, int], generator: torch.Generator, *, ratio: float, group: int) -> torch.Tensor:
    """(N,) bool, True = masked: ceil(G * ratio) of the G square groups of `group` x `group` patches,
    chosen uniformly (SimMIM's MaskGenerator: 32-px groups over 4- or 16-px patches, ratio 0.6)."""
    rows, cols = grid
    if group < 1 or rows % group or cols % group:
        raise ValueError(f"mask groups of {group} patches do not tile the {rows}x{cols} patch grid")
    g_rows, g_cols = rows // group, cols // group
    n = g_rows * g_cols
    count = math.ceil(n * ratio)
    if not 0 < count < n:
        raise ValueError(f"mask ratio {ratio} masks {count} of {n} patch groups")
    groups = torch.zeros(n, dtype=torch.bool)
    groups[torch.randperm(n, generator=generator)[:count]] = True
    per_patch = groups.view(g_rows, g_cols).repeat_interleave(group, 0).repeat_interleave(group, 1)
    return per_patch.flatten()


# I-JEPA's multi-block masks (facebookresearch/ijepa src/masks/multiblock.py, configs/in1k_*.yaml):
# 4 target blocks of 15-20% of the patches, aspect 0.75-1.5; one context block of 85-100%,
# aspect 1, with every target patch removed; at least 10 context patches at a 14 x 14 grid.
MULTIBLOCK_TARGETS = 4
MULTIBLOCK_TARGET_SCALE = (0.15, 0.2)
MULTIBLOCK_TARGET_ASPECT = (0.75, 1.5)
MULTIBLOCK_CONTEXT_SCALE = (0.85, 1.0)
MULTIBLOCK_MIN_KEEP_AT_196 = 10
# Context draws before falling back to every patch outside the targets.
_CONTEXT_TRIES = 20


def _block_size(
    grid: tuple[int, int], generator: torch.Generator, scale: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int]:
    """(h, w) of a block of about scale x N patches and aspect h / w, smaller than the grid on both sides
    (the official `_sample_block_size`: round(sqrt(area x aspect)), round(sqrt(area / aspect)))."""
    height, width = grid
    area = int(height * width * _uniform(generator, *scale))
    ratio = _uniform(generator, *aspect)
    h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    return max(1, min(h, height - 1)), max(1, min(w, width - 1))


def _place(grid: tuple[int, int], generator: torch.Generator, h: int, w: int) -> torch.Tensor:
    """(H, W) bool with one h x w block at a uniform top-left corner."""
    height, width = grid
    top, left = _randint(generator, height - h), _randint(generator, width - w)
    block = torch.zeros(height, width, dtype=torch.bool)
    block[top : top + h, left : left + w] = True
    return block


def multiblock_mask(
    grid: tuple[int, int],
    generator: torch.Generator,
    *,
    targets: int = MULTIBLOCK_TARGETS,
    target_scale: tuple[float, float] = MULTIBLOCK_TARGET_SCALE,
    target_aspect: tuple[float, float] = MULTIBLOCK_TARGET_ASPECT,
    context_scale: tuple[float, float] = MULTIBLOCK_CONTEXT_SCALE,
    min_keep: int | None = None,
) -> torch.Tensor:
    """I-JEPA's masks as (1 + targets, N) bool, True = masked: row 0 hides from the context encoder
    every patch outside the context block and every target patch; row t >= 1 marks target block t
    (the patches whose features the predictor regresses).

    Block sizes: area uniform in `scale` x N, aspect h / w uniform in the range, each side at most
    the grid side - 1. Targets may overlap one another, never the context. The context block
    (aspect 1) is redrawn until at least `min_keep` of its patches lie outside the targets
    (`_CONTEXT_TRIES` draws; then every non-target patch is the context). min_keep defaults to
    10 at a 14 x 14 grid, scaled with the grid area (at least 1).
    """
    height, width = grid
    n = height * width
    if targets < 1:
        raise ValueError(f"multi-block masks need at least one target block, got {targets}")
    for name, (low, high) in (("target_scale", target_scale), ("context_scale", context_scale)):
        if not 0 < low <= high <= 1:
            raise ValueError(f"{name} must be 0 < low <= high <= 1, got {(low, high)}")
    if min_keep is None:
        min_keep = max(1, round(MULTIBLOCK_MIN_KEEP_AT_196 * n / 196))
    blocks = [
        _place(grid, generator, *_block_size(grid, generator, target_scale, target_aspect)) for _ in range(targets)
    ]
    covered = torch.stack(blocks).any(dim=0)  # (H, W): any target
    if int((~covered).sum()) < 1:
        raise ValueError(f"the {targets} target blocks cover the whole {height}x{width} grid; no context is left")
    context = None
    for _ in range(_CONTEXT_TRIES):
        candidate = _place(grid, generator, *_block_size(grid, generator, context_scale, (1.0, 1.0))) & ~covered
        if int(candidate.sum()) >= min_keep:
            context = candidate
            break
    if context is None:
        context = ~covered
    return torch.stack([~context, *blocks]).flatten(1)


# kind -> generator(grid, generator, *, ratio[, group]) -> (N,) bool, or (K, N) bool for a kind
# with several masks per sample ("multiblock"). Module-level functions, so that the partials
# built from them pickle into DataLoader worker processes.
MASK_GENERATORS: dict[str, Callable[..., torch.Tensor]] = {
    "random": random_patch_mask,
    "block": block_patch_mask,
    "group": group_patch_mask,
    "multiblock": multiblock_mask,
}


def repeated_mask(
    grid: tuple[int, int], generator: torch.Generator, *, make: Callable[..., torch.Tensor], count: int
) -> torch.Tensor:
    """`count` independent draws of `make`, stacked: (count, N) bool."""
    return torch.stack([make(grid, generator) for _ in range(count)])


def mask_generator(spec: MaskSpec, patch_size: int = 1) -> Callable[[tuple[int, int], torch.Generator], torch.Tensor]:
    """`make(grid, generator) -> (N,) bool` for a MaskSpec on a model of `patch_size` px patches (picklable);
    (count, N) when the spec asks for several masks per sample."""
    if spec.count < 1:
        raise ValueError(f"a mask spec needs count >= 1, got {spec.count}")
    if spec.count > 1:
        return partial(repeated_mask, make=mask_generator(replace(spec, count=1), patch_size), count=spec.count)
    if spec.kind not in MASK_GENERATORS:
        raise ValueError(f"unknown mask kind {spec.kind!r}; known: {', '.join(sorted(MASK_GENERATORS))}")
    if spec.kind == "group":
        if spec.group_px < patch_size or spec.group_px % patch_size:
            raise ValueError(f"mask groups of {spec.group_px} px are not a multiple of the {patch_size}-px patches")
        return partial(group_patch_mask, ratio=spec.ratio, group=spec.group_px // patch_size)
    if spec.kind == "multiblock":  # ratio is not used: the block scales say how much is hidden
        return partial(multiblock_mask, targets=spec.targets)
    return partial(MASK_GENERATORS[spec.kind], ratio=spec.ratio)


def draw_masks(
    spec: MaskSpec, batch: int, grid: tuple[int, int], device: torch.device | str = "cpu", *, patch_size: int = 1
) -> torch.Tensor:
    """(B, N) bool masks of `spec` seeded from torch's global RNG ((B, K, N) for a kind with K masks per sample).

    For direct calls of an objective without `batch["mask"]`; in training the data
    pipeline draws them, seeded per sample.
    """
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    make = mask_generator(spec, patch_size)
    return torch.stack([make(grid, generator) for _ in range(batch)]).to(device)
