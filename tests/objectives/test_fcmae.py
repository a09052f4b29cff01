"""FCMAE: the dense masking equals a convolution over the visible region only (one layer by hand, and
the whole encoder: masked pixels change nothing visible), the loss by hand, training on ConvNeXt V2."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from data.needs import DataNeeds, MaskSpec
from objectives.components.backbone import ConvNeXtBackbone
from objectives.components.patches import normalise_patches, patchify
from objectives.configs import FCMAEConfig
from objectives.fcmae import FCMAE
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig, mask_unit

# ConvNeXt V2-Atto with a stride-1 stem: 32 px -> stages at 32, 16, 8, 4 px; a 4 x 4 final grid.
V2 = ModelConfig(arch="convnextv2_atto", img_size=32, kwargs={"patch_size": 1})


def test_masked_depthwise_conv_equals_the_sum_over_visible_inputs_only() -> None:
    """One layer by hand: at a visible output position, the sum runs over visible neighbours only;
    masked outputs are zero (a submanifold sparse convolution)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 6, generator=gen)
    weight, bias = torch.randn(2, 1, 3, 3, generator=gen), torch.randn(2, generator=gen)
    visible = torch.ones(1, 1, 6, 6)
    visible[..., 0:2, 2:4] = 0  # a masked 2 x 2 region
    visible[..., 4:6, 0:2] = 0
    dense = F.conv2d(x * visible, weight, bias, padding=1, groups=2) * visible
    for c in range(2):
        for i in range(6):
            for j in range(6):
                if not visible[0, 0, i, j]:
                    assert float(dense[0, c, i, j]) == 0.0
                    continue
                total = float(bias[c])
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i + di, j + dj
                        if 0 <= a < 6 and 0 <= b < 6 and visible[0, 0, a, b]:
                            total += float(weight[c, 0, di + 1, dj + 1] * x[0, c, a, b])
                assert float(dense[0, c, i, j]) == pytest.approx(total, rel=1e-5, abs=1e-6)


def test_the_encoder_sees_only_the_visible_regions() -> None:
    torch.manual_seed(0)
    bb = build_backbone(V2).eval()
    assert isinstance(bb, ConvNeXtBackbone)
    assert (bb.stride, bb.grid_size, mask_unit(V2)) == (8, (4, 4), 8)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 6, 15]] = True
    mask[1, [1, 2, 3, 8, 12]] = True
    other = images.clone()
    for b in range(2):  # new pixels in every masked 8 x 8 region
        for cell in mask[b].nonzero().flatten().tolist():
            r, c = divmod(cell, 4)
            other[b, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = torch.randn(3, 8, 8)
    with torch.no_grad():
        one, two = bb.feature_map(images, mask=mask), bb.feature_map(other, mask=mask)
        visible = (~mask).view(2, 1, 4, 4)
        torch.testing.assert_close(one * visible, two * visible)
        # Without a mask it is timm's forward_features, and the hooks are off again afterwards.
        torch.testing.assert_close(bb.feature_map(images), bb.timm_model.forward_features(images))
        assert not torch.allclose(one * visible, bb.timm_model.forward_features(images) * visible)


def test_loss_by_hand_and_it_falls() -> None:
    torch.manual_seed(0)
    model = FCMAE(FCMAEConfig(decoder_embed_dim=32), build_backbone(V2)).train()
    gen = torch.Generator().manual_seed(1)
    images = F.interpolate(torch.randn(4, 3, 4, 4, generator=gen), size=32, mode="bilinear")
    mask = torch.zeros(4, 16, dtype=torch.bool)
    for b in range(4):
        mask[b, torch.randperm(16, generator=gen)[:10]] = True  # 16 - int(16 x 0.4) = 10 masked
    batch = {"views": [images], "mask": mask}
    out = model(batch)
    with torch.no_grad():
        pred = model.predict(images, mask)  # (B, 16, 8 * 8 * 3)
        target = normalise_patches(patchify(images, 8))
        per_region = ((pred - target) ** 2).mean(dim=-1)
        expected = per_region[mask].mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    assert set(model.pictures(batch)) == {"fcmae_reconstruction"}


def test_registry_data_needs_and_config() -> None:
    assert get_objective_class("fcmae") is FCMAE
    cfg = FCMAEConfig()
    assert (cfg.mask_ratio, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.norm_pix_loss) == (0.6, 512, 1, True)
    assert FCMAEConfig.families == ("convnext",)
    assert FCMAE.data_needs(cfg) == DataNeeds(views=1, mask=MaskSpec("random", 0.6))
    # The paper's size: 224 px, the standard stride-4 stem -> 32-px regions, a 7 x 7 grid.
    assert mask_unit(ModelConfig(arch="convnextv2_base", img_size=224)) == 32
    assert {k for k, _ in FCMAEConfig(mask_ratio=0.0, decoder_depth=0).problems()} == {
        "objective.mask_ratio",
        "objective.decoder_depth",
    }
