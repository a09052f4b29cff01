"""Encoders for evaluation: load an exported timm ViT from any URI, a random-init twin, frozen features.

An exported encoder is an encoder artifact (`objectives.artifacts`: timm's key names, the
`timm.create_model` call and the input mean/std), behind a `models:/` or `runs:/` URI, in
a local directory or at an fsspec URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("pretrain.evaluate")


@dataclass
class Encoder:
    """A timm ViT and the input it expects (from the export's pretrain.json)."""

    vit: nn.Module
    arch: str
    arch_kwargs: dict[str, Any]
    mean: list[float]
    std: list[float]
    source: str

    input_size: int = 0  # the training image size, recorded by the export ("img_size"); 0 = unknown
    features: str = ""  # how its objective reads it ("cls" | "mean"), recorded by the export; "" = unsaid

    def features_for(self, configured: str) -> str:
        """eval.features resolved for this encoder: "auto" -> the export's record, else "cls"."""
        return (self.features or "cls") if configured == "auto" else configured

    @property
    def img_size(self) -> int:
        """The image size the encoder was trained on: a ViT's own, else the export's record, else timm's default."""
        patch_embed = getattr(self.vit, "patch_embed", None)
        size = (
            getattr(patch_embed, "img_size", None) if getattr(self.vit, "num_prefix_tokens", None) is not None else None
        )
        if size is None:
            size = self.input_size or self.vit.pretrained_cfg["input_size"][-1]
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_encoder(uri: str, *, tracking_uri: str | None, storage_options: dict[str, Any] | None = None) -> Encoder:
    """The encoder behind a models:/ or runs:/ URI, a local directory, or an fsspec directory URL."""
    from objectives.base import IMAGENET_MEAN, IMAGENET_STD
    from objectives.components.teacher import load_encoder as load_encoder_artifact

    vit, meta = load_encoder_artifact(uri, tracking_uri=tracking_uri, storage_options=storage_options)
    return Encoder(
        vit=vit,
        arch=meta.get("arch", ""),
        arch_kwargs=dict(meta.get("arch_kwargs", {})),
        mean=list(meta.get("mean") or IMAGENET_MEAN),
        std=list(meta.get("std") or IMAGENET_STD),
        source=uri,
        input_size=int(meta.get("img_size") or 0),
        features=str(meta.get("features") or ""),
    )


def random_init_like(encoder: Encoder, seed: int) -> nn.Module:
    """A freshly initialised timm model of the same architecture (timm's own init, seeded)."""
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(encoder.arch, pretrained=False, **encoder.arch_kwargs).eval()


def pooled_features(vit: nn.Module, images: torch.Tensor, features: str) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D): a ViT's CLS token or the mean of its patch tokens, after the final norm;
    any other timm model's pooled features (what its classifier reads), whatever `features` says."""
    if getattr(vit, "num_prefix_tokens", None) is None:  # not a ViT: ResNet, ConvNeXt, Swin, ...
        return vit.forward_head(vit.forward_features(images), pre_logits=True)
    tokens = vit.forward_features(images)  # (B, prefix + N, D)
    if features == "cls":
        return tokens[:, 0]
    return tokens[:, int(getattr(vit, "num_prefix_tokens", 1)) :].mean(dim=1)


def extract(
    models: dict[str, nn.Module],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, int]],
    *,
    device: torch.device,
    features: str,
    what: str = "features",
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One pass over `batches` through every model: ({name: (N, D) float32 features}, labels (N,), skipped).

    Shows its progress as `what` (a bar on a terminal, periodic lines in a log; data.progress).
    """
    import torch

    from data.progress import Progress

    feats: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels: list[torch.Tensor] = []
    skipped = 0
    with torch.inference_mode(), Progress(what, unit="img", logger=log) as progress:
        for images, y, bad in batches:
            skipped += bad
            progress.update(int(y.numel()) + bad)
            if not y.numel():
                continue
            x = images.to(device)
            for name, model in models.items():
                feats[name].append(pooled_features(model, x, features).float().cpu())
            labels.append(y)
    if not labels:
        return {name: torch.empty(0) for name in models}, torch.empty(0, dtype=torch.int64), skipped
    return {name: torch.cat(f) for name, f in feats.items()}, torch.cat(labels), skipped


def pick_device(name: str = "") -> torch.device:
    """`name`, else CUDA when available, else the CPU."""
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
