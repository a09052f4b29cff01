"""MSBReg: its three losses by hand, the forward against them, the EMA target, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from objectives.base import DataNeeds
from objectives.configs import MSBRegConfig, ViewAugmentConfig
from objectives.msbreg import MSBReg, brownian_loss, centroid_loss, singular_value_loss
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
PLAIN = ViewAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def make(**overrides: object) -> MSBReg:
    torch.manual_seed(0)
    cfg = MSBRegConfig(mlp_dim=64, dim=16, total_steps=10, view1=PLAIN, view2=PLAIN, **overrides)
    return MSBReg(cfg, build_backbone(TINY))


def test_centroid_loss_by_hand() -> None:
    # One image, two views in 2-D: online (1, 0) and (0, 1) -> centroid (0.5, 0.5); target both (1, 0).
    online = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    assert float(centroid_loss(online, target)) == pytest.approx(2 - 2 * math.cos(math.pi / 4))
    assert float(centroid_loss(target, target)) == pytest.approx(0.0, abs=1e-7)


def test_singular_value_loss_by_hand() -> None:
    # Rows (1, 0) and (0.6, 0.8): Gram [[1, .6], [.6, 1]] has eigenvalues 1.6 and 0.4.
    rows = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert float(singular_value_loss(rows)) == pytest.approx(-(math.sqrt(1.6) + math.sqrt(0.4)) / 2, rel=1e-6)
    # Collapse (4 equal unit rows in 3-D): one singular value sqrt(4) -> mean 2 / 3; spread: sqrt(4 / 3) each.
    same = F.normalize(torch.ones(4, 3), dim=-1)
    assert float(singular_value_loss(same)) == pytest.approx(-2 / 3, rel=1e-5)
    spread = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])
    assert float(singular_value_loss(spread)) < float(singular_value_loss(same))


def test_brownian_loss_is_the_cosine_to_one_random_direction_per_image() -> None:
    online = F.normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    got = brownian_loss(online, torch.Generator().manual_seed(5))
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    by_loop = [float(online[v, b] @ noise[b]) / float(noise[b].norm()) for v in range(2) for b in range(3)]
    assert float(got) == pytest.approx(sum(by_loop) / 6, rel=1e-5)


def test_forward_is_the_weighted_sum_and_only_the_online_side_learns() -> None:
    model = make(views=3).eval()  # eval: no drop path, BatchNorm on its running statistics in both passes
    x = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(v)) for v in range(3)]
    out = model({"views": x})
    with torch.no_grad():
        x = [augment(v) for augment, v in zip(model.augments, x, strict=True)]  # no draw: clamps to [0, 1] only
        online = torch.stack(
            [F.normalize(model.predictor(model.projector(model.backbone.pooled(v))), dim=-1) for v in x]
        )
        target = torch.stack([F.normalize(model.target_embeddings(v), dim=-1) for v in x])
    m = out.metrics
    torch.testing.assert_close(m["msbreg/centroid"], centroid_loss(online, target), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        m["msbreg/singular_value"], singular_value_loss(online.flatten(0, 1)), rtol=1e-4, atol=1e-6
    )
    expected = m["msbreg/centroid"] + 1.0 * m["msbreg/singular_value"] + 0.1 * m["msbreg/brownian"]
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    model.train()
    model({"views": x}).loss.backward()
    assert not list(model.target.parameters())
    assert model.predictor[0].weight.grad.abs().sum() > 0 and model.projector[0].weight.grad.abs().sum() > 0
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_the_target_follows_the_online_network_by_byols_cosine_momentum() -> None:
    model = make()
    assert [model.momentum(s) for s in (-1, 4, 9)] == pytest.approx([0.996, 0.998, 1.0])
    online = model.projector[0].weight
    target = model.target["projector"][0].weight
    assert torch.equal(online, target)
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    model.after_step(4)
    torch.testing.assert_close(target, 0.998 * before + 0.002 * online.detach())
    assert float(model.current_momentum) == pytest.approx(0.998)


def test_loss_falls_on_a_fixed_batch_and_the_config_is_checked(train_on_batch) -> None:
    model = make().train()
    gen = torch.Generator().manual_seed(2)
    first = torch.randn(16, 3, 32, 32, generator=gen)
    batch = {"views": [first, first + 0.3 * torch.randn(first.shape, generator=gen)]}
    centroid, out = train_on_batch(model, batch, 15, lr=1e-3, metric="msbreg/centroid", seed_steps=True)
    assert all(math.isfinite(v) for v in centroid)
    assert train_on_batch.falls(centroid), centroid
    assert float(out.metrics["msbreg/embedding_std"]) > 0.05  # not collapsed: 1/sqrt(16) = 0.25 when spread
    assert get_objective_class("msbreg") is MSBReg
    assert MSBReg.data_needs(MSBRegConfig(views=4)) == DataNeeds(views=4)
    bad = MSBRegConfig(views=1, dim=0, sv_weight=-1.0, momentum=1.0, total_steps=-1)
    assert [k for k, _ in bad.problems()] == [
        "objective.views",
        "objective.dim",
        "objective.sv_weight",
        "objective.momentum",
        "objective.total_steps",
    ]
    with pytest.raises(ValueError, match="total_steps"):
        MSBReg(MSBRegConfig(mlp_dim=8, dim=4), build_backbone(TINY))
