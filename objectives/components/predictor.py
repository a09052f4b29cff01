"""The joint-embedding predictive architectures' predictor (I-JEPA and its family): a narrow ViT that
reads the context encoder's tokens at their positions and a mask token at each target position,
and predicts the target encoder's features there.

facebookresearch/ijepa src/models/vision_transformer.py `VisionTransformerPredictor`: a linear
map to the predictor width, fixed 2-D sin-cos positions, pre-norm transformer blocks, a final
LayerNorm and a linear map back to the encoder width; weights truncated-normal (std 0.02), each
block's output projections rescaled by 1 / sqrt(2 x its 1-based depth).

DMT-JEPA's local aggregation head (`LocalAggregation`) sits on both sides of it: on the target
encoder's tokens it builds each patch's target from its most similar window neighbours, on the
context encoder's tokens it adds what a mean-token query reads from them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from objectives.components.attention import CrossAttentionBlock
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


def window_neighbours(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(N, size^2 - 1) indices of each patch's neighbours: the size x size window centred on it, itself
    excluded, wrapping around the grid's edges (DMTJEPA src/models/local_agg_head.py `get_local_index`:
    every patch has the same number of neighbours), in raster order."""
    gh, gw = grid
    if size < 3 or size % 2 == 0:
        raise ValueError(f"a neighbour window is odd and >= 3, got {size}")
    if size > min(gh, gw):
        raise ValueError(f"a {size} x {size} neighbour window does not fit the {gh} x {gw} patch grid")
    index = torch.arange(gh * gw)
    row, col = index // gw, index % gw
    half = size // 2
    columns = [
        ((row + dr) % gh) * gw + (col + dc) % gw
        for dr in range(-half, half + 1)
        for dc in range(-half, half + 1)
        if (dr, dc) != (0, 0)
    ]
    return torch.stack(columns, dim=1).sort(dim=1).values


class _AggregationBlock(CrossAttentionBlock):
    """A class-attention block (CaiT): one query reads LN([query; keys]); query + attention, then + MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__(dim, dim, num_heads, mlp_ratio)

    def attend(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (M, 1, D), keys (M, K, D) -> (M, 1, D): the attention output (no residual)."""
        memory = self.norm1(torch.cat([query, keys], dim=1))
        return self.attn(memory[:, :1], memory)


class LocalAggregation(nn.Module):
    """DMT-JEPA's local aggregation head (DMTJEPA src/models/local_agg_head.py `LocalAggHead`): class-attention
    blocks whose query starts as the image's mean token.

    `targets` (the EMA copy, on the target encoder's tokens): per patch, the `neighbours` patches of its
    window most similar to it (cosine) are the keys; the aggregate is that patch's target.
    `context` (the trained head, on the context encoder's tokens): the query reads all tokens and its
    output is added to every token (then each block's MLP), before the predictor.
    """

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        *,
        num_heads: int,
        neighbours: int,
        window: int,
        depth: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.register_buffer("windows", window_neighbours(grid, window), persistent=False)  # (N, W)
        if not 1 <= neighbours <= self.windows.shape[1]:
            raise ValueError(f"neighbours must be in 1..{self.windows.shape[1]} for a {window} x {window} window")
        self.neighbours = neighbours
        self.blocks = nn.ModuleList(_AggregationBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for module in self.modules():  # LocalAggHead._init_weights
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> (indices (B, N, k) of each patch's most similar window neighbours, their cosine (B, N, k))."""
        b, n, _ = x.shape
        unit = F.normalize(x.float(), dim=-1)
        similarity = unit @ unit.transpose(1, 2)  # (B, N, N)
        windows = self.windows.expand(b, n, -1)
        in_window = torch.gather(similarity, 2, windows)  # (B, N, W)
        top, order = in_window.topk(self.neighbours, dim=-1)
        return torch.gather(windows, 2, order), top

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> (per-patch aggregates (B, N, D), cosine of the chosen neighbours (B, N, k))."""
        b, n, d = x.shape
        chosen, similarity = self.choose(x)
        keys = gather_tokens(x, chosen.flatten(1)).reshape(b * n, self.neighbours, d)
        query = x.mean(dim=1, keepdim=True).repeat_interleave(n, dim=0)  # (B N, 1, D): each patch's own image
        for block in self.blocks:
            query = query + block.attend(query, keys)
            query = query + block.mlp(block.norm2(query))
        return self.norm(query).reshape(b, n, d), similarity

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, K, D) -> (B, K, D): every token plus what the mean token's query reads from all of them."""
        for block in self.blocks:
            x = x + block.attend(x.mean(dim=1, keepdim=True), x)
            x = x + block.mlp(block.norm2(x))
        return self.norm(x)
