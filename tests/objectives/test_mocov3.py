"""MoCo v3 objective: forward by hand, momentum schedule and update, ViT tricks, and the EMA under a real ZeRO-3 engine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from objectives.base import DataNeeds, RunContext
from objectives.components.pos_embed import sincos_2d
from objectives.configs import MoCoV3Config, ViewAugmentConfig
from objectives.mocov3 import MoCoV3
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig
from pretrain.engine import param_groups

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def make(total_steps: int = 10, **overrides: object) -> MoCoV3:
    torch.manual_seed(0)
    cfg = MoCoV3Config(mlp_dim=64, dim=16, total_steps=total_steps, **overrides)
    return MoCoV3(cfg, build_backbone(TINY))


def views(batch: int, seed: int) -> list[torch.Tensor]:
    """Two "views" of `batch` random images: the second is the first plus noise."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(batch, 3, 32, 32, generator=gen)
    return [first, first + 0.5 * torch.randn(first.shape, generator=gen)]


def ctr_by_loop(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """CE(q_i . k_j / T, i) * 2T over l2-normalised rows, written out."""
    qs = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in q.tolist()]
    ks = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in k.tolist()]
    total = 0.0
    for i, qi in enumerate(qs):
        logits = [sum(a * b for a, b in zip(qi, kj, strict=True)) / t for kj in ks]
        total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    return total / len(qs) * 2 * t


def test_forward_equals_symmetric_infonce_by_hand() -> None:
    model = make(temperature=0.2).train()
    v1, v2 = views(4, 1)
    torch.manual_seed(5)
    out = model({"views": [v1, v2]})
    torch.manual_seed(5)
    x1, x2 = model.augment1(v1), model.augment2(v2)
    with torch.no_grad():
        # timm's own forward_features for the CLS token; at initialisation the key encoder is the query's copy.
        def encode(x: torch.Tensor) -> torch.Tensor:
            return model.projector(model.backbone.vit.forward_features(x)[:, 0])

        k1, k2 = encode(x1), encode(x2)
        q1, q2 = model.predictor(k1), model.predictor(k2)
    expected = ctr_by_loop(q1, k2, 0.2) + ctr_by_loop(q2, k1, 0.2)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.metrics["mocov3/momentum"]) == pytest.approx(0.99)


def test_momentum_encoder_is_an_untrained_checkpointed_copy() -> None:
    model = make()
    key = model.momentum_encoder
    assert list(key.parameters()) == []
    online = dict(model.backbone.named_parameters(prefix="backbone"))
    online.update(model.projector.named_parameters(prefix="projector"))
    buffers = dict(key.named_buffers())
    assert set(online) <= set(buffers) and not any(n.startswith("predictor") for n in buffers)
    for name, p in online.items():
        assert torch.equal(buffers[name], p.detach()), name
    state = model.state_dict()
    assert "momentum_encoder.backbone.vit.blocks.0.attn.qkv.weight" in state
    optimised = {id(p) for group in param_groups(model, 0.1) for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    model({"views": views(4, 2)}).loss.backward()
    assert all(b.grad is None for b in key.buffers())
    assert model.predictor[0].weight.grad is not None


def test_after_step_applies_the_cosine_schedule_by_hand() -> None:
    model = make(total_steps=4, momentum=0.9)
    name = "projector.0.weight"
    with torch.no_grad():
        model.projector[0].weight.add_(1.0)  # the query moved away from the key
    old = model.momentum_encoder.get_buffer(name).clone()
    query = model.projector[0].weight.detach().clone()
    model.after_step(0)  # the next forward is iteration 1 of 4: m = 1 - 0.5 (1 + cos(pi / 4)) (1 - 0.9)
    m = 1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.1
    assert float(model.current_momentum) == pytest.approx(m)
    torch.testing.assert_close(model.momentum_encoder.get_buffer(name), m * old + (1 - m) * query)
    before = model.momentum_encoder.get_buffer(name).clone()
    model.after_step(3)  # iteration 4 of 4: m = 1, the key encoder stays
    assert float(model.current_momentum) == pytest.approx(1.0)
    torch.testing.assert_close(model.momentum_encoder.get_buffer(name), before)
    const = make(total_steps=0, momentum=0.5, momentum_cosine=False)
    assert const.momentum(0) == const.momentum(1000) == 0.5


def test_vit_recipe_frozen_patch_projection_and_sincos_positions() -> None:
    model = make()
    vit = model.backbone.vit
    proj = vit.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad and not vit.pos_embed.requires_grad
    bound = math.sqrt(6 / (3 * 8 * 8 + 32))  # xavier-uniform of the flattened 3x8x8 -> 32 projection (vits.py)
    assert float(proj.weight.abs().max()) <= bound and float(proj.weight.abs().max()) > 0.8 * bound
    assert float(proj.bias.abs().max()) == 0.0
    torch.testing.assert_close(vit.pos_embed[0, 1:], sincos_2d(32, 4, 4))
    model.train()
    model({"views": views(4, 3)}).loss.backward()
    assert proj.weight.grad is None and vit.blocks[0].attn.qkv.weight.grad is not None
    learned = make(freeze_patch_embed=False, fixed_pos_embed=False)
    assert learned.backbone.vit.patch_embed.proj.weight.requires_grad and learned.backbone.vit.pos_embed.requires_grad


def test_total_steps_from_the_run_context_or_the_config() -> None:
    backbone = build_backbone(TINY)
    cfg = MoCoV3Config(mlp_dim=16, dim=8)
    assert MoCoV3(cfg, backbone, RunContext(total_steps=7)).total_steps == 7
    assert MoCoV3(MoCoV3Config(mlp_dim=16, dim=8, total_steps=3), backbone, RunContext(total_steps=7)).total_steps == 3
    with pytest.raises(ValueError, match="total_steps"):
        MoCoV3(cfg, backbone)


def test_loss_falls_on_a_fixed_batch(train_on_batch) -> None:
    # Photometric augmentation off (tested on its own): the two views differ by their noise only.
    off = ViewAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    model = make(total_steps=30, view1=off, view2=off).train()
    batch = {"views": views(8, 4)}
    losses, out = train_on_batch(model, batch, 30, lr=3e-3)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert float(out.metrics["mocov3/acc"]) > 0.5


def test_registry_data_needs_and_config_problems() -> None:
    assert get_objective_class("mocov3") is MoCoV3
    cfg = MoCoV3Config()
    assert cfg.problems() == []
    assert (cfg.temperature, cfg.dim, cfg.mlp_dim, cfg.momentum) == (0.2, 256, 4096, 0.99)
    assert cfg.momentum_cosine and cfg.total_steps == 0
    assert (cfg.freeze_patch_embed, cfg.fixed_pos_embed) == ("auto", "auto")  # on for a ViT
    assert (cfg.view1.blur_prob, cfg.view1.solarize_prob, cfg.view2.blur_prob, cfg.view2.solarize_prob) == (
        1.0,
        0.0,
        0.1,
        0.2,
    )
    assert (cfg.view1.brightness, cfg.view1.contrast, cfg.view1.saturation, cfg.view1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert MoCoV3.data_needs(cfg) == DataNeeds(views=2)
    bad = MoCoV3Config(temperature=-1, dim=0, momentum=1.0, total_steps=-2, view2=ViewAugmentConfig(hue=0.6))
    assert {k for k, _ in bad.problems()} == {
        "objective.temperature",
        "objective.dim",
        "objective.momentum",
        "objective.total_steps",
        "objective.view2.hue",
    }


# --- a real DeepSpeed ZeRO-3 engine (one process, gloo, CPU accelerator) ------------------------


def _engine(precision: str, seed: int) -> Any:
    from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig
    from pretrain.engine import build_engine

    torch.manual_seed(seed)
    objective = MoCoV3(MoCoV3Config(mlp_dim=64, dim=16), build_backbone(TINY), RunContext(total_steps=10))
    trainer = TrainerConfig(num_workers=1, batch_size=4, max_steps=10)
    ds = DeepSpeedConfig(zero_stage=3, precision=precision, force_precision=True)  # bf16 also where emulated
    return build_engine(objective, OptimConfig(base_lr=None, lr=1e-2), trainer, ds)


def _zero3_worker(rank: int, out_dir: str) -> None:
    import deepspeed

    from pretrain.trainer import checkpoint

    engine = _engine("fp32", seed=0)
    model = engine.module
    qkv = model.backbone.vit.blocks[0].attn.qkv.weight
    result: dict[str, object] = {"partitioned": hasattr(qkv, "ds_id") and qkv.numel() == 0}
    batch = {"views": views(4, 5)}
    torch.manual_seed(1)
    out = engine(batch)
    engine.backward(out.loss)
    engine.step()
    result["old"] = {k: v.clone() for k, v in model.momentum_encoder.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        result["query"] = {n: p.detach().clone() for n, p in model._online().named_parameters()}
    model.after_step(0)
    result["m"] = float(model.current_momentum)
    result["new"] = {k: v.clone() for k, v in model.momentum_encoder.state_dict().items()}
    checkpoint.save(engine, Path(out_dir) / "ckpt", rank=0, step=1, data_state={})
    # A fresh engine from other initial weights, restored from the checkpoint.
    fresh = _engine("fp32", seed=1)
    checkpoint.restore(fresh, Path(out_dir) / "ckpt", rank=0, world_size=1)
    result["restored"] = {k: v.clone() for k, v in fresh.module.momentum_encoder.state_dict().items()}
    result["restored_m"] = float(fresh.module.current_momentum)
    # bf16: parameters are cast, the key encoder's buffers stay float32, a step runs.
    half = _engine("bf16", seed=0)
    torch.manual_seed(1)
    out = half({"views": [v.bfloat16() for v in views(4, 5)]})
    half.backward(out.loss)
    half.step()
    half.module.after_step(0)
    result["bf16"] = {
        "param": str(half.module.predictor[0].weight.dtype),
        "key": str(half.module.momentum_encoder.get_buffer("projector.0.weight").dtype),
        "loss": float(out.loss.detach()),
    }
    torch.save(result, Path(out_dir) / "result.pt")


def test_momentum_update_under_zero3_and_checkpoint_round_trip(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_zero3_worker, 1, str(tmp_path))
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["partitioned"]  # ZeRO-3 really split the query parameters; the EMA had to gather them
    m, old, query, new = result["m"], result["old"], result["query"], result["new"]
    assert m == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 10)) * 0.01)
    assert set(query) <= set(new)
    moved = 0.0
    for name, q in query.items():
        torch.testing.assert_close(new[name], m * old[name] + (1 - m) * q)
        moved = max(moved, float((q - old[name]).abs().max()))
    assert moved > 0  # the optimizer step moved the query away from the key
    for name, value in new.items():
        assert torch.equal(result["restored"][name], value), name
    assert result["restored_m"] == pytest.approx(m)
    bf16 = result["bf16"]
    assert (bf16["param"], bf16["key"]) == ("torch.bfloat16", "torch.float32") and math.isfinite(bf16["loss"])


def test_on_a_cnn_the_key_encoder_copies_the_whole_backbone_and_the_loss_falls(train_on_batch) -> None:
    """ResNet-18 (BatchNorm over the global batch): queries and keys from timm's pooled features."""
    off = ViewAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    cfg = MoCoV3Config(mlp_dim=64, dim=16, total_steps=20, view1=off, view2=off)  # "auto": off on a CNN
    assert cfg.backbone_problems("resnet") == []
    forced = MoCoV3Config(freeze_patch_embed=True, fixed_pos_embed=True)
    assert [k for k, _ in forced.backbone_problems("resnet")] == [
        "objective.freeze_patch_embed",
        "objective.fixed_pos_embed",
    ]
    assert forced.backbone_problems("vit") == []
    assert [k for k, _ in MoCoV3Config(fixed_pos_embed="yes").problems()] == ["objective.fixed_pos_embed"]
    assert [k for k, _ in MoCoV3Config(proj_layers=0).problems()] == ["objective.proj_layers"]
    torch.manual_seed(0)
    model = MoCoV3(cfg, build_backbone(ModelConfig(arch="resnet18"))).train()
    # MoCo_ResNet's 2-layer projector ("auto"; a ViT gets MoCo_ViT's 3): 512 -> 64 -> 16.
    linears = [m for m in model.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 16)]
    key = model.momentum_encoder["backbone"]
    # The key encoder's backbone holds the query backbone's weights as buffers (running stats too).
    query_state = model.backbone.state_dict()
    assert key.state_dict().keys() == query_state.keys()
    assert all(torch.equal(key.state_dict()[k], v) for k, v in query_state.items())
    with pytest.raises(ValueError, match="are for ViTs"):
        MoCoV3(
            MoCoV3Config(mlp_dim=64, dim=16, total_steps=20, freeze_patch_embed=True),
            build_backbone(ModelConfig(arch="resnet18")),
        )
    batch = {"views": views(8, 4)}
    losses, out = train_on_batch(model, batch, 12, lr=3e-3)
    assert train_on_batch.falls(losses), losses
