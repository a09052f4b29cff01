"""SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations" (2020).

Two augmented views of each image go through the encoder and a projection MLP; the
NT-Xent loss pulls the two projections of an image together and pushes them away from
the projections of every other image of the global batch (Alg. 1):

    z = g(f(aug(x)))                                   # (2N, d), both views in one batch
    loss = mean over anchors i of -log softmax_j(cos(z_i, z_j) / T)[positive(i)], j != i

Recipe from google-research/simclr (README.md, tf2/run.py, model.py, data_util.py,
objective.py); ViT choices: the representation is the final normed CLS token (timm's
`global_pool="token"`, as MoCo v3's ViT), the projection head keeps SimCLR's rule
(hidden layers as wide as the encoder). See `SimCLRConfig` for each default's source.
"""

from __future__ import annotations

from typing import Any

import torch

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.augment import ViewAugment
from objectives.components.backbone import PooledBackbone, VitBackbone
from objectives.components.contrastive import nt_xent, projection_mlp
from objectives.configs import SimCLRConfig
from objectives.registry import register


# Two independently cropped and flipped views; the colour part is done in `forward`.
@register("simclr", SimCLRConfig, views=2)
class SimCLR(Objective):
    """Two views -> ViT CLS -> projection MLP (synchronised BN) -> NT-Xent over the gathered batch."""

    def __init__(
        self, cfg: SimCLRConfig, backbone: VitBackbone | PooledBackbone, context: RunContext | None = None
    ) -> None:
        super().__init__(cfg, backbone, context)
        width = backbone.embed_dim
        hidden = cfg.proj_hidden_dim or width
        self.projector = projection_mlp(cfg.proj_layers, width, hidden, cfg.proj_dim)
        self.augment = ViewAugment(cfg.augment, self.context.input_mean, self.context.input_std)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> projections (B, proj_dim), before l2-normalisation."""
        return self.projector(self.backbone.pooled(images))  # ViT: the final normed CLS token; else timm's pooling

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        view1, view2 = batch["views"][:2]  # (B, 3, H, W) each, cropped + flipped, normalised
        n = view1.shape[0]
        # Both views in one batch (as the official code), so BN statistics cover the 2N projections.
        images = self.augment(torch.cat([view1, view2]))  # independent draws per sample
        z = self.project(images)  # (2N, proj_dim)
        out = nt_xent(z[:n], z[n:], self.cfg.temperature)
        return LossOutput(loss=out.loss, metrics={"simclr/acc": out.accuracy})
