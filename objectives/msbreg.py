"""MSBReg: Moon, Buracas, Park, Kim, Canny, "An Embedding-Dynamic Approach to Self-supervised Learning" (WACV 2023).

Image embeddings are particles; three forces act on them, with a delayed-parameter (EMA, as
BYOL) target network. For V views of each image, online p_v = predictor(projector(f(x_v))) and
target t_v = projector_ema(f_ema(x_v)), all L2-normalised:

    L_MC = 2 - 2 cos(mean_v p_v, mean_v t_v)              multiview centroid: attraction of the views
    L_SV = - mean singular value of [p_1; ...; p_V]      global dispersion toward homogeneous density
    L_B  = mean_v,b cos(p_v,b, g_b),  g_b ~ N(0, I)     Brownian: a fresh random force per particle
    loss = L_MC + lambda_sv L_SV + lambda_b L_B

The paper's Method section and any official code could not be read here: the centroid-to-centroid
form is the paper's own wording ("minimize the distance between centroids of online and target
network embeddings of different views of the same image"); the Brownian term and its weight 0.1
follow a public implementation of the centroid/Brownian losses whose origin could not be
established; the singular-value term is written as SVMax's mean singular value of the normalised
batch (Taha et al., ICLR 2021). See `MSBRegConfig` and docs/objectives.md for what is unverified.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.needs import DataNeeds
from objectives.base import LossOutput, Objective, RunContext
from objectives.components.augment import ViewAugment
from objectives.components.backbone import PooledBackbone, VitBackbone
from objectives.components.contrastive import projection_mlp
from objectives.components.ema import buffer_copy, momentum_at, momentum_update
from objectives.configs import MSBRegConfig
from objectives.registry import register


def centroid_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """online, target (V, B, K), rows L2-normalised -> mean over images of 2 - 2 cos(centroid online, centroid target)."""
    return (2.0 - 2.0 * F.cosine_similarity(online.mean(dim=0), target.mean(dim=0), dim=-1)).mean()


def singular_value_loss(online: torch.Tensor) -> torch.Tensor:
    """online (M, K) with unit rows -> minus their mean singular value (SVMax's s_mu).

    The squared singular values sum to M (the rows are unit), so over r = min(M, K) of them the
    mean is sqrt(M) / r when every row is the same (collapse) and sqrt(M / r) at most, when they
    are all equal (the rows spread evenly over r directions): minimising spreads the batch.
    """
    return -torch.linalg.svdvals(online.float()).mean()


def brownian_loss(online: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """online (V, B, K) L2-normalised -> mean cos to a random direction per image (shared by its views):
    the gradient is a random kick of each particle, a diffusion with no other particle's coordinates."""
    _, b, k = online.shape
    noise = torch.randn(b, k, device=online.device, dtype=torch.float32, generator=generator)
    return F.cosine_similarity(online.float(), noise.unsqueeze(0), dim=-1).mean()


@register("msbreg", MSBRegConfig)
class MSBReg(Objective):
    """Online backbone + projector + predictor against an EMA backbone + projector over V views; three forces."""

    def __init__(
        self, cfg: MSBRegConfig, backbone: VitBackbone | PooledBackbone, context: RunContext | None = None
    ) -> None:
        super().__init__(cfg, backbone, context)
        # BYOL's MLPs: Linear -> BN -> ReLU -> Linear (with bias), 4096 hidden, 256 out.
        self.projector = projection_mlp(2, backbone.embed_dim, cfg.mlp_dim, cfg.dim, last_bn=False, out_bias=True)
        self.predictor = projection_mlp(2, cfg.dim, cfg.mlp_dim, cfg.dim, last_bn=False, out_bias=True)
        self.target = buffer_copy(self._online())
        self.total_steps = cfg.total_steps or int(getattr(self.context, "total_steps", 0) or 0)
        if self.total_steps < 1:
            raise ValueError(
                "objective.total_steps: the target's momentum schedule needs the run's length; set "
                "objective.total_steps or pass RunContext(total_steps=...)"
            )
        self.register_buffer("current_momentum", torch.tensor(float(cfg.momentum)))
        mean, std = self.context.input_mean, self.context.input_std
        # BYOL's asymmetric pair, alternating over the views (view 1, view 2, view 1, ...).
        self.augments = [ViewAugment(cfg.view1 if v % 2 == 0 else cfg.view2, mean, std) for v in range(cfg.views)]

    @classmethod
    def data_needs(cls, cfg: MSBRegConfig) -> DataNeeds:
        return DataNeeds(views=cfg.views)

    def _online(self) -> nn.ModuleDict:
        """The modules the target follows, under the target's names."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    @torch.no_grad()
    def target_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Target network output (B, dim) in its float32 (inputs may be bf16)."""
        target = self.target
        images = images.to(target["projector"][0].weight.dtype)
        return target["projector"](target["backbone"].pooled(images))

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        cfg = self.cfg
        views = [augment(v) for augment, v in zip(self.augments, batch["views"][: cfg.views], strict=True)]
        # Separate forwards per view: BatchNorm statistics per view, as BYOL.
        online = torch.stack(
            [F.normalize(self.predictor(self.projector(self.backbone.pooled(x))).float(), dim=-1) for x in views]
        )  # (V, B, K)
        target = torch.stack([F.normalize(self.target_embeddings(x).float(), dim=-1) for x in views])
        l_mc = centroid_loss(online, target)
        l_sv = singular_value_loss(online.flatten(0, 1))
        l_b = brownian_loss(online)
        loss = l_mc + cfg.sv_weight * l_sv + cfg.brownian_weight * l_b
        with torch.no_grad():
            # Collapse watch: per-dimension std of the normalised online embeddings (1/sqrt(K) when spread).
            spread = online.flatten(0, 1).std(dim=0).mean()
        metrics = {
            "msbreg/centroid": l_mc.detach(),
            "msbreg/singular_value": l_sv.detach(),
            "msbreg/brownian": l_b.detach(),
            "msbreg/embedding_std": spread,
            "msbreg/momentum": self.current_momentum.detach().float(),
        }
        return LossOutput(loss=loss, metrics=metrics)

    def momentum(self, step: int) -> float:
        """m used after optimizer step `step` (0-based): BYOL's 1 - (1 - m0)(cos(pi k / K) + 1) / 2 at k = step + 1."""
        return momentum_at(step + 1, self.total_steps, self.cfg.momentum)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        momentum_update(self._online(), self.target, m)
        self.current_momentum.fill_(m)
