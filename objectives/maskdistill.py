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

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.aggregation import beit_init
from objectives.components.backbone import VitBackbone
from objectives.components.teacher import attach_teacher
from objectives.configs import MaskDistillConfig
from objectives.registry import register


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


# One crop and a BEiT block-wise mask of mask_ratio, drawn in the loader workers.
@register("maskdistill", MaskDistillConfig, mask="block")
class MaskDistill(Objective):
    """Masked feature distillation: mask-token corruption -> ViT -> linear head -> LN(teacher features)."""

    def __init__(self, cfg: MaskDistillConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        teacher = attach_teacher(self, cfg.teacher)
        width = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))  # BEiT's learned mask token
        # MIM head: one fully connected layer, student width -> teacher feature size (both reimplementations).
        self.head = nn.Linear(width, teacher.feature_dim)
        beit_init(self.mask_token, [self.head])

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Student predictions of the teacher features at every position: (B, N, D_teacher).

        images: (B, 3, H, W); mask: (B, N) bool, True = the patch's embedding is the mask token.
        """
        tokens = self.backbone.embed_patches(images, mask=mask, mask_token=self.mask_token)  # (B, N, D)
        hidden = self.backbone.encode(tokens).tokens[:, self.backbone.num_prefix_tokens :]  # (B, N, D)
        return self.head(hidden)  # (B, N, D_teacher)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised
        mask = self.batch_mask(batch)  # (B, N)
        teacher = self.frozen_modules()["teacher"]
        target = teacher(images).patches  # (B, N, D_teacher), LayerNorm-ed, no grad
        pred = self.predict(images, mask)
        loss = masked_feature_loss(pred, target, mask, kind=self.cfg.loss, beta=self.cfg.smooth_l1_beta)
        with torch.no_grad():
            cosine = F.cosine_similarity(pred[mask].float(), target[mask].float(), dim=-1).mean()
        metrics = {"maskdistill/mask_ratio": mask.float().mean(), "maskdistill/cosine": cosine}
        return LossOutput(loss=loss, metrics=metrics)
