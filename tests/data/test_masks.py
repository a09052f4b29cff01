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
