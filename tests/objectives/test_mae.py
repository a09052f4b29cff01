"""MAE pieces against hand-computed values and brute-force constructions."""

from __future__ import annotations

import math

import pytest
import torch

from objectives.components.masking import random_masking
from objectives.components.patches import masked_patch_mse, patchify, unpatchify
from objectives.components.pos_embed import sincos_1d, sincos_2d
from objectives.configs import MAEConfig
from objectives.mae import MAE
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig


def test_patchify_layout_by_hand() -> None:
    # 1 image, 1 channel repeated 3x, 4x4 pixels numbered 0..15, 2x2 patches.
    img = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 3, 1, 1)
    patches = patchify(img, 2)  # (1, 4, 12)
    assert patches.shape == (1, 4, 12)
    # Patch 1 (top-right) holds pixels 2, 3, 6, 7, each repeated for the 3 channels.
    assert patches[0, 1].tolist() == [2, 2, 2, 3, 3, 3, 6, 6, 6, 7, 7, 7]
    assert patches[0, 2, ::3].tolist() == [8, 9, 12, 13]
    x = torch.randn(2, 3, 8, 12)
    torch.testing.assert_close(unpatchify(patchify(x, 4), 4, (2, 3)), x)


def test_masked_patch_mse_by_hand() -> None:
    pred = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 8.0]]])
    mask = torch.tensor([[0.0, 1.0]])  # only patch 1 counts
    assert masked_patch_mse(pred, target, mask, norm_pix=False).item() == pytest.approx(64 / 4)
    # norm_pix: patch 1 -> (x - 2) / sqrt(var_unbiased + 1e-6), var_unbiased = 16
    normed = (torch.tensor([0.0, 0.0, 0.0, 8.0]) - 2.0) / math.sqrt(16.0 + 1e-6)
    assert masked_patch_mse(pred, target, mask, norm_pix=True).item() == pytest.approx(float((normed**2).mean()))


def test_random_masking_counts_and_inverse() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = random_masking(5, 49, 0.75, generator=gen)
        assert m.keep_idx.shape == (5, int(49 * 0.25))
        assert (m.mask.sum(1) == 49 - 12).all()
        for b in range(5):
            visible = set(torch.nonzero(m.mask[b] == 0).flatten().tolist())
            assert visible == set(m.keep_idx[b].tolist())
            assert len(set(m.keep_idx[b].tolist())) == 12
        shuffle = torch.argsort(m.restore_idx, dim=1)
        assert torch.equal(torch.gather(shuffle, 1, m.restore_idx), torch.arange(49).expand(5, -1))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 4, 0.99)


def test_masking_is_uniform_over_positions() -> None:
    gen = torch.Generator().manual_seed(1)
    m = random_masking(4000, 16, 0.75, generator=gen)
    freq = m.mask.mean(0)  # each position masked with probability 12/16
    assert torch.allclose(freq, torch.full((16,), 0.75), atol=0.03)


def test_sincos_table_matches_formula() -> None:
    dim, gh, gw = 8, 3, 4
    table = sincos_2d(dim, gh, gw)
    assert table.shape == (12, 8)
    r, c = 2, 3
    row = table[r * gw + c]
    omega = [1 / 10000 ** (k / 2) for k in range(2)]  # dim/2 = 4 per axis -> 2 frequencies
    expected = [math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
    expected += [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega]
    assert row.tolist() == pytest.approx(expected, abs=1e-6)
    assert sincos_1d(2, torch.tensor([0.0])).tolist() == [[0.0, 1.0]]


def small_mae() -> MAE:
    torch.manual_seed(0)
    backbone = build_backbone(
        ModelConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    )
    return MAE(MAEConfig(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), backbone)


def test_loss_ignores_visible_patches_and_reaches_only_masked_targets() -> None:
    mae = small_mae()
    images = torch.randn(2, 3, 16, 16)
    torch.manual_seed(5)
    base = mae({"views": [images]}).loss
    # Recompute the same forward by hand with the same mask draw.
    torch.manual_seed(5)
    m = random_masking(2, 16, 0.75)
    tokens = mae.backbone.embed_patches(images)
    latent = mae.backbone.encode(tokens, keep_idx=m.keep_idx).tokens
    pred = mae.forward_decoder(latent, m.restore_idx)
    assert latent.shape == (2, 1 + 4, 32)  # CLS + 25% of 16 patches
    target = patchify(images, 4)
    assert base.item() == pytest.approx(masked_patch_mse(pred, target, m.mask, True).item(), rel=1e-5)
    # Perturbing predictions at visible positions leaves the loss unchanged.
    bumped = pred + (1 - m.mask).unsqueeze(-1) * 100.0
    assert masked_patch_mse(bumped, target, m.mask, True).item() == pytest.approx(base.item(), rel=1e-5)


def test_encoder_pos_embed_fixed_and_loss_falls_when_overfitting_one_batch() -> None:
    mae = small_mae()
    assert not mae.backbone.vit.pos_embed.requires_grad
    # Smooth images (upsampled 4x4 noise): their patches are predictable from neighbours.
    images = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 4), size=16, mode="bilinear")
    opt = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(60):
        torch.manual_seed(0)  # the same mask every step
        loss = mae({"views": [images]}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_frozen_modules_stay_out_of_parameters_and_state_dict() -> None:
    mae = small_mae()
    teacher = torch.nn.Linear(4, 4)
    mae.attach_frozen("teacher", teacher)
    assert mae.frozen_modules() == {"teacher": teacher}
    assert not any(p is teacher.weight for p in mae.parameters())
    assert not any(k.startswith("teacher") for k in mae.state_dict())
    assert not teacher.weight.requires_grad and not teacher.training
