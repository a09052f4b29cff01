"""FCMAE: Woo, Debnath, Hu, Chen, Liu, Kweon, Xie, "ConvNeXt V2: Co-designing and Scaling ConvNets with
Masked Autoencoders" (CVPR 2023).

A fully convolutional masked autoencoder: 60% of the 32 x 32 px regions of an image (one per
position of the encoder's final map) are masked; the ConvNeXt encoder computes only on the
visible regions (here densely, as the paper's own JAX model: masked positions zeroed around
every position-mixing layer, `ConvNeXtBackbone.feature_map`); a 1x1 projection, mask tokens at
the masked positions, one ConvNeXt V2 block and a 1x1 prediction give each position's 32 x 32 x 3
pixels; the loss is the MSE on per-patch normalised pixels of the masked regions:

    f = encoder(x, mask)                                    # (B, C, h, w), visible regions only
    z = where(mask, mask_token, proj(f))                    # (B, 512, h, w)
    pred = pred_conv(decoder_block(z))                      # (B, 32 * 32 * 3, h, w)
    loss = mean over masked regions of mean((pred - norm(patch)) ** 2)

Recipe from facebookresearch/ConvNeXt-V2 (models/fcmae.py, main_pretrain.py, TRAINING.md); see
`FCMAEConfig`. The encoder's weights are the timm model's (convnextv2_*: GRN included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.backbone import ConvNeXtBackbone
from objectives.components.patches import masked_patch_mse, patchify, unpatchify
from objectives.components.pictures import MASK_GREY, MAX_IMAGES, display_scale, grid, to_uint8_images
from objectives.components.zero import gathered_outside_forward
from objectives.configs import FCMAEConfig
from objectives.registry import register

if TYPE_CHECKING:
    import numpy as np


def decoder_block(dim: int) -> nn.Module:
    """A ConvNeXt V2 block (depthwise 7x7, LayerNorm, MLP x4 with GRN, no layer scale), timm's."""
    from timm.models.convnext import ConvNeXtBlock

    return ConvNeXtBlock(in_chs=dim, use_grn=True, ls_init_value=None, conv_mlp=False)


@register("fcmae", FCMAEConfig, mask="random")
class FCMAE(Objective):
    """ConvNeXt encoder on the visible regions, mask tokens, one ConvNeXt V2 block, per-patch pixel MSE."""

    def __init__(self, cfg: FCMAEConfig, backbone: ConvNeXtBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        if not isinstance(backbone, ConvNeXtBackbone):
            raise TypeError(f"FCMAE needs a ConvNeXt backbone, got {type(backbone).__name__}")
        width = cfg.decoder_embed_dim
        self.proj = nn.Conv2d(backbone.embed_dim, width, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.decoder = nn.Sequential(*[decoder_block(width) for _ in range(cfg.decoder_depth)])
        self.pred = nn.Conv2d(width, backbone.stride**2 * 3, kernel_size=1)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """fcmae.py _init_weights: every Conv2d of the head truncated normal (std 1, +-2), bias 0; the
        mask token normal std 0.02; LayerNorms 1 / 0 (timm's default already)."""
        for module in [self.proj, self.pred, *self.decoder.modules()]:
            if isinstance(module, nn.Conv2d):
                nn.init.trunc_normal_(module.weight.view(module.weight.shape[0], -1))
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) and their (B, N) mask -> per-region pixels (B, N, s * s * 3)."""
        features = self.backbone.feature_map(images, mask=mask)  # (B, C, h, w)
        x = self.proj(features)
        masked = mask.view(mask.shape[0], 1, *self.backbone.grid_size).to(x.dtype)
        x = x * (1 - masked) + self.mask_token.to(x.dtype) * masked
        return self.pred(self.decoder(x)).flatten(2).transpose(1, 2)  # (B, N, s * s * 3)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised
        mask = self.batch_mask(batch)  # (B, N) over the final grid, True = masked
        pred = self.predict(images, mask)
        target = patchify(images, self.backbone.stride)
        loss = masked_patch_mse(pred.float(), target.float(), mask.float(), self.cfg.norm_pix_loss)
        return LossOutput(loss=loss, metrics={"fcmae/mask_ratio": mask.float().mean().detach()})

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`fcmae_reconstruction`: per image, original | masked (grey) | prediction pasted over the masked regions
        (per-patch normalised predictions mapped back with the original region's mean and std)."""
        import numpy as np

        images = batch["views"][0][:MAX_IMAGES]
        mask = self.batch_mask(batch)[: images.shape[0]]
        stride, grid_size = self.backbone.stride, self.backbone.grid_size
        with gathered_outside_forward(self):
            pred = self.predict(images, mask).float()
        target = patchify(images.float(), stride)
        if self.cfg.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        masked = mask.bool().unsqueeze(-1)
        rebuilt_patches = torch.where(masked, pred, target)
        covered = unpatchify(masked.expand_as(target), stride, grid_size)[:, 0].cpu().numpy()
        mean_std = (self.context.input_mean, self.context.input_std)
        original = to_uint8_images(images, *mean_std)
        grey = np.where(covered[..., None], np.uint8(MASK_GREY), original)
        rebuilt = to_uint8_images(unpatchify(rebuilt_patches, stride, grid_size), *mean_std)
        rows = [[original[i], grey[i], rebuilt[i]] for i in range(original.shape[0])]
        return {"fcmae_reconstruction": grid(rows, scale=display_scale(images.shape[-1]))}
