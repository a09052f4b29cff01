"""Momentum (EMA) encoders: MoCo v3's key encoder, SemAIM's order encoder.

The copy's weights are buffers of the same names (`buffer_copy`): DeepSpeed checkpoints
them (resume keeps them), never optimises them and never partitions them under ZeRO-3
(a whole float32 copy on every rank, as DDP holds it in the official code); the update
gathers ZeRO-3-partitioned online parameters chunk by chunk.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from objectives.components.zero import gathered


def momentum_at(step: int, total_steps: int, base: float) -> float:
    """MoCo v3's momentum schedule: 1 - (1 - base) * (1 + cos(pi * step / total)) / 2 (main_moco.py `adjust_moco_momentum`).

    base at step 0, 1 at `total_steps` (and after).
    """
    if total_steps < 1:
        raise ValueError(f"the momentum schedule needs total_steps >= 1, got {total_steps}")
    progress = min(max(step, 0) / total_steps, 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


def buffer_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters are buffers of the same names (a momentum encoder).

    Buffers are in `state_dict` (DeepSpeed checkpoints carry them), are never handed to the
    optimizer and are never partitioned by ZeRO-3, so a momentum encoder held this way
    stays whole on every rank and survives resume. DeepSpeed casts parameters, not
    buffers, to bf16/fp16: the copy keeps the float32 of its source.
    """
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if param is None else param.detach().clone())
    return clone


# Parameters gathered at once under ZeRO-3 for the momentum update (bounds the memory of a gather).
EMA_GATHER_NUMEL = 1 << 26


def _chunks(pairs: list[tuple[nn.Parameter, torch.Tensor]], max_numel: int) -> Iterator[list]:
    chunk: list[tuple[nn.Parameter, torch.Tensor]] = []
    size = 0
    for pair in pairs:
        numel = pair[1].numel()  # the buffer has the full shape even when the parameter is partitioned
        if chunk and size + numel > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += numel
    if chunk:
        yield chunk


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float, *, max_numel: int = EMA_GATHER_NUMEL) -> None:
    """target <- m * target + (1 - m) * online, for every parameter of `online` (by name).

    `target` is a `buffer_copy` of `online`: its buffer of the same name receives the
    update (BatchNorm running statistics of `target` are its own, not averaged, as in
    moco-v3 `_update_momentum_encoder`, which only visits parameters). Under ZeRO-3 the
    online parameters are gathered in chunks of at most `max_numel` elements, read, and
    released. The update runs in the target's dtype (float32).
    """
    pairs = [(p, target.get_buffer(name)) for name, p in online.named_parameters()]
    for chunk in _chunks(pairs, max_numel):
        with gathered(p for p, _ in chunk):
            for p, k in chunk:
                k.lerp_(p.detach().to(k.dtype), 1.0 - m)


class EmaEncoder(nn.Module):
    """An EMA copy of a backbone in float32 buffers (`buffer_copy`), always in eval mode like timm's ModelEma copy."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.encoder = buffer_copy(backbone)
        self.train(False)

    def train(self, mode: bool = True) -> EmaEncoder:
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> EmaEncoder:
        # Follow device moves but stay fp32: in a half-precision copy an update of
        # (1 - 0.9999) x the weights would round away.
        device = next(self.buffers()).device
        probe = fn(torch.zeros((), device=device))
        if probe.dtype != torch.float32:
            return super()._apply(lambda t: t.to(device=probe.device), recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The copy's forward in float32 (for a ViT backbone: final normalised tokens (B, prefix + N, D))."""
        return self.encoder(images.float())

    def update(self, live: nn.Module, decay: float) -> None:
        """ema = decay * ema + (1 - decay) * live, for every parameter of `live` (the backbone's timm model)."""
        momentum_update(live, self.encoder.vit, decay)
