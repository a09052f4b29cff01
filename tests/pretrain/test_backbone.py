"""The backbone adapters compute what timm's own forward computes: a ViT's tokens, any model's pooled features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from objectives.components.backbone import PooledBackbone
from objectives.components.contrastive import SyncBatchNorm2d
from pretrain.backbone import arch_kwargs, build_backbone, fused_attn_enabled, set_fused_attn
from pretrain.config import ModelConfig


def tiny_backbone():
    torch.manual_seed(0)
    return build_backbone(
        ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    ).eval()


def test_full_forward_equals_timm_forward_features() -> None:
    bb = tiny_backbone()
    images = torch.randn(2, 3, 32, 32)
    assert bb.grid_size == (4, 4) and bb.num_patches == 16
    torch.testing.assert_close(bb(images), bb.vit.forward_features(images))


def test_keep_idx_equals_running_timm_blocks_on_the_gathered_sequence() -> None:
    bb = tiny_backbone()
    vit = bb.vit
    images = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 7], [15, 1, 2]])
    out = bb.encode(bb.embed_patches(images), keep_idx=keep, return_blocks=[0, -1])
    # Brute force: patch embed + pos, pick tokens by hand, prepend CLS + its pos, run blocks.
    tokens = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    picked = torch.stack([tokens[b, keep[b]] for b in range(2)])
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(2, -1, -1), picked], dim=1)
    first = vit.blocks[0](x)
    last = vit.blocks[2](vit.blocks[1](first))
    torch.testing.assert_close(out.block_outputs[0], first)
    torch.testing.assert_close(out.block_outputs[2], last)
    torch.testing.assert_close(out.tokens, vit.norm(last))


def test_fixed_pos_embed_is_frozen_and_prefix_zero() -> None:
    bb = tiny_backbone()
    table = torch.arange(16 * 32, dtype=torch.float32).reshape(16, 32)
    bb.use_fixed_pos_embed(table)
    assert not bb.vit.pos_embed.requires_grad
    torch.testing.assert_close(bb.vit.pos_embed[0, 1:], table)
    assert bb.vit.pos_embed[0, 0].abs().sum() == 0


def test_fused_attention_switch_reaches_every_block_and_keeps_the_math() -> None:
    kwargs = dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    torch.manual_seed(0)
    fused = build_backbone(ModelConfig(**kwargs))
    torch.manual_seed(0)
    explicit = build_backbone(ModelConfig(**kwargs, fused_attn=False))
    flags = [(a.attn.fused_attn, b.attn.fused_attn) for a, b in zip(fused.vit.blocks, explicit.vit.blocks, strict=True)]
    assert flags == [(True, False)] * 3
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused(x), explicit(x), rtol=1e-5, atol=1e-5)


def test_fused_attention_auto_is_explicit_only_in_bf16_on_cpu() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert fused_attn_enabled("auto", cpu, torch.float32) and fused_attn_enabled("auto", gpu, torch.bfloat16)
    assert not fused_attn_enabled("auto", cpu, torch.bfloat16)
    assert fused_attn_enabled("auto")  # device not known yet (build_backbone): timm's default
    assert fused_attn_enabled(True, cpu, torch.bfloat16) and not fused_attn_enabled(False, gpu, torch.float32)


def test_fused_attention_switch_reaches_the_objectives_own_blocks() -> None:
    # MAE builds its decoder from timm blocks itself; the run sets them with the encoder's.
    from objectives.configs import MAEConfig
    from objectives.mae import MAE

    cfg = MAEConfig(decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)
    mae = MAE(cfg, tiny_backbone())
    set_fused_attn(mae, False)
    flags = [m.fused_attn for m in mae.modules() if hasattr(m, "fused_attn")]
    assert flags == [False] * 5  # 3 encoder blocks + 2 decoder blocks


# --- other families: pooled features only -----------------------------------------------------


def test_a_vits_pooled_feature_is_its_final_cls_token() -> None:
    bb = tiny_backbone()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bb.pooled(images), bb.vit.forward_features(images)[:, 0])
    assert bb.timm_model is bb.vit


SWIN = ModelConfig(
    arch="swin_tiny_patch4_window7_224",
    img_size=32,
    patch_size=4,
    embed_dim=16,
    kwargs={"window_size": 4, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
)


@pytest.mark.parametrize(
    "cfg", [ModelConfig(arch="resnet18", img_size=32), ModelConfig(arch="convnext_atto", img_size=32), SWIN]
)
def test_other_families_give_timms_pooled_features_and_export_under_timms_names(cfg: ModelConfig, tmp_path) -> None:
    import timm

    from objectives.artifacts import save_encoder
    from objectives.components.backbone import ConvNeXtBackbone, SwinBackbone
    from objectives.components.teacher import load_encoder
    from pretrain.features import pooled_features

    arch = cfg.arch
    if cfg is SWIN:  # a patch grid: built for the input size, with the Swin's own arguments
        assert arch_kwargs(cfg) == {"num_classes": 0, "img_size": 32, "patch_size": 4, "embed_dim": 16, **cfg.kwargs}
    else:
        assert arch_kwargs(cfg) == {"num_classes": 0}  # no ViT sizes for a CNN
    torch.manual_seed(0)
    bb = build_backbone(cfg)
    adapter = {"swin_tiny_patch4_window7_224": SwinBackbone, "convnext_atto": ConvNeXtBackbone}.get(
        arch, PooledBackbone
    )
    assert isinstance(bb, adapter) and bb.timm_model is bb.model
    plain = timm.create_model(arch, **arch_kwargs(cfg))
    bn = sum(type(m) is nn.BatchNorm2d for m in plain.modules())
    assert sum(type(m) is SyncBatchNorm2d for m in bb.modules()) == bn  # every BN over the global batch
    assert (bn > 0) == (arch == "resnet18")  # ConvNeXt and Swin normalise with LayerNorm
    images = torch.randn(3, 3, 32, 32)
    bb.train()
    bb(images)  # one training step's statistics, so that eval mode reads non-trivial running stats
    bb.eval()
    with torch.no_grad():
        feats = bb.pooled(images)
    assert feats.shape == (3, plain.num_features) == (3, bb.embed_dim)
    # Exported under timm's key names: loads strictly into timm.create_model(arch) with identical features.
    path = save_encoder(bb.timm_model, tmp_path / "encoder", arch, arch_kwargs(cfg), img_size=32)
    assert set(bb.timm_model.state_dict()) == set(plain.state_dict())
    loaded, meta = load_encoder(str(path))
    assert meta["img_size"] == 32
    with torch.no_grad():
        torch.testing.assert_close(pooled_features(loaded, images, "cls"), feats)
        torch.testing.assert_close(loaded(images), feats)  # timm's own forward with num_classes=0
