"""The objective module of a run: `cfg.objective` wrapped around a fresh `cfg.model` backbone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pretrain.config import PretrainConfig

if TYPE_CHECKING:
    from objectives.base import Objective


def build_objective(
    cfg: PretrainConfig, device: torch.device, dtype: torch.dtype, *, tracking_uri: str, total_steps: int
) -> Objective:
    """`cfg.objective` on a fresh `cfg.model` backbone, on the CPU, with attention set for `device`/`dtype`."""
    from objectives.base import RunContext
    from objectives.registry import get_objective_class
    from pretrain.backbone import arch_kwargs, build_backbone, fused_attn_enabled, set_fused_attn

    context = RunContext(
        tracking_uri=tracking_uri,
        input_mean=tuple(cfg.data.mean),
        input_std=tuple(cfg.data.std),
        arch=cfg.model.arch,
        arch_kwargs=arch_kwargs(cfg.model),
        img_size=cfg.model.img_size,
        total_steps=total_steps,
    )
    objective = get_objective_class(cfg.objective.name)(cfg.objective, build_backbone(cfg.model), context)
    # The objective's own blocks too (MAE's decoder, teachers), not only the backbone's.
    set_fused_attn(objective, fused_attn_enabled(cfg.model.fused_attn, device, dtype))
    return objective
