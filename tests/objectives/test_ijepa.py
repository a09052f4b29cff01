"""I-JEPA objective: the indices, the predictor and the loss against hand runs; the EMA target; training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.needs import DataNeeds, MaskSpec
from objectives.base import RunContext
from objectives.components.predictor import JepaPredictor, keep_indices
from objectives.configs import IJEPAConfig
from objectives.ijepa import IJEPA
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
GRID, N, T = (4, 4), 16, 2


def make(**overrides: object) -> IJEPA:
    torch.manual_seed(0)
    cfg = IJEPAConfig(num_targets=T, predictor_embed_dim=16, predictor_depth=2, **overrides)
    return IJEPA(cfg, build_backbone(TINY), RunContext(total_steps=10))


def fixed_masks(batch: int) -> torch.Tensor:
    """(B, 1 + T, N): context = patches 0..9 minus the targets, target 1 = {10, 11, 14, 15}, target 2 = {0, 1}
    for every image (the second image also loses patch 5 from its context: a count below the others')."""
    masks = torch.zeros(batch, 1 + T, N, dtype=torch.bool)
    masks[:, 0, 10:] = True
    masks[:, 0, [0, 1]] = True
    masks[1, 0, 5] = True
    masks[:, 1, [10, 11, 14, 15]] = True
    masks[:, 2, [0, 1]] = True
    return masks


def test_keep_indices_truncate_to_the_shortest_row_in_raster_order() -> None:
    keep = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert keep_indices(keep).tolist() == [[1, 2, 4], [0, 3, 4], [0, 1, 2]]
    with pytest.raises(ValueError, match="keeps no patch"):
        keep_indices(torch.zeros(2, 3, dtype=torch.bool))


def test_predictor_by_hand_target_major() -> None:
    torch.manual_seed(0)
    pred = JepaPredictor(8, (2, 2), width=8, depth=1, num_heads=2).eval()
    context = torch.randn(2, 2, 8)
    context_idx = torch.tensor([[0, 1], [2, 3]])
    target_idx = torch.tensor([[3], [0], [2], [1]])  # target 0 of images 0, 1; then target 1 of images 0, 1
    out = pred(context, context_idx, target_idx)
    assert out.shape == (4, 1, 8)
    with torch.no_grad():
        for row in range(4):
            b = row % 2
            x = pred.embed(context[b]) + pred.pos_embed[context_idx[b]]  # (2, 8)
            q = pred.mask_token[0] + pred.pos_embed[target_idx[row]]  # (1, 8)
            y = pred.blocks[0](torch.cat([x, q])[None])[0]
            torch.testing.assert_close(out[row], pred.proj(pred.norm(y[2:])))
    # The targets' positions can be given (FlexPredict's noised positions): zero noise is the same.
    same = pred(context, context_idx, target_idx, target_pos=pred.pos_embed[target_idx])
    torch.testing.assert_close(same, out)


def smooth_l1_by_loop(pred: torch.Tensor, target: torch.Tensor) -> float:
    total, count = 0.0, 0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        e = abs(p - t)
        total += 0.5 * e * e if e < 1.0 else e - 0.5
        count += 1
    return total / count


def test_loss_by_hand_on_the_timm_vit() -> None:
    model = make().train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masks = fixed_masks(2)
    out = model({"views": [x], "mask": masks})
    vit = model.backbone.vit
    context_idx = keep_indices(~masks[:, 0])  # 8 patches for image 0, 7 for image 1: both keep 7
    assert context_idx.shape == (2, 7) and context_idx[0].tolist() == [2, 3, 4, 5, 6, 7, 8]
    target_idx = keep_indices(masks[:, 1:].transpose(0, 1).flatten(0, 1))  # (T B, 2): the 2-patch target wins
    assert target_idx.tolist() == [[10, 11], [10, 11], [0, 1], [0, 1]]
    with torch.no_grad():
        # Target: the EMA copy (still equal to the encoder) on the whole image, final norm, then LN without affine.
        full = vit.patch_embed(x) + vit.pos_embed[:, 1:]
        tokens = torch.cat([vit.cls_token.expand(2, -1, -1) + vit.pos_embed[:, :1], full], dim=1)
        for block in vit.blocks:
            tokens = block(tokens)
        h = F.layer_norm(vit.norm(tokens)[:, 1:], (32,))
        targets = torch.stack([h[b, target_idx[t * 2 + b]] for t in range(T) for b in range(2)])
        # Context encoder on the kept patches only (with the CLS token), then the predictor.
        kept = torch.stack([full[b, context_idx[b]] for b in range(2)])
        z = torch.cat([vit.cls_token.expand(2, -1, -1) + vit.pos_embed[:, :1], kept], dim=1)
        for block in vit.blocks:
            z = block(z)
        z = vit.norm(z)[:, 1:]
        pred = model.predictor(z, context_idx, target_idx)
    assert float(out.loss.detach()) == pytest.approx(smooth_l1_by_loop(pred, targets), rel=1e-5)
    assert float(out.metrics["ijepa/context_ratio"]) == pytest.approx(7 / 16)
    assert float(out.metrics["ijepa/target_ratio"]) == pytest.approx(2 / 16)
    assert float(out.metrics["ijepa/feature_std"]) == pytest.approx(float(z.flatten(0, 1).std(0).mean()), rel=1e-5)
    # Gradients reach the encoder and the predictor; the target encoder holds buffers only; positions are fixed.
    out.loss.backward()
    assert not list(model.target_encoder.parameters())
    assert not vit.pos_embed.requires_grad and vit.pos_embed.grad is None
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.predictor.mask_token.grad.abs().sum() > 0


def test_the_target_encoder_follows_the_encoder_by_the_linear_momentum() -> None:
    model = make()
    assert [model.momentum(s) for s in (0, 5, 10, 20)] == pytest.approx([0.996, 0.998, 1.0, 1.0])
    online = model.backbone.vit.blocks[0].mlp.fc1.weight
    target = model.target_encoder.encoder.vit.blocks[0].mlp.fc1.weight
    assert torch.equal(online, target)
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    model.after_step(5)
    torch.testing.assert_close(target, 0.998 * before + 0.002 * online.detach())
    assert float(model.current_momentum) == pytest.approx(0.998)


def test_loss_falls_on_a_fixed_batch(train_on_batch) -> None:
    model = make(ema_momentum=0.99, ema_momentum_end=0.99).train()
    batch = {"views": [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))], "mask": fixed_masks(8)}
    losses, out = train_on_batch(model, batch, 15, lr=2e-3)
    assert train_on_batch.falls(losses), losses
    assert all(math.isfinite(v) for v in losses)


def test_registry_masks_config_pictures_and_the_mean_pooled_export(tmp_path: Path) -> None:
    assert get_objective_class("ijepa") is IJEPA
    assert IJEPA.data_needs(IJEPAConfig()) == DataNeeds(views=1, mask=MaskSpec("multiblock", 0.0, targets=4))
    bad = IJEPAConfig(num_targets=0, predictor_num_heads=5, ema_momentum=0.999, ema_momentum_end=0.99, loss="l1")
    assert [k for k, _ in bad.problems()] == [
        "objective.num_targets",
        "objective.predictor_num_heads",
        "objective.ema_momentum",
        "objective.loss",
    ]
    model = make().eval()
    out = model({"views": [torch.randn(3, 3, 32, 32)]})  # masks drawn here: (3, 1 + T, 16)
    assert torch.isfinite(out.loss)
    picture = model.pictures({"views": [torch.randn(3, 3, 32, 32)], "mask": fixed_masks(3)})["ijepa_blocks"]
    assert picture.shape == (2 + 3 * (128 + 2), 2 + 3 * (128 + 2), 3)
    # Exported with its representation: the mean of the patch tokens, which eval.features=auto follows.
    model.context = RunContext(
        arch=TINY.arch,
        arch_kwargs={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0},
    )
    (exported,) = model.export(tmp_path)
    assert json.loads((tmp_path / "encoder" / "pretrain.json").read_text())["features"] == "mean"
    from pretrain.features import load_encoder

    encoder = load_encoder(str(tmp_path / "encoder"), tracking_uri=None)
    assert (encoder.features_for("auto"), encoder.features_for("cls")) == ("mean", "cls")


# --- FlexPredict --------------------------------------------------------------------------------


def test_flexpredict_noises_the_target_positions_through_the_predictors_own_projection() -> None:
    from objectives.configs import FlexPredictConfig
    from objectives.ijepa import FlexPredict

    torch.manual_seed(0)
    cfg = FlexPredictConfig(num_targets=T, predictor_embed_dim=16, predictor_depth=2, position_noise=0.25)
    model = FlexPredict(cfg, build_backbone(TINY), RunContext(total_steps=10)).train()
    assert get_objective_class("flexpredict") is FlexPredict and FlexPredict.data_needs(cfg) == IJEPA.data_needs(cfg)
    idx = torch.tensor([[1, 2], [3, 4]])
    torch.manual_seed(3)
    noised = model.target_positions(idx)
    torch.manual_seed(3)
    noise = torch.randn(2, 2, 32) * 0.25  # in the encoder's width, D = 32
    a = model.predictor.embed.weight  # (16, 32): the same A that projects the context tokens
    torch.testing.assert_close(noised, model.predictor.pos_embed[idx] + noise @ a.T)
    assert model.eval().target_positions(idx) is None  # exact positions outside training
    model.train()
    out = model({"views": [torch.randn(2, 3, 32, 32)], "mask": fixed_masks(2)})
    assert set(out.metrics) == {
        f"flexpredict/{k}" for k in ("feature_std", "context_ratio", "target_ratio", "momentum")
    }
    out.loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert [k for k, _ in FlexPredictConfig(position_noise=-1.0).problems()] == ["objective.position_noise"]
    picture = model.eval().pictures({"views": [torch.randn(2, 3, 32, 32)], "mask": fixed_masks(2)})
    assert set(picture) == {"flexpredict_blocks"}
