"""MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022).

The encoder sees only the visible 25% of patches; a light decoder gets the encoded
tokens plus a shared mask token at the removed positions and regresses the pixels
of the removed patches, each normalised by its own mean and variance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.backbone import VitBackbone
from objectives.components.masking import RandomMask, masking_from_mask, random_masking
from objectives.components.patches import masked_patch_mse, patchify, unpatchify
from objectives.components.pictures import MASK_GREY, MAX_IMAGES, display_scale, grid, to_uint8_images
from objectives.components.pos_embed import sincos_2d
from objectives.components.zero import gathered_outside_forward
from objectives.configs import MAEConfig
from objectives.registry import register


# One crop and a uniform random mask of mask_ratio, drawn in the loader workers.
@register("mae", MAEConfig, mask="random")
class MAE(Objective):
    """Masked autoencoder with a ViT encoder on visible patches and a small decoder."""

    def __init__(self, cfg: MAEConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        grid = backbone.grid_size
        # Fixed sin-cos position embeddings in encoder and decoder (paper Sec. A.1).
        backbone.use_fixed_pos_embed(sincos_2d(backbone.embed_dim, *grid))
        width = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(backbone.embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # Prefix (CLS) position gets zeros, as in models_mae.py.
        table = torch.cat([torch.zeros(1, width), sincos_2d(width, *grid)], dim=0)
        self.register_buffer("decoder_pos_embed", table.unsqueeze(0), persistent=False)  # (1, 1 + N, W)
        self.decoder_blocks = nn.ModuleList(
            Block(width, cfg.decoder_num_heads, mlp_ratio=cfg.decoder_mlp_ratio, qkv_bias=True)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, backbone.patch_size**2 * 3)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_norm, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_decoder(self, latent: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + K, D) -> pixel predictions for every patch (B, N, p*p*3)."""
        prefix = self.backbone.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, prefix + K, W)
        b, n = restore_idx.shape
        visible = x[:, prefix:]
        fill = self.mask_token.expand(b, n - visible.shape[1], -1)
        x_ = torch.cat([visible, fill], dim=1)  # (B, N, W), shuffled order
        x_ = torch.gather(x_, 1, restore_idx.unsqueeze(-1).expand(-1, -1, x_.shape[-1]))  # original order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)  # (B, 1 + N, W)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # drop CLS: (B, N, p*p*3)

    def masking(self, batch: dict[str, Any], tokens: torch.Tensor) -> RandomMask:
        """Keep/restore indices of the batch's mask (drawn by the data pipeline), else of a random one (MAE's shuffle)."""
        if "mask" in batch:
            return masking_from_mask(batch["mask"][: tokens.shape[0]].bool())
        return random_masking(tokens.shape[0], tokens.shape[1], self.cfg.mask_ratio, device=tokens.device)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised
        tokens = self.backbone.embed_patches(images)  # (B, N, D)
        masking = self.masking(batch, tokens)
        latent = self.backbone.encode(tokens, keep_idx=masking.keep_idx).tokens  # (B, 1 + K, D)
        pred = self.forward_decoder(latent, masking.restore_idx)
        target = patchify(images, self.backbone.patch_size)
        loss = masked_patch_mse(pred.float(), target.float(), masking.mask, self.cfg.norm_pix_loss)
        return LossOutput(loss=loss, metrics={"mae/mask_ratio": masking.mask.mean().detach()})

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`mae_reconstruction`: per image, original | masked (grey) | prediction pasted over the visible patches.

        With norm_pix_loss the decoder predicts per-patch-normalised pixels; each masked patch is
        mapped back with its original patch's mean and std (as the MAE visualisation notebook).
        """
        images = batch["views"][0][:MAX_IMAGES]  # (B, 3, H, W), normalised, training dtype
        patch = self.backbone.patch_size
        with gathered_outside_forward(self):
            tokens = self.backbone.embed_patches(images)  # (B, N, D)
            masking = self.masking(batch, tokens)
            latent = self.backbone.encode(tokens, keep_idx=masking.keep_idx).tokens  # (B, 1 + K, D)
            pred = self.forward_decoder(latent, masking.restore_idx).float()  # (B, N, p*p*3)
        target = patchify(images.float(), patch)  # (B, N, p*p*3), normalised-image units
        if self.cfg.norm_pix_loss:  # the inverse of normalise_patches, with the original patch's statistics
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        masked = masking.mask.bool().unsqueeze(-1)  # (B, N, 1)
        grid_size = self.backbone.grid_size
        reconstruction = unpatchify(torch.where(masked, pred, target), patch, grid_size)  # (B, 3, H, W)
        covered = unpatchify(masked.expand_as(target), patch, grid_size)[:, 0].cpu().numpy()  # (B, H, W) bool
        mean_std = (self.context.input_mean, self.context.input_std)
        original = to_uint8_images(images, *mean_std)  # (B, H, W, 3)
        grey = np.where(covered[..., None], np.uint8(MASK_GREY), original)
        rebuilt = to_uint8_images(reconstruction, *mean_std)
        rows = [[original[i], grey[i], rebuilt[i]] for i in range(original.shape[0])]
        return {"mae_reconstruction": grid(rows, scale=display_scale(images.shape[-1]))}
