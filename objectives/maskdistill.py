"""MaskDistill: Peng et al., "A Unified View of Masked Image Modeling" (arXiv 2210.10615, 2022).

The student ViT sees the image with a block-wise mask: the embedding of each masked
patch is replaced by a learned mask token (BEiT-style corruption; the encoder sees
every position). A linear head on the student's final patch tokens regresses the
frozen teacher's patch features of the uncorrupted image, LayerNorm-ed without affine
parameters, at the masked positions only:

    loss = mean_{(b, i): mask[b, i]} mean_d smooth_l1(head(S(x_masked))[b, i, d], LN(T(x))[b, i, d])

The official code was never released; see `MaskDistillConfig` for where each default comes from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from objectives.base import DataNeeds, LossOutput, MaskSpec, Objective, RunContext
from objectives.configs import MaskDistillConfig
from objectives.masking import draw_masks
from objectives.registry import register
from objectives.teacher import Teacher, load_teacher
from pretrain.backbone import VitBackbone


def masked_feature_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, kind: str = "smooth_l1", beta: float = 1.0
) -> torch.Tensor:
    """Mean over masked patches of the per-patch mean regression loss, in float32.

    pred, target: (B, N, D); mask: (B, N) bool, True = masked. kind "smooth_l1":
    0.5 * e^2 / beta where |e| < beta, else |e| - 0.5 * beta; kind "mse": e^2.
    Unmasked positions never enter the sum (not even as NaN * 0).
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        per_elem = F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
    elif kind == "mse":
        per_elem = (pred - target) ** 2
    else:
        raise ValueError(f"unknown MaskDistill loss {kind!r}; valid choices: smooth_l1, mse")
    per_patch = per_elem.mean(dim=-1)  # (B, N)
    mask = mask.bool()
    return torch.where(mask, per_patch, torch.zeros_like(per_patch)).sum() / mask.sum().clamp_min(1)


@register
class MaskDistill(Objective):
    """Masked feature distillation: mask-token corruption -> ViT -> linear head -> LN(teacher features)."""

    name = "maskdistill"
    config_class = MaskDistillConfig

    def __init__(
        self,
        cfg: MaskDistillConfig,
        backbone: VitBackbone,
        context: RunContext | None = None,
        *,
        teacher: Teacher | None = None,
    ) -> None:
        super().__init__(cfg, backbone, context)
        if teacher is None:
            # Re-normalises the batch's images to the teacher's own statistics (CLIP's differ from ImageNet's).
            teacher = load_teacher(
                cfg.teacher,
                img_size=backbone.grid_size[0] * backbone.patch_size,
                input_mean=self.context.input_mean,
                input_std=self.context.input_std,
                tracking_uri=self.context.tracking_uri or None,
            )
        if teacher.grid_size != backbone.grid_size:
            raise ValueError(
                f"the teacher's patch grid {teacher.grid_size} differs from the encoder's {backbone.grid_size}; "
                "use a teacher with the same patch size"
            )
        self.attach_frozen("teacher", teacher)
        width = backbone.embed_dim
        # BEiT's learned mask token, trunc-normal(0.02) like BEiT v2's init.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # MIM head: one fully connected layer, student width -> teacher feature size (both reimplementations).
        self.head = nn.Linear(width, teacher.feature_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def data_needs(cls, cfg: MaskDistillConfig) -> DataNeeds:
        """One crop and a BEiT block-wise mask of `mask_ratio`, drawn in the loader workers."""
        return DataNeeds(views=1, mask=MaskSpec("block", cfg.mask_ratio))

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Student predictions of the teacher features at every position: (B, N, D_teacher).

        images: (B, 3, H, W); mask: (B, N) bool, True = the patch's embedding is the mask token.
        """
        tokens = self.backbone.embed_patches(images, mask=mask, mask_token=self.mask_token)  # (B, N, D)
        hidden = self.backbone.encode(tokens).tokens[:, self.backbone.num_prefix_tokens :]  # (B, N, D)
        return self.head(hidden)  # (B, N, D_teacher)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised
        if "mask" in batch:  # drawn by the data pipeline, off the training thread
            mask = batch["mask"].to(device=images.device, dtype=torch.bool)
        else:
            spec = self.data_needs(self.cfg).mask
            mask = draw_masks(spec, images.shape[0], self.backbone.grid_size, images.device)
        teacher = self.frozen_modules()["teacher"]
        target = teacher(images).patches  # (B, N, D_teacher), LayerNorm-ed, no grad
        pred = self.predict(images, mask)
        loss = masked_feature_loss(pred, target, mask, kind=self.cfg.loss, beta=self.cfg.smooth_l1_beta)
        with torch.no_grad():
            cosine = F.cosine_similarity(pred[mask].float(), target[mask].float(), dim=-1).mean()
        metrics = {"maskdistill/mask_ratio": mask.float().mean(), "maskdistill/cosine": cosine}
        return LossOutput(loss=loss, metrics=metrics)
