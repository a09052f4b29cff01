"""The joint-embedding predictive architectures' predictor (I-JEPA and its family): a narrow ViT that
reads the context encoder's tokens at their positions and a mask token at each target position,
and predicts the target encoder's features there.

facebookresearch/ijepa src/models/vision_transformer.py `VisionTransformerPredictor`: a linear
map to the predictor width, fixed 2-D sin-cos positions, pre-norm transformer blocks, a final
LayerNorm and a linear map back to the encoder width; weights truncated-normal (std 0.02), each
block's output projections rescaled by 1 / sqrt(2 x its 1-based depth).
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from objectives.components.pos_embed import sincos_2d


def keep_indices(keep: torch.Tensor) -> torch.Tensor:
    """(M, N) bool (True = keep) -> (M, K) indices of the first K kept patches in raster order, K the
    smallest count over the M rows (the official collator truncates every mask of a batch to the
    shortest one the same way: `mask[:min_keep]`)."""
    counts = keep.sum(dim=1)
    k = int(counts.min())
    if k < 1:
        raise ValueError("a mask keeps no patch")
    # Stable sort puts kept patches first, each group in raster order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return order[:, :k]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (M, N, D), idx (M, K) -> (M, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class JepaPredictor(nn.Module):
    """Context tokens (B, Kc, D) at context_idx, targets at target_idx (R x B, Kt) -> predictions (R x B, Kt, D)."""

    def __init__(
        self, embed_dim: int, grid: tuple[int, int], *, width: int, depth: int, num_heads: int, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("pos_embed", sincos_2d(width, *grid), persistent=False)  # (N, width), fixed
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.proj = nn.Linear(width, embed_dim)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for depth, block in enumerate(self.blocks, start=1):  # fix_init_weight
            block.attn.proj.weight.div_(math.sqrt(2.0 * depth))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * depth))

    def forward(
        self,
        context: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        *,
        target_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """context (B, Kc, D) encoder tokens at context_idx (B, Kc); target_idx (R x B, Kt), target-major
        (row t x B + b is target t of image b). target_pos (R x B, Kt, width) replaces the targets'
        position embeddings (a predictor conditioned on other positions, e.g. noised ones)."""
        b = context.shape[0]
        repeats, rem = divmod(target_idx.shape[0], b)
        if rem:
            raise ValueError(f"target_idx has {target_idx.shape[0]} rows, not a multiple of the batch {b}")
        pos = self.pos_embed.to(context.dtype)
        x = self.embed(context) + pos[context_idx]  # (B, Kc, W)
        x = x.repeat(repeats, 1, 1)  # (R B, Kc, W), target-major like target_idx
        where = pos[target_idx] if target_pos is None else target_pos.to(x.dtype)
        queries = self.mask_token.to(x.dtype) + where  # (R B, Kt, W)
        x = torch.cat([x, queries], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x[:, context.shape[1] :]))  # (R B, Kt, D)
