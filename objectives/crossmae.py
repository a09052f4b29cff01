"""CrossMAE: Fu, Lian, Wang, et al., "Rethinking Patch Dependence for Masked Autoencoders" (2024).

MAE's encoder on the visible 25% of patches; the decoder drops self-attention between the
masked tokens: a mask query per reconstructed patch attends only to the visible tokens
(cross-attention), so each patch is predicted independently of the others, and only a subset
of the masked patches (25% of all) is reconstructed. Each decoder block reads its own learned
mix of the encoder's block outputs (feature weighting):

    h_1..h_L = encoder blocks on the visible patches        (B, 1 + K, D) each
    m_j = LN_j(sum_i w_ji h_i)                               memory of decoder block j
    x = mask_token + pos[predicted]                          (B, M, W), M = 0.25 N
    x = x + cross_attn_j(LN(x), m_j); x = x + mlp_j(LN(x))  j = 1..8
    loss = mean over predicted patches of the per-patch MSE to normalised pixels

Its decoder attends M x (1 + K) pairs per block instead of MAE's (1 + N)^2 and runs M queries
instead of N + 1 tokens: the cost is in `scripts/decoder_cost.py` and docs/objectives.md.
Recipe from TonyLianLong/CrossMAE; see `CrossMAEConfig`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from data.needs import DataNeeds, MaskSpec
from objectives.base import LossOutput, Objective, RunContext
from objectives.components.attention import CrossAttentionBlock
from objectives.components.backbone import VitBackbone
from objectives.components.masking import masking_from_mask
from objectives.components.patches import normalise_patches, patchify, unpatchify
from objectives.components.pictures import MASK_GREY, MAX_IMAGES, display_scale, grid, to_uint8_images
from objectives.components.pos_embed import sincos_2d
from objectives.components.predictor import gather_tokens
from objectives.components.zero import gathered_outside_forward
from objectives.configs import CrossMAEConfig
from objectives.registry import register


def prediction_subset(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool mask (True = masked) -> (B, count) indices of masked patches, drawn uniformly
    (from torch's global generator: a resumed run draws the same), in raster order."""
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)  # unmasked last
    chosen = scores.argsort(dim=1)[:, :count]
    return chosen.sort(dim=1).values


# One crop and MAE's uniform random mask of mask_ratio, drawn in the loader workers.
@register("crossmae", CrossMAEConfig, mask="random")
class CrossMAE(Objective):
    """MAE's encoder on visible patches; a cross-attention decoder reconstructs a subset of the masked ones."""

    def __init__(self, cfg: CrossMAEConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        grid_size, dim, width = backbone.grid_size, backbone.embed_dim, cfg.decoder_embed_dim
        backbone.use_fixed_pos_embed(sincos_2d(dim, *grid_size))  # as MAE (models_cross.py builds on it)
        self.num_predicted = max(1, round(cfg.prediction_ratio * backbone.num_patches))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("decoder_pos_embed", sincos_2d(width, *grid_size), persistent=False)  # (N, W)
        depth = backbone.depth
        if cfg.weight_fm:
            # w_ji: decoder block j's weights over the encoder's block outputs (normal, std 1/sqrt(L)).
            self.feature_weights = nn.Parameter(torch.randn(cfg.decoder_depth, depth) / math.sqrt(depth))
            self.memory_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(cfg.decoder_depth))
        self.decoder_blocks = nn.ModuleList(
            CrossAttentionBlock(width, dim, cfg.decoder_num_heads, cfg.decoder_mlp_ratio)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(width, eps=1e-6)
        self.decoder_pred = nn.Linear(width, backbone.patch_size**2 * 3)
        self._init_decoder()

    @classmethod
    def data_needs(cls, cfg: CrossMAEConfig) -> DataNeeds:
        return DataNeeds(views=1, mask=MaskSpec("random", cfg.mask_ratio))

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [*self.decoder_blocks.modules(), self.decoder_norm, self.decoder_pred]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def memories(self, images: torch.Tensor, keep_idx: torch.Tensor) -> list[torch.Tensor]:
        """What each decoder block attends to: (B, 1 + K, D) per block."""
        backbone = self.backbone
        out = backbone.encode(
            backbone.embed_patches(images),
            keep_idx=keep_idx,
            return_blocks=range(backbone.depth) if self.cfg.weight_fm else (),
        )
        if not self.cfg.weight_fm:
            return [out.tokens] * self.cfg.decoder_depth
        return self.mix(torch.stack([out.block_outputs[i] for i in range(backbone.depth)], dim=-1))

    def mix(self, stacked: torch.Tensor) -> list[torch.Tensor]:
        """Feature weighting: the encoder's block outputs (B, L, D, depth) -> LN_j(sum_i w_ji h_i) per decoder block j."""
        mixed = stacked @ self.feature_weights.to(stacked.dtype).T  # (B, L, D, decoder_depth)
        return [norm(mixed[..., j]) for j, norm in enumerate(self.memory_norms)]

    def decode(self, memories: list[torch.Tensor], predicted_idx: torch.Tensor) -> torch.Tensor:
        """Pixel predictions (B, M, p*p*3) of the patches at predicted_idx (B, M)."""
        x = self.mask_token + self.decoder_pos_embed[predicted_idx].to(self.mask_token.dtype)  # (B, M, W)
        for block, memory in zip(self.decoder_blocks, memories, strict=True):
            x = block(x, memory)
        return self.decoder_pred(self.decoder_norm(x))

    def masks(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask (B, N) bool, keep indices (B, K), predicted indices (B, M)) of the batch."""
        mask = self.batch_mask(batch)
        keep_idx = masking_from_mask(mask).keep_idx
        return mask, keep_idx, prediction_subset(mask, self.num_predicted)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised
        mask, keep_idx, predicted_idx = self.masks(batch)
        pred = self.decode(self.memories(images, keep_idx), predicted_idx).float()
        target = gather_tokens(patchify(images.float(), self.backbone.patch_size), predicted_idx)  # (B, M, P)
        if self.cfg.norm_pix_loss:
            target = normalise_patches(target)
        loss = ((pred - target) ** 2).mean()
        metrics = {
            "crossmae/mask_ratio": mask.float().mean().detach(),
            "crossmae/predicted_ratio": torch.tensor(predicted_idx.shape[1] / mask.shape[1]),
        }
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`crossmae_reconstruction`: per image, original | masked (grey) | the reconstructed subset pasted
        over the grey image (the other masked patches stay grey: CrossMAE never predicts them)."""
        images = batch["views"][0][:MAX_IMAGES]
        patch, grid_size = self.backbone.patch_size, self.backbone.grid_size
        sub = {"views": [images], **({"mask": batch["mask"][: images.shape[0]]} if "mask" in batch else {})}
        with gathered_outside_forward(self):
            mask, keep_idx, predicted_idx = self.masks(sub)
            pred = self.decode(self.memories(images, keep_idx), predicted_idx).float()  # (B, M, P)
        target = patchify(images.float(), patch)  # (B, N, P)
        if self.cfg.norm_pix_loss:  # back to pixels with each patch's own statistics (MAE's notebook)
            chosen = gather_tokens(target, predicted_idx)
            pred = pred * (chosen.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + chosen.mean(dim=-1, keepdim=True)
        filled = target.clone()
        filled.scatter_(1, predicted_idx.unsqueeze(-1).expand(-1, -1, target.shape[-1]), pred)
        shown = torch.zeros_like(mask)
        shown.scatter_(1, predicted_idx, True)
        mean_std = (self.context.input_mean, self.context.input_std)
        original = to_uint8_images(images, *mean_std)
        rebuilt = to_uint8_images(unpatchify(filled, patch, grid_size), *mean_std)

        def pixels(m: torch.Tensor) -> np.ndarray:  # (B, N) bool -> (B, H, W) bool
            per_patch = m.unsqueeze(-1).expand(-1, -1, target.shape[-1]).to(target.dtype)
            return unpatchify(per_patch, patch, grid_size)[:, 0].bool().cpu().numpy()

        masked_px, predicted_px = pixels(mask), pixels(shown)
        grey = np.where(masked_px[..., None], np.uint8(MASK_GREY), original)
        partial_rebuild = np.where((masked_px & ~predicted_px)[..., None], np.uint8(MASK_GREY), rebuilt)
        rows = [[original[i], grey[i], partial_rebuild[i]] for i in range(original.shape[0])]
        return {"crossmae_reconstruction": grid(rows, scale=display_scale(images.shape[-1]))}
