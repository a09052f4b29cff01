"""MoBY: Xie, Lin, Yao, Zhang, Dai, Cao, Hu, "Self-Supervised Learning with Swin Transformers" (2021).

MoCo v2's queues of negatives with BYOL's asymmetric encoders: an online encoder with a
projector and a predictor, a momentum target (encoder + projector, no predictor), and one queue
of earlier target keys per view. For two views x1, x2 (models/moby.py `MoBY.forward`):

    p1, p2 = predictor(projector(f(x1))), predictor(projector(f(x2)))
    k1, k2 = projector_t(f_t(x1)), projector_t(f_t(x2))        # no gradient
    loss = ctr(p1, k2, queue2) + ctr(p2, k1, queue1)           # ctr: CE over [q.k+, q.queue] / T
    queue1 <- k1 of all ranks, queue2 <- k2 of all ranks (first in, first out)
    target <- m target + (1 - m) online after every step, m: 0.99 -> 1 (half cosine)

Recipe from SwinTransformer/Transformer-SSL (models/moby.py, configs/moby_swin_tiny.yaml); see
`MoBYConfig`. The momentum and queue pieces are MoCo v3's (`objectives.components.ema`,
`objectives.components.contrastive`); the queues are buffers: checkpointed, never partitioned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.augment import ViewAugment
from objectives.components.contrastive import concat_all_gather, projection_mlp, queue_contrast
from objectives.components.ema import buffer_copy, momentum_at, momentum_update
from objectives.configs import MoBYConfig
from objectives.registry import register


def without_drop_path(module: nn.Module) -> nn.Module:
    """`module` with every stochastic-depth layer turned off (MoBY's target: TARGET_DROP_PATH_RATE 0)."""
    for sub in module.modules():
        if hasattr(sub, "drop_prob"):
            sub.drop_prob = 0.0
    return module


@register("moby", MoBYConfig, views=2)
class MoBY(Objective):
    """Online encoder + projector + predictor against a momentum target and two queues of its keys."""

    def __init__(self, cfg: MoBYConfig, backbone: nn.Module, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        self.projector = projection_mlp(
            cfg.proj_layers, backbone.embed_dim, cfg.mlp_dim, cfg.dim, last_bn=False, out_bias=True
        )
        self.predictor = projection_mlp(cfg.pred_layers, cfg.dim, cfg.mlp_dim, cfg.dim, last_bn=False, out_bias=True)
        self.target = without_drop_path(buffer_copy(self._online()))
        self.total_steps = cfg.total_steps or int(getattr(self.context, "total_steps", 0) or 0)
        if self.total_steps < 1:
            raise ValueError(
                "objective.total_steps: the momentum schedule needs the run's length; set objective.total_steps "
                "or pass RunContext(total_steps=...)"
            )
        # Random unit keys to start with, one queue per view (dim, queue_size), and the write position.
        self.register_buffer("queue1", F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("current_momentum", torch.tensor(float(cfg.momentum)))
        mean, std = self.context.input_mean, self.context.input_std
        self.augment1 = ViewAugment(cfg.view1, mean, std)
        self.augment2 = ViewAugment(cfg.view2, mean, std)

    def _online(self) -> nn.ModuleDict:
        """The modules the target follows, under the target's names."""
        return nn.ModuleDict({"backbone": self.backbone, "projector": self.projector})

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> predictor(projector(pooled feature)): (B, dim)."""
        return self.predictor(self.projector(self.backbone.pooled(images)))

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Target keys (B, dim), l2-normalised, in the target's float32 (inputs may be bf16)."""
        target = self.target
        images = images.to(target["projector"][0].weight.dtype)
        return F.normalize(target["projector"](target["backbone"].pooled(images)), dim=1)

    @torch.no_grad()
    def enqueue(self, k1: torch.Tensor, k2: torch.Tensor) -> None:
        """Write the keys of every rank over the oldest ones of each queue (circular)."""
        keys1, keys2 = concat_all_gather(k1), concat_all_gather(k2)  # (M, dim) each
        size = self.queue1.shape[1]
        slots = (int(self.queue_ptr) + torch.arange(keys1.shape[0], device=keys1.device)) % size
        self.queue1[:, slots] = keys1.t().to(self.queue1.dtype)
        self.queue2[:, slots] = keys2.t().to(self.queue2.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + keys1.shape[0]) % size)

    def momentum(self, step: int) -> float:
        """m used after optimizer step `step` (0-based): the schedule at step + 1 (MoBY updates before
        the keys of iteration t with m(t); updating after step t - 1 with m(t) is the same)."""
        return momentum_at(step + 1, self.total_steps, self.cfg.momentum)

    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        momentum_update(self._online(), self.target, m)
        self.current_momentum.fill_(m)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        view1, view2 = batch["views"][:2]  # (B, 3, H, W) each, cropped + flipped, normalised
        x1, x2 = self.augment1(view1), self.augment2(view2)  # asymmetric blur / solarisation
        p1, p2 = self.predict(x1), self.predict(x2)
        k1, k2 = self.keys(x1), self.keys(x2)
        ctr1 = queue_contrast(p1, k2, self.queue2.clone(), self.cfg.temperature)
        ctr2 = queue_contrast(p2, k1, self.queue1.clone(), self.cfg.temperature)
        self.enqueue(k1, k2)  # after the loss read the queues (the official order)
        metrics = {
            "moby/acc": (ctr1.accuracy + ctr2.accuracy) / 2,
            "moby/momentum": self.current_momentum.detach().float(),
        }
        return LossOutput(loss=ctr1.loss + ctr2.loss, metrics=metrics)
