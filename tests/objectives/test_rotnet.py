"""RotNet objective: the rotations against hand-made ones, the loss against a loop over plain floats, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from objectives.base import DataNeeds
from objectives.configs import RotNetConfig
from objectives.registry import get_objective_class
from objectives.rotnet import RotNet, rotate_all
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def images(batch: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_the_four_rotations_by_hand() -> None:
    x = images(2, 0, size=4)
    rotated, labels = rotate_all(x)
    assert rotated.shape == (8, 3, 4, 4) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    n = 4
    for b in range(2):
        for i in range(n):
            for j in range(n):
                pixel = x[b, :, i, j]
                # Counter-clockwise by 90 k degrees (the official rotate_img: 90 = flipud(transpose)):
                # (i, j) goes to (n-1-j, i), then (n-1-i, n-1-j), then (j, n-1-i).
                assert torch.equal(rotated[0 * 2 + b, :, i, j], pixel)
                assert torch.equal(rotated[1 * 2 + b, :, n - 1 - j, i], pixel)
                assert torch.equal(rotated[2 * 2 + b, :, n - 1 - i, n - 1 - j], pixel)
                assert torch.equal(rotated[3 * 2 + b, :, j, n - 1 - i], pixel)
    with pytest.raises(ValueError, match="square images"):
        rotate_all(torch.zeros(1, 3, 4, 6))


def test_loss_is_the_cross_entropy_over_all_four_copies() -> None:
    torch.manual_seed(0)
    model = RotNet(RotNetConfig(), build_backbone(TINY)).train()
    x = images(3, 1)
    out = model({"views": [x]})
    with torch.no_grad():  # by hand, on the batch statistics the forward just used (all 12 copies at once)
        rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        logits = model.head(
            model.backbone.timm_model.forward_head(model.backbone.timm_model.forward_features(rotated), True)
        )
    total, right = 0.0, 0
    for row, label in zip(logits.tolist(), [k for k in range(4) for _ in range(3)], strict=True):
        total += -row[label] + math.log(sum(math.exp(v) for v in row))
        right += max(range(4), key=lambda c: row[c]) == label
    assert float(out.loss.detach()) == pytest.approx(total / 12, rel=1e-5)
    assert float(out.metrics["rotnet/acc"]) == pytest.approx(right / 12)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg", [TINY, ModelConfig(arch="resnet18")], ids=["vit", "resnet"])
def test_loss_falls_on_a_fixed_batch(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = RotNet(RotNetConfig(head_hidden_dim=32), build_backbone(cfg)).train()
    batch = {"views": [images(8, 2)]}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[0] == pytest.approx(math.log(4), abs=0.3)  # a guess among 4 at the start
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_registry_config_head_and_pictures() -> None:
    assert get_objective_class("rotnet") is RotNet
    assert RotNetConfig.families == ("any",)
    assert RotNet.data_needs(RotNetConfig()) == DataNeeds(views=1, mask=None)
    assert [k for k, _ in RotNetConfig(head_layers=0, head_hidden_dim=0).problems()] == [
        "objective.head_layers",
        "objective.head_hidden_dim",
    ]
    torch.manual_seed(0)
    linear = RotNet(RotNetConfig(head_layers=1), build_backbone(TINY))
    assert [type(m).__name__ for m in linear.head] == ["Linear"] and linear.head[0].out_features == 4
    model = RotNet(RotNetConfig(head_hidden_dim=16), build_backbone(TINY)).eval()
    assert [type(m).__name__ for m in model.head] == ["Linear", "SyncBatchNorm1d", "ReLU", "Linear"]
    pictures = model.pictures({"views": [images(10, 3)]})
    assert set(pictures) == {"rotnet_predictions", "rotnet_confusion"}
    grid = pictures["rotnet_predictions"]
    # 8 images (MAX_IMAGES) x 4 rotations of 32 px panels, upscaled 4x, 2 px padding.
    assert grid.dtype == np.uint8 and grid.shape == (2 + 8 * (128 + 2), 2 + 4 * (128 + 2), 3)
    frame = grid[2, 2]  # the top-left pixel of the first panel: its frame is green or red
    assert tuple(frame) in {(40, 160, 60), (200, 40, 40)}
    assert pictures["rotnet_confusion"].dtype == np.uint8
