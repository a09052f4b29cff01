"""SimMIM: the group mask rule, the masked L1 against a hand computation, the input masking of a
ViT and of a Swin against timm's own forward, and training on both."""

from __future__ import annotations

import math

import pytest
import torch

from data.masks import group_patch_mask, mask_generator
from data.needs import DataNeeds, MaskSpec
from objectives.components.backbone import SwinBackbone, VitBackbone
from objectives.configs import SimMIMConfig
from objectives.registry import get_objective_class
from objectives.simmim import SimMIM, masked_l1, pixel_mask
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

VIT = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
SWIN = ModelConfig(
    arch="swin_tiny_patch4_window7_224",
    family="swin",
    img_size=32,
    patch_size=4,
    embed_dim=16,
    kwargs={"window_size": 4, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
)


def test_group_mask_counts_and_alignment() -> None:
    # 8 x 8 patches in 2 x 2 groups: 16 groups, ceil(16 x 0.6) = 10 masked, each a whole aligned group.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = group_patch_mask((8, 8), gen, ratio=0.6, group=2).view(8, 8)
        groups = mask.view(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
        assert bool(((groups.all(dim=1)) | (~groups.any(dim=1))).all())  # a group is all masked or all visible
        assert int(groups.all(dim=1).sum()) == math.ceil(16 * 0.6) == 10
        assert int(mask.sum()) == 40
    # The paper's sizes: 192 px Swin (4-px patches, 48 x 48) with 32-px groups: 36 groups, 22 masked.
    make = mask_generator(MaskSpec("group", 0.6, group_px=32), patch_size=4)
    assert int(make((48, 48), gen).sum()) == 22 * 64
    with pytest.raises(ValueError, match="not a multiple"):
        mask_generator(MaskSpec("group", 0.6, group_px=6), patch_size=4)
    with pytest.raises(ValueError, match="do not tile"):
        group_patch_mask((6, 6), gen, ratio=0.6, group=4)


def test_masked_l1_by_hand() -> None:
    images = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).expand(1, 3, 2, 2).clone()  # (1, 3, 2, 2)
    images[:, 1] *= -1
    rec = torch.zeros_like(images)
    pixels = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # pixels (0, 0) and (1, 1) masked
    # |x| over the two masked pixels of 3 channels: (1 + 4) x 3 = 15; / (2 + 1e-5) / 3 channels.
    assert float(masked_l1(images, rec, pixels)) == pytest.approx(15 / (2 + 1e-5) / 3)
    mask = torch.tensor([[True, False, False, True]])  # 2 x 2 grid of 2-px patches
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(pixel_mask(mask, (2, 2), 2)[0, 0], expected)


@pytest.mark.parametrize("cfg", [VIT, SWIN], ids=["vit", "swin"])
def test_input_masking_against_timm_and_the_loss_by_hand(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = SimMIM(SimMIMConfig(mask_patch_size=8), build_backbone(cfg)).eval()
    bb = model.backbone
    assert isinstance(bb, VitBackbone if cfg is VIT else SwinBackbone)
    images = torch.randn(2, 3, 32, 32)
    timm_model = bb.timm_model
    with torch.no_grad():
        # No mask: the feature map is timm's own forward_features (channels first; a ViT without its CLS).
        plain = timm_model.forward_features(images)
        expected = plain[:, 1:].transpose(1, 2).reshape(2, -1, 8, 8) if cfg is VIT else plain.permute(0, 3, 1, 2)
        torch.testing.assert_close(bb.feature_map(images), expected)
        assert bb.stride == (4 if cfg is VIT else 32)
        # A mask: the output depends only on the visible pixels (masked ones are replaced by the token).
        mask = torch.zeros(2, 64, dtype=torch.bool)
        mask[:, :32] = True  # the top half of the 8 x 8 grid
        other = images.clone()
        other[:, :, :16] = torch.randn(2, 3, 16, 32)  # change only masked pixels
        torch.testing.assert_close(model.reconstruct(images, mask), model.reconstruct(other, mask))
        out = model({"views": [images], "mask": mask})
        rec = model.reconstruct(images, mask)
        assert rec.shape == images.shape
        top = (images - rec).abs()[:, :, :16]  # the masked pixels
        assert float(out.loss) == pytest.approx(float(top.sum() / (2 * 16 * 32 + 1e-5) / 3), rel=1e-5)


@pytest.mark.parametrize("cfg", [VIT, SWIN], ids=["vit", "swin"])
def test_loss_falls_on_a_fixed_batch(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = SimMIM(SimMIMConfig(mask_patch_size=8), build_backbone(cfg)).train()
    gen = torch.Generator().manual_seed(1)
    smooth = torch.nn.functional.interpolate(torch.randn(4, 3, 4, 4, generator=gen), size=32, mode="bilinear")
    batch = {
        "views": [smooth],
        "mask": torch.stack([group_patch_mask((8, 8), gen, ratio=0.6, group=2) for _ in range(4)]),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_registry_data_needs_config_and_pictures() -> None:
    assert get_objective_class("simmim") is SimMIM
    cfg = SimMIMConfig()
    assert (cfg.mask_ratio, cfg.mask_patch_size, SimMIMConfig.families) == (0.6, 32, ("vit", "swin"))
    assert SimMIM.data_needs(cfg) == DataNeeds(views=1, mask=MaskSpec("group", 0.6, group_px=32))
    assert {k for k, _ in SimMIMConfig(mask_ratio=1.0, mask_patch_size=0).problems()} == {
        "objective.mask_ratio",
        "objective.mask_patch_size",
    }
    torch.manual_seed(0)
    model = SimMIM(SimMIMConfig(mask_patch_size=8), build_backbone(VIT)).eval()
    pictures = model.pictures({"views": [torch.randn(2, 3, 32, 32)]})
    assert set(pictures) == {"simmim_reconstruction"}
    assert pictures["simmim_reconstruction"].dtype.name == "uint8"
    with pytest.raises(ValueError, match="not a multiple"):
        SimMIM(SimMIMConfig(mask_patch_size=6), build_backbone(VIT))
