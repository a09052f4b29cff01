"""BEiT v2's patch-aggregation branch (also CCViT's pixel branch), and BEiT's init of new modules.

Peng et al., "BEiT v2" (2022), Sec. 2.3; microsoft/unilm beit2 modeling_pretrain.py. The
encoder sees block-masked patches as a learned mask token. The branch concatenates the
final [CLS] token (before the final norm) with the patch tokens of block `early_layers`
(1-based) and runs `head_layers` more ViT blocks, so the [CLS] token must carry the
image's content to the branch's prediction.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.models.vision_transformer import Block
from torch import nn

from objectives.components.backbone import VitBackbone


def aggregation_layer(early_layers: int | None, depth: int) -> int:
    """The 1-based block whose patch tokens the branch reads: `early_layers`, or depth - 3 (9 of 12, 21 of 24)."""
    layer = max(1, depth - 3) if early_layers is None else early_layers
    if not 1 <= layer <= depth:
        raise ValueError(f"objective.early_layers={layer}: the encoder has {depth} blocks")
    return layer


def aggregation_blocks(backbone: VitBackbone, head_layers: int) -> nn.ModuleList:
    """`head_layers` ViT blocks of the encoder's width and head count (--head_layers 2)."""
    heads = int(backbone.vit.blocks[0].attn.num_heads)
    return nn.ModuleList(Block(backbone.embed_dim, heads, qkv_bias=True) for _ in range(head_layers))


def encode_with_aggregation(
    backbone: VitBackbone,
    images: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    early_layers: int,
    blocks: nn.ModuleList,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normed patch tokens (B, N, D), the branch's tokens (B, 1 + N, D), not normed).

    images: (B, 3, H, W); mask: (B, N) bool, True = the patch's embedding is the mask token.
    """
    prefix = backbone.num_prefix_tokens
    tokens = backbone.embed_patches(images, mask=mask, mask_token=mask_token)
    last = backbone.depth - 1
    out = backbone.encode(tokens, return_blocks=(early_layers - 1, last))
    # The final CLS (before the norm) + block `early_layers`' patch tokens.
    x = torch.cat([out.block_outputs[last][:, :1], out.block_outputs[early_layers - 1][:, prefix:]], dim=1)
    for block in blocks:
        x = block(x)
    return out.tokens[:, prefix:], x


@torch.no_grad()
def beit_init(mask_token: torch.Tensor, modules: Iterable[nn.Module]) -> None:
    """BEiT's init of the modules a method adds: truncated normal (std 0.02), zero biases, unit norms."""
    nn.init.trunc_normal_(mask_token, std=0.02)
    for module in modules:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
