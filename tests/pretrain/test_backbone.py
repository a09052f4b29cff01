"""The ViT adapter computes what timm's own forward computes."""

from __future__ import annotations

import torch

from pretrain.backbone import build_backbone
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
