"""SimMIM: Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu, "SimMIM: A Simple Framework for Masked Image Modeling" (CVPR 2022).

Random square groups of patches are masked; a learnable mask token replaces their patch
embeddings at the input, and the encoder sees every position. A one-layer head (a 1x1
convolution to stride^2 x 3 channels, then a pixel shuffle) predicts the raw (normalised)
pixels of the whole image from the encoder's final feature map; the loss is the L1 distance on
the masked pixels only:

    x_rec = PixelShuffle(Conv1x1(f(mask_token_replace(patch_embed(x)))))   # (B, 3, H, W)
    loss = sum(|x - x_rec| * m) / (sum(m) + 1e-5) / 3                     # m: masked pixels

Recipe from microsoft/SimMIM (models/simmim.py SimMIM, SwinTransformerForSimMIM,
VisionTransformerForSimMIM; data/data_simmim.py MaskGenerator); see `SimMIMConfig`. The
encoder is a ViT (stride = patch size) or a Swin (stride 32); its weights are the timm model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from data.needs import DataNeeds, MaskSpec
from objectives.base import LossOutput, Objective, RunContext
from objectives.components.backbone import SwinBackbone, VitBackbone
from objectives.components.pictures import MASK_GREY, MAX_IMAGES, display_scale, grid, to_uint8_images
from objectives.components.zero import gathered_outside_forward
from objectives.configs import SimMIMConfig
from objectives.registry import register

if TYPE_CHECKING:
    import numpy as np

# SimMIM's normaliser of the masked L1 sum (loss_recon * mask).sum() / (mask.sum() + 1e-5).
EPS = 1.0e-5


def pixel_mask(mask: torch.Tensor, grid_size: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, N) patch mask -> (B, 1, H, W) float pixel mask (1 = masked)."""
    b = mask.shape[0]
    cells = mask.view(b, *grid_size).to(torch.float32)
    return cells.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


def masked_l1(images: torch.Tensor, rec: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: mean absolute error over the masked pixels and the channels."""
    per_pixel = (images.float() - rec.float()).abs()  # (B, C, H, W)
    return (per_pixel * pixels).sum() / (pixels.sum() + EPS) / images.shape[1]


@register("simmim", SimMIMConfig)
class SimMIM(Objective):
    """Mask token at the input of a ViT or Swin, a 1x1-conv + pixel-shuffle head, L1 on masked pixels."""

    def __init__(
        self, cfg: SimMIMConfig, backbone: VitBackbone | SwinBackbone, context: RunContext | None = None
    ) -> None:
        super().__init__(cfg, backbone, context)
        if not isinstance(backbone, (VitBackbone, SwinBackbone)):
            raise TypeError(f"SimMIM needs a ViT or Swin backbone, got {type(backbone).__name__}")
        if cfg.mask_patch_size % backbone.patch_size:
            raise ValueError(
                f"objective.mask_patch_size={cfg.mask_patch_size} is not a multiple of the {backbone.patch_size}-px patches"
            )
        # Zero, then truncated normal std 0.02 (SwinTransformerForSimMIM: trunc_normal_(mask_token, std=.02)).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.patch_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        stride = backbone.stride
        self.decoder = nn.Sequential(
            nn.Conv2d(backbone.embed_dim, stride**2 * 3, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    @classmethod
    def data_needs(cls, cfg: SimMIMConfig) -> DataNeeds:
        return DataNeeds(views=1, mask=MaskSpec("group", cfg.mask_ratio, group_px=cfg.mask_patch_size))

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) and their (B, N) mask -> predicted pixels (B, 3, H, W)."""
        return self.decoder(self.backbone.feature_map(images, mask=mask, mask_token=self.mask_token))

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised: the target (no per-patch normalisation)
        mask = self.batch_mask(batch)
        rec = self.reconstruct(images, mask)
        pixels = pixel_mask(mask, self.backbone.grid_size, self.backbone.patch_size)
        loss = masked_l1(images, rec, pixels)
        return LossOutput(loss=loss, metrics={"simmim/mask_ratio": mask.float().mean().detach()})

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`simmim_reconstruction`: per image, original | masked (grey) | prediction pasted over the masked pixels."""
        import numpy as np

        images = batch["views"][0][:MAX_IMAGES]
        mask = self.batch_mask(batch)[: images.shape[0]]
        with gathered_outside_forward(self):
            rec = self.reconstruct(images, mask).float()
        pixels = pixel_mask(mask, self.backbone.grid_size, self.backbone.patch_size).to(rec.device)
        pasted = images.float() * (1 - pixels) + rec * pixels
        covered = pixels[:, 0].bool().cpu().numpy()
        mean_std = (self.context.input_mean, self.context.input_std)
        original = to_uint8_images(images, *mean_std)
        grey = np.where(covered[..., None], np.uint8(MASK_GREY), original)
        rebuilt = to_uint8_images(pasted, *mean_std)
        rows = [[original[i], grey[i], rebuilt[i]] for i in range(original.shape[0])]
        return {"simmim_reconstruction": grid(rows, scale=display_scale(images.shape[-1]))}
