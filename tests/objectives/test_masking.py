"""Masks on the model side: keep/restore indices of a given mask, and a batch's mask or one drawn for it."""

from __future__ import annotations

import pytest
import torch

from data.masks import block_patch_mask
from data.needs import MaskSpec
from objectives.components.masking import batch_mask, masking_from_mask


def test_masking_from_a_given_mask_keeps_visible_patches_in_order() -> None:
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    m = masking_from_mask(mask)
    assert m.keep_idx.tolist() == [[1, 3], [0, 1]]
    assert torch.equal(m.mask, mask.float())
    shuffled = torch.cat([m.keep_idx, torch.tensor([[0, 2], [2, 3]])], dim=1)
    assert torch.equal(torch.gather(shuffled, 1, m.restore_idx), torch.arange(4).expand(2, -1))
    with pytest.raises(ValueError, match="same number of masked patches"):
        masking_from_mask(torch.tensor([[True, False], [True, True]]))


def test_batch_mask_uses_the_batch_else_draws_the_spec_from_the_global_rng() -> None:
    given = torch.tensor([[1, 0, 1, 0]], dtype=torch.uint8)
    images = torch.zeros(1, 3, 8, 8)
    mask = batch_mask({"views": [images], "mask": given}, MaskSpec("block", 0.5), (2, 2), images.device)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, False, True, False]]
    # Without one: BEiT's block mask of exactly round(N * ratio) patches per image, seeded from torch's RNG.
    spec, grid = MaskSpec("block", 0.4), (5, 5)
    torch.manual_seed(3)
    drawn = batch_mask({"views": [torch.zeros(3, 3, 20, 20)]}, spec, grid, images.device)
    assert drawn.shape == (3, 25) and drawn.sum(1).tolist() == [10, 10, 10]
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    expected = torch.stack([block_patch_mask(grid, generator, ratio=0.4) for _ in range(3)])
    assert torch.equal(drawn, expected)
