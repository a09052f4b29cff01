"""Cross-attention: queries that read a memory without attending to each other.

CrossMAE's decoder (mask queries over the encoder's visible tokens) and DMT-JEPA's local
aggregation head (one query per patch over its chosen neighbours) are built from these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, M, W) over a memory (B, L, D): q from the queries, k and v from the memory."""

    def __init__(self, dim: int, memory_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(memory_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, m, w = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, m, heads, w // heads).transpose(1, 2)  # (B, h, M, w/h)
        k, v = self.kv(memory).reshape(b, memory.shape[1], 2, heads, w // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, M, w/h)
        return self.proj(out.transpose(1, 2).reshape(b, m, w))


class CrossAttentionBlock(nn.Module):
    """x + cross_attn(LN(x), memory), then x + mlp(LN(x)): no attention between the queries."""

    def __init__(self, dim: int, memory_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CrossAttention(dim, memory_dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), memory)
        return x + self.mlp(self.norm2(x))
