"""SemAIM: Song et al., "Semantic-Aware Autoregressive Image Modeling for Visual Representation Learning" (AAAI 2024).

Official code: skyoux/SemAIM (models/models_semaim.py, engines/engine_pretrain.py). Per step:

1. Order. A no-grad pass of the unmasked encoder (eval mode; or its EMA copy, or for SemAIM* the
   teacher) gives s_i = softmax_i cos(CLS, patch_i) on the final normalised tokens. The centre is
   c = argmax_i s_i; patches are predicted by increasing key_i = ||pos_i - pos_c||_2 + U(0, 1) * 1e-3,
   so the most semantic patch comes first and the order grows outwards from it.
2. Two streams over the same encoder weights (XLNet-style). Content stream h (the encoder's own blocks
   under a mask): patch i attends to patch j iff order(j) <= order(i); every token sees CLS, CLS sees
   only itself. Query stream g: starts from the fixed 2-D sin-cos position embedding and, after every
   depth / query_depth encoder blocks, a query block cross-attends from g to h with the strictly
   earlier mask order(j) < order(i) (plus CLS). So the prediction at patch i never sees patch i itself.
3. Loss. An MLP head on norm(g) regresses, at every patch (no masking ratio), either the Gaussian-blurred
   (kernel 9, sigma 1) per-patch-normalised pixels with L2 (SemAIM), or l2-normalised teacher patch
   features with ||p/|p| - t/|t|||^2 (SemAIM*, CLIP features).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.backbone import VitBackbone
from objectives.components.ema import EmaEncoder
from objectives.components.patches import normalise_patches, patchify
from objectives.components.pictures import MAX_IMAGES, display_scale, grid, heat_map, to_uint8_images
from objectives.components.pos_embed import sincos_2d
from objectives.components.teacher import attach_teacher
from objectives.components.zero import gathered_outside_forward
from objectives.configs import SemAIMConfig
from objectives.registry import register

# --- the order ---------------------------------------------------------------------


def cls_patch_similarity(cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """softmax over patches of cos(CLS, patch): cls (B, D), patches (B, N, D) -> (B, N), float32."""
    cls = F.normalize(cls.float(), dim=-1)
    patches = F.normalize(patches.float(), dim=-1)
    return torch.einsum("bd,bnd->bn", cls, patches).softmax(dim=1)


def centre_out_keys(similarity: torch.Tensor, grid: tuple[int, int], noise: torch.Tensor) -> torch.Tensor:
    """Sort keys of the semantic order: grid distance to the most CLS-like patch, plus `noise` (B, N).

    similarity: (B, N), row-major over the grid. Smaller key = predicted earlier.
    """
    gh, gw = grid
    centre = similarity.argmax(dim=1)  # (B,)
    rows = torch.arange(gh * gw, device=similarity.device) // gw  # (N,)
    cols = torch.arange(gh * gw, device=similarity.device) % gw
    d_row = rows[None, :] - (centre // gw)[:, None]  # (B, N)
    d_col = cols[None, :] - (centre % gw)[:, None]
    return (d_row.square() + d_col.square()).float().sqrt() + noise.float()


def order_ranks(keys: torch.Tensor) -> torch.Tensor:
    """(B, N) sort keys -> (B, N) long: each patch's position in the order (0 = predicted first)."""
    return keys.argsort(dim=1).argsort(dim=1)


def two_stream_masks(rank: torch.Tensor, num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention masks of the content and query streams: (B, 1, P + N, P + N) bool, True = may attend.

    rank: (B, N) order of each patch. Rows are queries, columns keys; prefix (CLS) tokens come first.
    Content: patch i sees patch j iff rank[j] <= rank[i]. Query: iff rank[j] < rank[i]. Every token
    sees the prefix tokens; prefix tokens see only the prefix (models_semaim.py generate_attention_mask).
    """
    b, n = rank.shape
    earlier_or_same = rank[:, None, :] <= rank[:, :, None]  # (B, N_query, N_key)
    strictly_earlier = rank[:, None, :] < rank[:, :, None]
    prefix_rows = torch.cat(
        [
            torch.ones(b, num_prefix, num_prefix, dtype=torch.bool, device=rank.device),
            torch.zeros(b, num_prefix, n, dtype=torch.bool, device=rank.device),
        ],
        dim=2,
    )  # (B, P, P + N)
    sees_prefix = torch.ones(b, n, num_prefix, dtype=torch.bool, device=rank.device)

    def full(patch_part: torch.Tensor) -> torch.Tensor:
        return torch.cat([prefix_rows, torch.cat([sees_prefix, patch_part], dim=2)], dim=1).unsqueeze(1)

    return full(earlier_or_same), full(strictly_earlier)


# --- targets -----------------------------------------------------------------------


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur with zero padding (util/blocks.py GaussianConv2d): (B, C, H, W) -> same.

    Kernel: exp(-(dx^2 + dy^2) / (2 sigma^2)) on a kernel_size x kernel_size grid around the centre,
    normalised to sum 1.
    """
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    one_d = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(one_d, one_d)
    kernel = (kernel / kernel.sum()).to(device=images.device, dtype=images.dtype)
    channels = images.shape[1]
    weight = kernel.expand(channels, 1, kernel_size, kernel_size)
    return F.conv2d(images, weight, padding=kernel_size // 2, groups=channels)


# --- attention with a mask, reusing a timm Block's weights -----------------------------

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
ATTENTION_PARTS = ("qkv", "num_heads", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def masked_self_attention(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """timm `Attention` on x (B, L, D) where query i attends to key j only where mask[..., i, j]."""
    b, length, _ = x.shape
    gate = getattr(attn, "gate", None)
    qkv = attn.qkv(x)  # (B, L, 3 * A)
    qkv = qkv.reshape(b, length, 3, attn.num_heads, qkv.shape[-1] // (3 * attn.num_heads)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, L, A / H)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
        scale=getattr(attn, "scale", None),
    )
    out = out.transpose(1, 2).reshape(b, length, -1)  # (B, L, A)
    norm = getattr(attn, "norm", None)  # timm's scale_norm (Identity by default)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def masked_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A timm ViT `Block` (pre-norm, layer scale, drop path) whose attention obeys `mask`."""
    x = x + block.drop_path1(block.ls1(masked_self_attention(block.attn, block.norm1(x), mask)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class QueryBlock(nn.Module):
    """Query-stream block (util/blocks.py Block_SelfCrossMask): g cross-attends to the content stream h.

    q = W_q LN1(g), k = W_k LN1(h), v = W_v LN1(h) (one LayerNorm for both); g += proj(attn);
    g += MLP(LN2(g)).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        return x.reshape(b, length, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, L, D / H)

    def forward(self, g: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """g, h: (B, L, D); mask: (B, 1, L, L) bool, True = g_i may attend to h_j."""
        hn = self.norm1(h)
        q, k, v = self._heads(self.q(self.norm1(g))), self._heads(self.k(hn)), self._heads(self.v(hn))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D / H)
        g = g + self.proj(out.transpose(1, 2).reshape(g.shape))
        return g + self.mlp(self.norm2(g))


# --- the objective -----------------------------------------------------------------------


class TwoStreamOutput(NamedTuple):
    """Both streams after the last block."""

    content: torch.Tensor  # (B, P + N, D): content stream h, before the final norm
    prediction: torch.Tensor  # (B, N, out): head(norm(g)) at the patches


# One crop, no mask: every patch is predicted, in the order computed in `forward`.
@register("semaim", SemAIMConfig)
class SemAIM(Objective):
    """Semantic-aware autoregressive image modeling with two-stream attention on the timm ViT."""

    def __init__(self, cfg: SemAIMConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        problems = cfg.problems()
        if problems:
            raise ValueError("; ".join(f"{key}: {msg}" for key, msg in problems))
        for i, block in enumerate(backbone.vit.blocks):
            missing = [p for p in BLOCK_PARTS if not hasattr(block, p)]
            missing += [f"attn.{p}" for p in ATTENTION_PARTS if not hasattr(getattr(block, "attn", None), p)]
            if missing:
                raise ValueError(
                    f"SemAIM masks the attention of timm ViT Blocks; block {i} ({type(block).__name__}) has no "
                    f"{', '.join(missing)}: use a plain timm VisionTransformer (model.arch=vit_*_patch*)"
                )
        depth = backbone.depth
        query_depth = cfg.query_depth or depth
        if depth % query_depth:
            raise ValueError(
                f"objective.query_depth: {query_depth} must divide the encoder depth {depth} "
                "(one query block after every depth / query_depth encoder blocks); null = one per block"
            )
        self.query_step = depth // query_depth
        width, grid, prefix = backbone.embed_dim, backbone.grid_size, backbone.num_prefix_tokens

        # Fixed 2-D sin-cos position embedding in the encoder (models_semaim.py pos_embed, requires_grad=False);
        # the query stream starts from the same table, zeros at the prefix (CLS) positions.
        table = sincos_2d(width, *grid)
        backbone.use_fixed_pos_embed(table)
        self.register_buffer(
            "query_pos", torch.cat([torch.zeros(prefix, width), table], dim=0).unsqueeze(0), persistent=False
        )  # (1, P + N, D)

        if cfg.target == "teacher":
            out_dim = self._attach_teacher()
        else:
            out_dim = backbone.patch_size**2 * 3

        first = backbone.vit.blocks[0]
        num_heads = int(first.attn.num_heads)
        mlp_ratio = first.mlp.fc1.out_features / width if hasattr(first.mlp, "fc1") else 4.0
        self.query_blocks = nn.ModuleList(QueryBlock(width, num_heads, mlp_ratio) for _ in range(query_depth))
        # Prediction head: MLP width -> 4 x width -> out (--prediction_head_type MLP).
        self.head = Mlp(width, int(width * mlp_ratio), out_dim)
        # xavier_uniform Linear weights, zero biases (models_semaim.py _init_weights).
        for module in [*self.query_blocks.modules(), *self.head.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.ema = EmaEncoder(backbone) if self._orders_by_ema() else None

    def _attach_teacher(self) -> int:
        """SemAIM*: hold the frozen teacher (loaded from cfg.teacher unless given); returns its feature size."""
        # Its CLS gives the order: return_cls whatever the config says.
        teacher = attach_teacher(self, dataclasses.replace(self.cfg.teacher, return_cls=True))
        if not teacher.return_cls:
            raise ValueError("SemAIM* orders patches by the teacher's CLS: build the teacher with return_cls=True")
        return teacher.feature_dim

    def _orders_by_ema(self) -> bool:
        cfg = self.cfg
        return cfg.order == "semantic" and cfg.target == "pixels" and cfg.order_source == "ema"

    # --- order ---------------------------------------------------------------------
    def order_from_tokens(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank (B, N), similarity (B, N)) from CLS (B, D) and patch features (B, N, D); noise from torch's RNG."""
        similarity = cls_patch_similarity(cls, patches)
        noise = torch.rand(similarity.shape, device=similarity.device) * self.cfg.order_noise
        return order_ranks(centre_out_keys(similarity, self.backbone.grid_size, noise)), similarity

    @torch.no_grad()
    def student_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Final normalised tokens of the unmasked encoder (or its EMA), eval mode, no grad: (B, P + N, D)."""
        if self.ema is not None:
            return self.ema(images)
        was_training = self.backbone.training
        self.backbone.train(False)
        try:
            return self.backbone(images)
        finally:
            self.backbone.train(was_training)

    # --- streams ---------------------------------------------------------------------
    def two_stream(self, images: torch.Tensor, rank: torch.Tensor) -> TwoStreamOutput:
        """Content and query streams for patch order `rank` (B, N); images (B, 3, H, W)."""
        vit, prefix = self.backbone.vit, self.backbone.num_prefix_tokens
        content_mask, query_mask = two_stream_masks(rank, prefix)
        patches = self.backbone.embed_patches(images)  # (B, N, D), with position embedding
        h = torch.cat([self.backbone._prefix_tokens(patches.shape[0]), patches], dim=1)  # (B, P + N, D)
        h = vit.norm_pre(vit.pos_drop(h))
        g = self.query_pos.to(h.dtype).expand(h.shape[0], -1, -1)  # (B, P + N, D)
        for i, block in enumerate(vit.blocks):
            h = masked_block(block, h, content_mask)
            if (i + 1) % self.query_step == 0:
                g = self.query_blocks[i // self.query_step](g, h, query_mask)
        # The encoder's final norm is shared with the query stream (models_semaim.py: self.norm(g)).
        return TwoStreamOutput(content=h, prediction=self.head(vit.norm(g))[:, prefix:])

    def pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Blurred, per-patch-normalised pixels (B, N, p * p * 3), float32."""
        x = images.float()
        if self.cfg.blur_kernel_size > 0:
            x = gaussian_blur(x, self.cfg.blur_kernel_size, self.cfg.blur_sigma)
        target = patchify(x, self.backbone.patch_size)
        return normalise_patches(target) if self.cfg.norm_pix_loss else target

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised
        b, n = images.shape[0], self.backbone.num_patches
        metrics: dict[str, torch.Tensor] = {}
        teacher = self.frozen_modules().get("teacher")
        features = teacher(images) if teacher is not None else None  # no grad
        if self.cfg.order == "random":  # SAIM's stochastic order
            rank = order_ranks(torch.rand(b, n, device=images.device))
        else:
            if features is not None:
                cls, patch_feats = features.cls, features.patches
            else:
                tokens = self.student_tokens(images)
                cls, patch_feats = tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens :]
            rank, similarity = self.order_from_tokens(cls, patch_feats)
            metrics["semaim/centre_peak"] = similarity.max(dim=1).values.mean() * n  # 1 = flat map
        pred = self.two_stream(images, rank).prediction.float()  # (B, N, out)
        if features is None:
            per_patch = (pred - self.pixel_targets(images)).square().mean(dim=-1)  # (B, N)
        else:
            target = F.normalize(features.patches.float(), dim=-1)
            per_patch = (F.normalize(pred, dim=-1) - target).square().sum(dim=-1)  # (B, N) = 2 - 2 cos
        loss = per_patch.mean()
        with torch.no_grad():
            quarter = max(1, n // 4)
            metrics["semaim/loss_first_quarter"] = per_patch[rank < quarter].mean()
            metrics["semaim/loss_last_quarter"] = per_patch[rank >= n - quarter].mean()
        return LossOutput(loss=loss, metrics=metrics)

    # --- pictures ------------------------------------------------------------------------
    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`semantic_order`: per image, original | heat map of each patch's rank in the generation order.

        Rank 0 (generated first, the centre) is the darkest, the last the brightest. The order comes
        from the same source as in `forward` (teacher, EMA or the eval-mode encoder; chance for
        order=random), with fresh tie-break noise.
        """
        images = batch["views"][0][:MAX_IMAGES]  # (B, 3, H, W)
        b, n = images.shape[0], self.backbone.num_patches
        teacher = self.frozen_modules().get("teacher")
        if self.cfg.order == "random":
            rank = order_ranks(torch.rand(b, n, device=images.device))
        elif teacher is not None:
            features = teacher(images)
            rank, _ = self.order_from_tokens(features.cls, features.patches)
        else:
            with gathered_outside_forward(self):
                tokens = self.student_tokens(images)  # (B, P + N, D)
            rank, _ = self.order_from_tokens(tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens :])
        gh, gw = self.backbone.grid_size
        ranks = rank.view(b, gh, gw).cpu().numpy()
        original = to_uint8_images(images, self.context.input_mean, self.context.input_std)
        rows = [[original[i], heat_map(ranks[i], self.backbone.patch_size)] for i in range(b)]
        return {"semantic_order": grid(rows, scale=display_scale(images.shape[-1]))}

    # --- EMA -----------------------------------------------------------------------------
    def ema_decay_at(self, step: int) -> float:
        """Linear ramp ema_decay -> ema_decay_end over ema_ramp_fraction of the run (engine_pretrain.py)."""
        cfg, total = self.cfg, self.context.total_steps
        ramp = cfg.ema_ramp_fraction * total
        if ramp > 0:
            progress = min(1.0, step / ramp)
        else:
            progress = 1.0 if total > 0 else 0.0  # no ramp: straight to the end value; unknown length: the start
        return cfg.ema_decay + progress * (cfg.ema_decay_end - cfg.ema_decay)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update of the order encoder after each optimizer step (timm ModelEma.update)."""
        if self.ema is None:
            return
        self.ema.update(self.backbone.vit, self.ema_decay_at(step))
