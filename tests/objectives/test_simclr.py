"""SimCLR objective: the forward against a hand-written NT-Xent on timm's own CLS features; training on a tiny ViT."""

from __future__ import annotations

import math

import pytest
import torch

from objectives.base import DataNeeds, RunContext
from objectives.configs import SimCLRConfig, ViewAugmentConfig
from objectives.registry import get_objective_class
from objectives.simclr import SimCLR
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def make(**overrides: object) -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(SimCLRConfig(**overrides), build_backbone(TINY))


def views(batch: int, seed: int) -> list[torch.Tensor]:
    """Two "views" of `batch` random images: the second is the first plus noise."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(batch, 3, 32, 32, generator=gen)
    return [first, first + 0.5 * torch.randn(first.shape, generator=gen)]


def nt_xent_by_loop(z: torch.Tensor, n: int, t: float) -> float:
    """Eq. 1 of the paper over the 2N rows of z (rows k and k + n are the two views of image k)."""
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in z.tolist()]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = {j: sum(a * b for a, b in zip(rows[i], rows[j], strict=True)) / t for j in range(2 * n) if j != i}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


def test_forward_equals_nt_xent_on_timm_cls_features() -> None:
    model = make(temperature=0.3, proj_dim=16).train()
    v1, v2 = views(4, 1)
    torch.manual_seed(5)
    out = model({"views": [v1, v2]})
    # By hand: the same augmentation draws, timm's own forward_features, the projector, the loop.
    torch.manual_seed(5)
    images = model.augment(torch.cat([v1, v2]))
    with torch.no_grad():
        cls = model.backbone.vit.forward_features(images)[:, 0]
        z = model.projector(cls)
    assert float(out.loss.detach()) == pytest.approx(nt_xent_by_loop(z, 4, 0.3), rel=1e-5)
    assert 0.0 <= float(out.metrics["simclr/acc"]) <= 1.0


def _linear_shapes(model: SimCLR) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.projector if isinstance(m, torch.nn.Linear)]


def test_projection_head_follows_the_simclr_rule() -> None:
    # 3 layers, hidden as wide as the encoder (32), output 128 (tf2/run.py, model.py ProjectionHead).
    assert _linear_shapes(make()) == [(32, 32), (32, 32), (32, 128)]
    assert _linear_shapes(make(proj_hidden_dim=64, proj_dim=8, proj_layers=2)) == [(32, 64), (64, 8)]


def test_loss_falls_on_a_fixed_batch() -> None:
    # Photometric augmentation off (tested on its own): the two views differ by their noise only.
    off = ViewAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    model = make(temperature=0.1, proj_dim=32, augment=off).train()
    batch = {"views": views(8, 2)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert float(out.metrics["simclr/acc"]) > 0.5


def test_registry_data_needs_and_config_problems() -> None:
    assert get_objective_class("simclr") is SimCLR
    cfg = SimCLRConfig()
    assert cfg.problems() == []
    assert (cfg.temperature, cfg.proj_layers, cfg.proj_hidden_dim, cfg.proj_dim) == (0.1, 3, None, 128)
    a = cfg.augment
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.8, 0.8, 0.8, 0.2)
    assert (a.jitter_prob, a.grayscale_prob, a.blur_prob, a.solarize_prob) == (0.8, 0.2, 0.5, 0.0)
    assert SimCLR.data_needs(cfg) == DataNeeds(views=2)
    bad = SimCLRConfig(temperature=0.0, proj_dim=0, proj_hidden_dim=-1, augment=ViewAugmentConfig(blur_prob=2.0))
    assert {k for k, _ in bad.problems()} == {
        "objective.temperature",
        "objective.proj_dim",
        "objective.proj_hidden_dim",
        "objective.augment.blur_prob",
    }


def test_augmentation_uses_the_run_normalisation() -> None:
    ctx = RunContext(input_mean=(0.0, 0.0, 0.0), input_std=(1.0, 1.0, 1.0))
    model = SimCLR(SimCLRConfig(), build_backbone(TINY), ctx)
    assert model.augment.mean.flatten().tolist() == [0.0, 0.0, 0.0]
    assert model.augment.std.flatten().tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto"])
def test_on_a_cnn_the_loss_is_nt_xent_of_timms_pooled_features_and_falls(arch: str) -> None:
    """Any timm model: the representation is what timm's classifier reads (global pool, head norm)."""
    off = ViewAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    torch.manual_seed(0)
    model = SimCLR(SimCLRConfig(temperature=0.1, proj_dim=16, augment=off), build_backbone(ModelConfig(arch=arch)))
    model.train()
    batch = {"views": views(8, 2)}
    out = model(batch)
    with torch.no_grad():  # by hand, on the statistics the forward just used (eval would read running ones)
        images = model.augment(torch.cat(batch["views"]))
        z = model.projector(model.backbone.model.forward_head(model.backbone.model.forward_features(images), True))
    assert float(out.loss.detach()) == pytest.approx(nt_xent_by_loop(z, 8, 0.1), rel=1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
