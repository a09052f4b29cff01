"""MoCo v3: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers" (ICCV 2021).

Query encoder f_q = ViT + projector, followed by a predictor; key encoder f_k = a
momentum copy of ViT + projector (no predictor). For two views x1, x2 (Alg. 1):

    q1, q2 = predictor(f_q(x1)), predictor(f_q(x2))    # (N, dim)
    k1, k2 = f_k(x1), f_k(x2)                          # no gradient, gathered over ranks
    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = CE(q . k_all / T, positives) * 2T
    f_k <- m f_k + (1 - m) f_q after every optimizer step, m: 0.99 -> 1 (half cosine)

Recipe from facebookresearch/moco-v3 (main_moco.py, moco/builder.py MoCo_ViT, vits.py,
CONFIG.md); see `MoCoV3Config`. The momentum encoder is a `buffer_copy`
(objectives.components.ema): checkpointed, never optimised, never partitioned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.augment import ViewAugment
from objectives.components.backbone import PooledBackbone, VitBackbone
from objectives.components.contrastive import info_nce, projection_mlp
from objectives.components.ema import buffer_copy, momentum_at, momentum_update
from objectives.components.pos_embed import sincos_2d
from objectives.configs import MoCoV3Config
from objectives.registry import register


@torch.no_grad()
def freeze_patch_projection(backbone: VitBackbone) -> None:
    """MoCo v3's random patch projection: xavier-uniform weight, zero bias, both frozen (vits.py, stop_grad_conv1)."""
    proj = backbone.vit.patch_embed.proj
    out_ch, in_ch, kh, kw = proj.weight.shape
    bound = math.sqrt(6.0 / float(in_ch * kh * kw + out_ch))
    proj.weight.uniform_(-bound, bound)
    proj.weight.requires_grad_(False)
    if proj.bias is not None:
        proj.bias.zero_()
        proj.bias.requires_grad_(False)


# Two independently cropped and flipped views; the colour part is done in `forward`.
@register("mocov3", MoCoV3Config, views=2)
class MoCoV3(Objective):
    """Query ViT + projector + predictor against a momentum key encoder; symmetric InfoNCE."""

    def __init__(
        self, cfg: MoCoV3Config, backbone: VitBackbone | PooledBackbone, context: RunContext | None = None
    ) -> None:
        super().__init__(cfg, backbone, context)
        width = backbone.embed_dim
        vit = isinstance(backbone, VitBackbone)
        fixed_pos, frozen_patch = (
            vit if value == "auto" else value for value in (cfg.fixed_pos_embed, cfg.freeze_patch_embed)
        )
        if (fixed_pos or frozen_patch) and not vit:
            raise ValueError(
                "objective.fixed_pos_embed and objective.freeze_patch_embed are for ViTs; use auto or false"
            )
        if fixed_pos:  # vits.py build_2d_sincos_position_embedding (the same table up to the axis order)
            backbone.use_fixed_pos_embed(sincos_2d(width, *backbone.grid_size))
        if frozen_patch:
            freeze_patch_projection(backbone)
        layers = (3 if vit else 2) if cfg.proj_layers == "auto" else int(cfg.proj_layers)
        self.projector = projection_mlp(layers, width, cfg.mlp_dim, cfg.dim)  # (B, D) -> (B, dim)
        self.predictor = projection_mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim)  # (B, dim) -> (B, dim)
        # Key encoder: backbone + projector with the query's initial weights, as buffers.
        self.momentum_encoder = buffer_copy(self._online())
        self.total_steps = cfg.total_steps or int(getattr(self.context, "total_steps", 0) or 0)
        if cfg.momentum_cosine and self.total_steps < 1:
            raise ValueError(
                "objective.total_steps: the cosine momentum schedule needs the run's length; set "
                "objective.total_steps, pass RunContext(total_steps=...), or objective.momentum_cosine=false"
            )
        # The momentum used by the last update (for the metrics); checkpointed like the key encoder.
        self.register_buffer("current_momentum", torch.tensor(float(cfg.momentum)))
        mean, std = self.context.input_mean, self.context.input_std
        self.augment1 = ViewAugment(cfg.view1, mean, std)
        self.augment2 = ViewAugment(cfg.view2, mean, std)

    def _online(self) -> nn.ModuleDict:
        """The modules the key encoder follows, under the key encoder's names."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> predictor(projector(CLS)): (B, dim)."""
        feature = self.backbone.pooled(images)  # ViT: the final normed CLS token (B, D); else timm's pooling
        return self.predictor(self.projector(feature))

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Key encoder output (B, dim), in the key encoder's float32 (inputs may be bf16)."""
        key = self.momentum_encoder
        images = images.to(key["projector"][0].weight.dtype)
        return key["projector"](key["backbone"].pooled(images))

    def momentum(self, step: int) -> float:
        """m used after optimizer step `step` (0-based): the schedule at step + 1, the next forward's iteration.

        The official loop updates the key encoder at the start of iteration t with m(t), before
        its keys; updating after step t - 1 with m(t) is the same.
        """
        if not self.cfg.momentum_cosine:
            return float(self.cfg.momentum)
        return momentum_at(step + 1, self.total_steps, self.cfg.momentum)

    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        momentum_update(self._online(), self.momentum_encoder, m)
        self.current_momentum.fill_(m)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        view1, view2 = batch["views"][:2]  # (B, 3, H, W) each, cropped + flipped, normalised
        x1, x2 = self.augment1(view1), self.augment2(view2)  # asymmetric blur / solarisation
        q1, q2 = self.query(x1), self.query(x2)  # separate forwards: BN statistics per view, as the official code
        k1, k2 = self.keys(x1), self.keys(x2)
        ctr1 = info_nce(q1, k2, self.cfg.temperature)
        ctr2 = info_nce(q2, k1, self.cfg.temperature)
        metrics = {
            "mocov3/acc": (ctr1.accuracy + ctr2.accuracy) / 2,
            "mocov3/momentum": self.current_momentum.detach().float(),
        }
        return LossOutput(loss=ctr1.loss + ctr2.loss, metrics=metrics)
