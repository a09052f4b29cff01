"""RotNet: Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image Rotations" (ICLR 2018).

Each image is shown at the four rotations 0, 90, 180 and 270 degrees, all four copies in
the same batch (the paper's choice: Sec. 3, "feeding all four rotated copies of an image
simultaneously"), and a classifier on the encoder's pooled feature predicts which:

    x_k = rot(x, 90 k degrees), k = 0..3                 # counter-clockwise, torch.rot90
    loss = mean over images and k of CE(head(f(x_k)), k)

Only crops and flips before the rotation, as the official code (dataloader.py): colour
distortion is not part of the method. The cheap classic baseline of the project's scope,
and a check that the evaluation ranks methods sensibly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.backbone import PooledBackbone, VitBackbone
from objectives.components.contrastive import SyncBatchNorm1d
from objectives.components.pictures import MAX_IMAGES, confusion_image, display_scale, grid, to_uint8_images
from objectives.components.zero import gathered_outside_forward
from objectives.configs import RotNetConfig
from objectives.registry import register

ROTATIONS = 4
ANGLES = ("0°", "90°", "180°", "270°")


def rotate_all(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) square images -> the four rotations (4B, 3, H, W), k-major, and their labels k (4B,)."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotnet: rotations need square images, got {tuple(images.shape[-2:])}")
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def rotation_head(width: int, hidden: int, layers: int) -> nn.Sequential:
    """`layers` Linear layers to 4 logits, BatchNorm over the global batch + ReLU between (1: linear)."""
    mods: list[nn.Module] = []
    dim = width
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), SyncBatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, ROTATIONS))
    return nn.Sequential(*mods)


@register("rotnet", RotNetConfig)
class RotNet(Objective):
    """Four rotations of each image -> pooled feature -> rotation classifier; cross-entropy over the 4 classes."""

    def __init__(
        self, cfg: RotNetConfig, backbone: VitBackbone | PooledBackbone, context: RunContext | None = None
    ) -> None:
        super().__init__(cfg, backbone, context)
        width = backbone.embed_dim
        self.head = rotation_head(width, cfg.head_hidden_dim or width, cfg.head_layers)

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, H, W) -> rotation logits (4B, 4) in float32 and their labels (4B,)."""
        rotated, labels = rotate_all(images)
        return self.head(self.backbone.pooled(rotated)).float(), labels

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        logits, labels = self.logits(batch["views"][0])
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return LossOutput(loss=loss, metrics={"rotnet/acc": accuracy})

    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`rotnet_predictions`: per image its four rotations, framed green where the head names the
        rotation and red where not; `rotnet_confusion`: true against predicted rotation over the batch."""
        images = batch["views"][0]
        with gathered_outside_forward(self):
            logits, labels = self.logits(images)
        predicted = logits.argmax(dim=1).cpu().numpy()
        truth = labels.cpu().numpy()
        confusion = np.zeros((ROTATIONS, ROTATIONS), dtype=np.int64)
        np.add.at(confusion, (truth, predicted), 1)
        shown = min(MAX_IMAGES, images.shape[0])
        rotated, _ = rotate_all(images[:shown])
        panels = to_uint8_images(rotated, self.context.input_mean, self.context.input_std)  # (4 shown, H, W, 3)
        b = images.shape[0]
        rows = []
        for i in range(shown):
            row = []
            for k in range(ROTATIONS):
                right = predicted[k * b + i] == k
                row.append(_framed(panels[k * shown + i], (40, 160, 60) if right else (200, 40, 40)))
            rows.append(row)
        return {
            "rotnet_predictions": grid(rows, scale=display_scale(images.shape[-1])),
            "rotnet_confusion": confusion_image(confusion, list(ANGLES)),
        }


def _framed(panel: np.ndarray, colour: tuple[int, int, int], width: int = 1) -> np.ndarray:
    """The panel with a `width`-pixel border of `colour` around it (same size)."""
    out = panel.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
    return out
