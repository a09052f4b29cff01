"""CrossMAE objective: the predicted subset, cross-attention, feature weighting and the loss against hand
computations; each patch's prediction independent of the other queries; training."""

from __future__ import annotations

import math

import pytest
import torch

from data.needs import DataNeeds, MaskSpec
from objectives.components.attention import CrossAttention
from objectives.components.masking import masking_from_mask
from objectives.components.patches import patchify
from objectives.configs import CrossMAEConfig
from objectives.crossmae import CrossMAE, prediction_subset
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
N = 16


def make(**overrides: object) -> CrossMAE:
    torch.manual_seed(0)
    cfg = CrossMAEConfig(decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2, **overrides)
    return CrossMAE(cfg, build_backbone(TINY))


def fixed_mask(batch: int) -> torch.Tensor:
    mask = torch.ones(batch, N, dtype=torch.bool)
    mask[:, [0, 5, 10, 15]] = False  # 4 visible of 16: ratio 0.75
    return mask


def test_the_predicted_subset_is_masked_patches_drawn_uniformly() -> None:
    mask = fixed_mask(2000)
    torch.manual_seed(0)
    chosen = prediction_subset(mask, 4)
    assert chosen.shape == (2000, 4)
    assert bool(mask.gather(1, chosen).all())  # masked patches only
    assert bool((chosen[:, 1:] > chosen[:, :-1]).all())  # distinct, raster order
    counts = torch.bincount(chosen.flatten(), minlength=N).float()
    assert counts[[0, 5, 10, 15]].sum() == 0
    expected = 2000 * 4 / 12
    assert float((counts[mask[0]] - expected).abs().max()) < 0.15 * expected


def test_cross_attention_by_hand() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(8, 6, num_heads=2)
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    q = attn.q(x)
    k, v = attn.kv(memory).split(8, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(w @ v[..., sl])
    torch.testing.assert_close(attn(x, memory), attn.proj(torch.cat(heads, dim=-1)))


def test_feature_weighting_and_the_loss_by_hand() -> None:
    model = make().train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = fixed_mask(2)
    torch.manual_seed(5)
    out = model({"views": [x], "mask": mask})
    torch.manual_seed(5)
    predicted = prediction_subset(mask, 4)  # the forward drew the same subset
    with torch.no_grad():
        keep = masking_from_mask(mask).keep_idx
        enc = model.backbone.encode(model.backbone.embed_patches(x), keep_idx=keep, return_blocks=range(3))
        for j in range(2):  # decoder block j's memory: LN_j of sum_i w_ji h_i
            mixed = sum(float(model.feature_weights[j, i]) * enc.block_outputs[i] for i in range(3))
            torch.testing.assert_close(model.memories(x, keep)[j], model.memory_norms[j](mixed))
        pred = model.decode(model.memories(x, keep), predicted)
    target = patchify(x, 8)
    total, count = 0.0, 0
    for b in range(2):
        for m, i in enumerate(predicted[b].tolist()):
            t = target[b, i].tolist()
            mean = sum(t) / len(t)
            var = sum((v - mean) ** 2 for v in t) / (len(t) - 1)  # unbiased, as MAE's norm_pix_loss
            for p_val, t_val in zip(pred[b, m].tolist(), t, strict=True):
                total += (p_val - (t_val - mean) / math.sqrt(var + 1e-6)) ** 2
                count += 1
    assert float(out.loss.detach()) == pytest.approx(total / count, rel=1e-5)
    assert float(out.metrics["crossmae/predicted_ratio"]) == pytest.approx(0.25)
    out.loss.backward()
    assert model.feature_weights.grad.abs().sum() > 0 and model.mask_token.grad.abs().sum() > 0
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_each_patch_is_predicted_independently_of_the_other_queries() -> None:
    model = make().eval()
    x = torch.randn(1, 3, 32, 32)
    keep = masking_from_mask(fixed_mask(1)).keep_idx
    with torch.no_grad():
        memories = model.memories(x, keep)
        a = model.decode(memories, torch.tensor([[1, 2]]))
        b = model.decode(memories, torch.tensor([[1, 14]]))
    torch.testing.assert_close(a[:, 0], b[:, 0])  # patch 1's prediction ignores which patch comes with it
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_loss_falls_on_a_fixed_batch_and_without_feature_weighting() -> None:
    for weight_fm in (True, False):
        model = make(weight_fm=weight_fm).train()
        assert hasattr(model, "feature_weights") == weight_fm
        batch = {
            "views": [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))],
            "mask": fixed_mask(8),
        }
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        losses = []
        for _ in range(15):
            torch.manual_seed(0)  # the same predicted subset every step
            out = model(batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.loss.detach()))
        assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), (weight_fm, losses)  # every step lower
        assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, (weight_fm, losses)


def test_registry_config_and_pictures() -> None:
    assert get_objective_class("crossmae") is CrossMAE
    assert CrossMAE.data_needs(CrossMAEConfig()) == DataNeeds(views=1, mask=MaskSpec("random", 0.75))
    bad = CrossMAEConfig(mask_ratio=0.2, prediction_ratio=0.3, decoder_num_heads=3)
    assert [k for k, _ in bad.problems()] == ["objective.prediction_ratio", "objective.decoder_num_heads"]
    model = make().eval()
    picture = model.pictures({"views": [torch.randn(3, 3, 32, 32)]})["crossmae_reconstruction"]
    assert picture.shape == (2 + 3 * (128 + 2), 2 + 3 * (128 + 2), 3)
    assert model.num_predicted == 4
