"""Mask generators (data.masks): MAE's random mask and BEiT's block-wise mask, by their statistics over many draws."""

from __future__ import annotations

import pickle

import pytest
import torch

from data.masks import BLOCK_MIN_ASPECT, block_patch_mask_with_blocks, mask_generator, random_patch_mask
from data.needs import MaskSpec


def neighbour_rate(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean fraction of a masked patch's 4-neighbours (inside the grid) that are masked."""
    m = mask.view(grid).float()
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    inside = torch.nn.functional.pad(torch.ones_like(m), (1, 1, 1, 1))
    shifts = [(0, 1), (0, -1), (1, 0), (-1, 0)]
    masked_nb = sum(torch.roll(padded, s, dims=(0, 1))[1:-1, 1:-1] for s in shifts)
    total_nb = sum(torch.roll(inside, s, dims=(0, 1))[1:-1, 1:-1] for s in shifts)
    return float((masked_nb / total_nb)[m.bool()].mean())


@pytest.mark.parametrize(
    ("grid", "ratio", "min_patches"),
    [((14, 14), 75 / 196, 16), ((16, 16), 0.4, 21), ((7, 7), 0.4, 4), ((4, 4), 0.5, 1)],
    ids=["beitv2-14x14-75", "16x16", "7x7", "4x4"],
)
def test_block_mask_count_block_sizes_and_aspects(grid: tuple[int, int], ratio: float, min_patches: int) -> None:
    """BEiT v2 recipe: exactly round(N * ratio) masked; every block >= min patches (16 at 14x14, scaled
    with the grid) with aspect h / w in [0.3, 1 / 0.3]; blocks cover everything but the top-up."""
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    target = round(n * ratio)
    topped, rates = [], []
    for _ in range(500):
        mask, blocks, topped_up = block_patch_mask_with_blocks(grid, g, ratio=ratio)
        assert mask.shape == (n,) and mask.dtype == torch.bool and int(mask.sum()) == target
        covered = torch.zeros(grid, dtype=torch.bool)
        for top, left, h, w in blocks:
            assert h * w >= min_patches
            assert BLOCK_MIN_ASPECT - 1e-9 <= h / w <= 1 / BLOCK_MIN_ASPECT + 1e-9
            assert 0 <= top and top + h <= grid[0] and 0 <= left and left + w <= grid[1]
            covered[top : top + h, left : left + w] = True
        assert int(covered.sum()) == target - topped_up
        assert bool(mask[covered.flatten()].all())
        topped.append(topped_up / target)
        rates.append(neighbour_rate(mask, grid))
    if grid == (14, 14):
        # Blocks do nearly all the work at the paper's setting; the top-up is the remainder.
        assert sum(topped) / len(topped) < 0.1
        # Block masks are clumped: a masked patch's neighbours are masked far more often than at random.
        g2 = torch.Generator().manual_seed(1)
        random_rates = [neighbour_rate(random_patch_mask(grid, g2, ratio=1 - 121 / 196), grid) for _ in range(200)]
        assert sum(rates) / len(rates) > sum(random_rates) / len(random_rates) + 0.3


def test_block_mask_is_a_function_of_the_generator_and_differs_across_draws() -> None:
    make = mask_generator(MaskSpec("block", 75 / 196))
    a = make((14, 14), torch.Generator().manual_seed(5))
    b = make((14, 14), torch.Generator().manual_seed(5))
    c = make((14, 14), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Loader workers receive the generator by pickling.
    again = pickle.loads(pickle.dumps(make))
    assert torch.equal(again((14, 14), torch.Generator().manual_seed(5)), a)


def test_block_mask_reaches_every_position() -> None:
    """Over many draws every position is masked sometimes. Uniformly placed blocks cover the
    centre more often than the corners (~5% vs ~60% here), as in BEiT's generator."""
    g = torch.Generator().manual_seed(3)
    freq = torch.stack([block_patch_mask_with_blocks((14, 14), g, ratio=75 / 196)[0] for _ in range(2000)]).float()
    per_position = freq.mean(0)
    assert float(per_position.min()) > 0.02 and float(per_position.max()) < 0.8
    assert abs(float(per_position.mean()) - 75 / 196) < 1e-6


def test_bad_mask_settings_are_refused() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="masks 0 of 16"):
        block_patch_mask_with_blocks((4, 4), g, ratio=0.01)
    with pytest.raises(ValueError, match="unknown mask kind 'nope'"):
        mask_generator(MaskSpec("nope", 0.5))


# --- I-JEPA's multi-block masks -------------------------------------------------------------


def _rectangle(block: torch.Tensor) -> tuple[int, int]:
    """(h, w) of a (H, W) bool mask that must be exactly one filled rectangle."""
    rows, cols = block.any(dim=1).nonzero().squeeze(1), block.any(dim=0).nonzero().squeeze(1)
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    assert int(block.sum()) == h * w and bool(block[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())
    return h, w


@pytest.mark.parametrize("grid", [(14, 14), (8, 8)], ids=["14x14", "8x8"])
def test_multiblock_targets_are_rectangles_and_the_context_avoids_them(grid: tuple[int, int]) -> None:
    from data.masks import multiblock_mask

    gen = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    min_keep = max(1, round(10 * n / 196))
    target_areas, context_counts = [], []
    for _ in range(300):
        masks = multiblock_mask(grid, gen)
        assert masks.shape == (5, n) and masks.dtype == torch.bool
        context = ~masks[0]
        targets = masks[1:]
        assert not (context & targets.any(dim=0)).any()  # never a target patch in the context
        assert int(context.sum()) >= min_keep
        for t in targets:
            h, w = _rectangle(t.view(grid))
            assert h < grid[0] and w < grid[1]  # each side at most the grid side - 1
            target_areas.append(h * w / n)
        context_counts.append(int(context.sum()) / n)
    # Areas drawn in 15-20% of the grid, then rounded to whole sides (coarser at 8 x 8).
    mean_area = sum(target_areas) / len(target_areas)
    assert 0.12 < mean_area < 0.24, mean_area
    assert 0.0 < sum(context_counts) / len(context_counts) < 0.85


def test_multiblock_context_block_by_hand_and_the_generator_spec() -> None:
    from data.masks import draw_masks, multiblock_mask

    # Targets of exactly 1 x 1 (area 1 of 16) and a full-size context block: the context is every
    # patch of the (3 x 3: sides at most 4 - 1) context block except the targets.
    gen = torch.Generator().manual_seed(3)
    masks = multiblock_mask(
        (4, 4), gen, targets=2, target_scale=(1 / 16, 1 / 16), target_aspect=(1.0, 1.0), context_scale=(1.0, 1.0)
    )
    targets = masks[1:].view(2, 4, 4)
    assert [int(t.sum()) for t in targets] == [1, 1]
    context = (~masks[0]).view(4, 4)
    covered = targets.any(dim=0)
    placements = []
    for top in range(2):
        for left in range(2):
            block = torch.zeros(4, 4, dtype=torch.bool)
            block[top : top + 3, left : left + 3] = True
            placements.append(torch.equal(context, block & ~covered))
    assert any(placements)  # the 3 x 3 context block somewhere, minus the target patches
    assert torch.equal(
        multiblock_mask((4, 4), torch.Generator().manual_seed(3)),
        multiblock_mask((4, 4), torch.Generator().manual_seed(3)),
    )
    drawn = draw_masks(MaskSpec("multiblock", 0.0, targets=3), 6, (8, 8))
    assert drawn.shape == (6, 4, 64)
    pickle.dumps(mask_generator(MaskSpec("multiblock", 0.0, targets=3)))  # goes into loader worker processes
    with pytest.raises(ValueError, match="at least one target"):
        multiblock_mask((4, 4), gen, targets=0)
    with pytest.raises(ValueError, match="target_scale"):
        multiblock_mask((4, 4), gen, target_scale=(0.3, 0.2))
