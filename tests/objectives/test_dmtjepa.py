"""DMT-JEPA: the neighbour windows, the aggregation head and the loss against hand runs; the EMA head; training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from objectives.base import RunContext
from objectives.components.predictor import LocalAggregation, keep_indices, window_neighbours
from objectives.configs import DMTJEPAConfig
from objectives.ijepa import DMTJEPA, IJEPA
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
T = 2


def make(**overrides: object) -> DMTJEPA:
    torch.manual_seed(0)
    cfg = DMTJEPAConfig(num_targets=T, predictor_embed_dim=16, predictor_depth=2, **overrides)
    return DMTJEPA(cfg, build_backbone(TINY), RunContext(total_steps=10))


def fixed_masks(batch: int) -> torch.Tensor:
    """(B, 1 + T, 16): context = patches 2..9, target 1 = {10, 11, 14, 15}, target 2 = {0, 1}."""
    masks = torch.zeros(batch, 1 + T, 16, dtype=torch.bool)
    masks[:, 0, 10:] = True
    masks[:, 0, [0, 1]] = True
    masks[:, 1, [10, 11, 14, 15]] = True
    masks[:, 2, [0, 1]] = True
    return masks


def test_windows_wrap_around_the_grid_by_hand() -> None:
    w = window_neighbours((4, 4), 3)
    assert w.shape == (16, 8)
    # Corner patch 0 (row 0, col 0): rows {3, 0, 1} x cols {3, 0, 1} minus itself.
    assert w[0].tolist() == [1, 3, 4, 5, 7, 12, 13, 15]
    assert w[5].tolist() == [0, 1, 2, 4, 6, 8, 9, 10]  # an inner patch: its plain 3 x 3 ring
    assert window_neighbours((5, 5), 5).shape == (25, 24)
    with pytest.raises(ValueError, match="odd"):
        window_neighbours((4, 4), 2)
    with pytest.raises(ValueError, match="does not fit"):
        window_neighbours((4, 4), 5)


def head_by_loop(head: LocalAggregation, x: torch.Tensor) -> torch.Tensor:
    """Each patch on its own: cosines to its window by a Python loop, the k best, one query through the blocks."""
    b, n, d = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        mean = x[i].mean(dim=0)
        for p in range(n):
            window = head.windows[p].tolist()
            cos = [float(F.cosine_similarity(x[i, p], x[i, j], dim=0)) for j in window]
            best = sorted(range(len(window)), key=lambda a: -cos[a])[: head.neighbours]
            keys = x[i, [window[a] for a in best]][None]  # (1, k, D)
            q = mean[None, None]
            for block in head.blocks:
                memory = block.norm1(torch.cat([q, keys], dim=1))
                q = q + block.attn(memory[:, :1], memory)
                q = q + block.mlp(block.norm2(q))
            out[i, p] = head.norm(q)[0, 0]
    return out


def test_target_head_aggregates_the_most_similar_window_neighbours_by_loop() -> None:
    torch.manual_seed(0)
    head = LocalAggregation(8, (4, 4), num_heads=2, neighbours=3, window=3).eval()
    x = torch.randn(2, 16, 8)
    # Patch 5's neighbours 1, 6 and 9 point its way: they must be the ones chosen for it.
    x[0, [1, 6, 9]] = x[0, 5] * torch.tensor([2.0, 0.5, 3.0])[:, None] + 0.01 * torch.randn(3, 8)
    with torch.no_grad():
        out, similarity = head.targets(x)
        chosen, _ = head.choose(x)
        torch.testing.assert_close(out, head_by_loop(head, x), rtol=1e-4, atol=1e-5)
    assert sorted(chosen[0, 5].tolist()) == [1, 6, 9]
    assert similarity.shape == (2, 16, 3) and float(similarity[0, 5].min()) > 0.99


def test_context_head_adds_the_mean_querys_read_to_every_token_by_hand() -> None:
    torch.manual_seed(1)
    head = LocalAggregation(8, (4, 4), num_heads=2, neighbours=4, window=3).eval()
    x = torch.randn(2, 5, 8)  # 5 context tokens: the context path does not use the grid
    with torch.no_grad():
        y = x.clone()
        for block in head.blocks:
            q = y.mean(dim=1, keepdim=True)
            memory = block.norm1(torch.cat([q, y], dim=1))
            y = y + block.attn(memory[:, :1], memory)  # one (B, 1, D) read, broadcast to the 5 tokens
            y = y + block.mlp(block.norm2(y))
        torch.testing.assert_close(head.context(x), head.norm(y))


def test_loss_by_hand_and_gradients_reach_only_the_trained_side() -> None:
    model = make().train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masks = fixed_masks(2)
    out = model({"views": [x], "mask": masks})
    context_idx = keep_indices(~masks[:, 0])
    target_idx = keep_indices(masks[:, 1:].transpose(0, 1).flatten(0, 1))  # (T B, 2)
    with torch.no_grad():
        h = model.target_encoder(x)[:, 1:]
        h, _ = model.target_aggregation.targets(F.layer_norm(h, h.shape[-1:]))
        targets = torch.stack([h[b, target_idx[t * 2 + b]] for t in range(T) for b in range(2)])
        vit = model.backbone.vit
        kept = torch.stack([(vit.patch_embed(x) + vit.pos_embed[:, 1:])[b, context_idx[b]] for b in range(2)])
        z = torch.cat([vit.cls_token.expand(2, -1, -1) + vit.pos_embed[:, :1], kept], dim=1)
        for block in vit.blocks:
            z = block(z)
        z = vit.norm(z)[:, 1:]
        pred = model.predictor(model.aggregation.context(z), context_idx, target_idx)
    assert float(out.loss.detach()) == pytest.approx(float(F.smooth_l1_loss(pred, targets)), rel=1e-5)
    assert 0.0 < float(out.metrics["dmtjepa/neighbour_similarity"]) <= 1.0
    assert {k.split("/")[1] for k in out.metrics} == {
        "feature_std",
        "context_ratio",
        "target_ratio",
        "momentum",
        "neighbour_similarity",
    }
    out.loss.backward()
    assert not list(model.target_encoder.parameters()) and not list(model.target_aggregation.parameters())
    assert model.aggregation.blocks[0].attn.q.weight.grad.abs().sum() > 0
    assert model.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_the_target_head_follows_the_head_with_the_encoders_momentum() -> None:
    model = make()
    online = model.aggregation.blocks[1].mlp.fc1.weight
    target = model.target_aggregation.blocks[1].mlp.fc1.weight
    assert torch.equal(online, target) and not isinstance(target, torch.nn.Parameter)
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    model.after_step(5)  # momentum linear 0.996 -> 1.0 over 10 steps: 0.998 after step 5
    torch.testing.assert_close(target, 0.998 * before + 0.002 * online.detach())


def test_loss_falls_on_a_fixed_batch_and_the_config_is_checked(train_on_batch) -> None:
    model = make(ema_momentum=0.99, ema_momentum_end=0.99).train()
    batch = {"views": [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))], "mask": fixed_masks(8)}
    losses, out = train_on_batch(model, batch, 15, lr=2e-3)
    assert all(math.isfinite(v) for v in losses)
    assert train_on_batch.falls(losses), losses
    assert get_objective_class("dmtjepa") is DMTJEPA
    assert DMTJEPA.data_needs(DMTJEPAConfig()) == IJEPA.data_needs(DMTJEPAConfig())
    assert DMTJEPAConfig.features == "mean"
    bad = DMTJEPAConfig(window=4, aggregation_depth=0, aggregation_num_heads=-1)
    assert [k for k, _ in bad.problems()] == [
        "objective.window",
        "objective.aggregation_depth",
        "objective.aggregation_num_heads",
    ]
    assert [k for k, _ in DMTJEPAConfig(neighbours=9).problems()] == ["objective.neighbours"]
    assert [k for k, _ in DMTJEPAConfig(window=4, neighbours=0).problems()] == [
        "objective.window",
        "objective.neighbours",
    ]
    picture = model.eval().pictures({"views": [torch.randn(2, 3, 32, 32)], "mask": fixed_masks(2)})
    assert set(picture) == {"dmtjepa_blocks", "dmtjepa_neighbours"}
    # 2 images x (the image + 3 probes), each 32 px shown at 4x; probe (1, 1) of the 4 x 4 grid is red-tinted.
    neighbours = picture["dmtjepa_neighbours"]
    assert neighbours.shape == (2 + 2 * (128 + 2), 2 + 4 * (128 + 2), 3)
    probe_panel = neighbours[2 : 2 + 128, 2 + 130 : 2 + 130 + 128]  # image 0, first probe
    inside = probe_panel[32:64, 32:64].astype(int)  # patch (1, 1): 8 px cells at 4x
    assert (inside[..., 0] >= inside[..., 1]).all() and (inside[..., 0] >= 127).all()
