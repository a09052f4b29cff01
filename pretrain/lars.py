"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks"): SGD with momentum
whose step for each weight tensor is rescaled by a trust ratio ||w|| / ||g + wd w||.

The optimizer of the ResNet recipes of SimCLR (google-research/simclr lars_optimizer.py) and
MoCo v3 (facebookresearch/moco-v3 moco/optimizer.py). Per tensor, in a group with
`adapt=True` (weights; biases and norm parameters sit in a group without adaptation or decay,
as both recipes exclude them):

    d = g + wd * w
    d = d * eta * ||w|| / ||d||        (when both norms are > 0, else d unchanged)
    v = momentum * v + d
    w = w - lr * v

The learning rate multiplies the momentum buffer (MoCo v3's form; SimCLR's folds it into the
buffer, which differs only while the lr changes). The trust ratio needs each tensor whole: under
ZeRO, or DeepSpeed's bf16/fp16 optimizer wrappers, the optimizer only sees flattened
partitions, so the config accepts LARS with deepspeed.zero_stage=0 and fp32 only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """SGD + momentum with a per-tensor trust ratio; groups say `adapt` (default True) and `weight_decay`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        *,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        adapt: bool = True,
    ) -> None:
        if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS: need lr > 0, weight_decay >= 0, momentum in [0, 1), trust_coefficient > 0; got "
                f"{lr}, {weight_decay}, {momentum}, {trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
            "adapt": adapt,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["adapt"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"] * w_norm / d_norm,
                        torch.ones_like(w_norm),
                    )
                    d = d * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
