"""Frozen models that compute a method's targets (teachers, tokenizers): no gradients, always in eval mode.

They see the batch's images, normalised with the data pipeline's mean/std, and re-normalise
them per channel to the statistics they were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def input_affine(
    input_mean: Sequence[float] | None,
    input_std: Sequence[float] | None,
    model_mean: Sequence[float] | None,
    model_std: Sequence[float] | None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Per-channel (scale, shift) that turn data-normalised images into the model's normalisation.

    x_model = (x * in_std + in_mean - m_mean) / m_std = x * scale + shift; (None, None)
    when any statistic is unknown or the two normalisations agree.
    """
    if None in (input_mean, input_std, model_mean, model_std):
        return None, None
    in_mean, in_std = torch.tensor(input_mean, dtype=torch.float32), torch.tensor(input_std, dtype=torch.float32)
    m_mean, m_std = torch.tensor(model_mean, dtype=torch.float32), torch.tensor(model_std, dtype=torch.float32)
    scale, shift = in_std / m_std, (in_mean - m_mean) / m_std
    if torch.equal(scale, torch.ones(3)) and torch.equal(shift, torch.zeros(3)):
        return None, None
    return scale, shift


class FrozenModel(nn.Module):
    """Base of teachers and tokenizers: `freeze` at the end of `__init__`, `model_input` in `forward`."""

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source  # where it was loaded from, for messages

    def freeze(
        self,
        input_mean: Sequence[float] | None,
        input_std: Sequence[float] | None,
        model_mean: Sequence[float] | None,
        model_std: Sequence[float] | None,
    ) -> None:
        """No gradients, eval mode, and the per-channel affine from the data's normalisation to the model's."""
        scale, shift = input_affine(input_mean, input_std, model_mean, model_std)
        self.renormalize = scale is not None
        scale = torch.ones(3) if scale is None else scale
        shift = torch.zeros(3) if shift is None else shift
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenModel:
        """Stays in eval mode (no dropout, no drop-path) whatever the caller asks."""
        return super().train(False)

    def model_input(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 3, H, W) images in the model's normalisation (computed in float32), cast to `dtype`."""
        if self.renormalize:
            images = images.float() * self.in_scale + self.in_shift
        return images.to(dtype)
