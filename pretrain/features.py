"""Encoders for evaluation: load an exported timm ViT from any URI, a random-init twin, frozen features.

An exported encoder is the `save_teacher` layout (teacher.safetensors with timm's key
names + teacher.json with the `timm.create_model` call and the input mean/std),
behind a `models:/` or `runs:/` URI, in a local directory or at an fsspec URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Encoder:
    """A timm ViT and the input it expects (from the export's teacher.json)."""

    vit: nn.Module
    arch: str
    arch_kwargs: dict[str, Any]
    mean: list[float]
    std: list[float]
    source: str

    @property
    def img_size(self) -> int:
        size = self.vit.patch_embed.img_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def copy_dir_from(url: str, dst: Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy the files of directory `url` (a local path or fsspec URL) into `dst`; returns `dst`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.isdir(path):
        raise FileNotFoundError(f"{url}: no such directory")
    dst.mkdir(parents=True, exist_ok=True)
    for remote in fs.find(path):
        local = dst / remote[len(path.rstrip("/")) + 1 :]
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
    return dst


def load_encoder(uri: str, *, tracking_uri: str | None, storage_options: dict[str, Any] | None = None) -> Encoder:
    """The encoder behind a models:/ or runs:/ URI, a local directory, or an fsspec directory URL."""
    import tempfile

    from data.config import url_scheme
    from objectives.base import IMAGENET_MEAN, IMAGENET_STD
    from objectives.teacher import load_exported_vit

    with tempfile.TemporaryDirectory(prefix="encoder-") as tmp:
        source = uri
        if not uri.startswith(("models:/", "runs:/")) and url_scheme(uri) != "file":
            source = str(copy_dir_from(uri, Path(tmp), storage_options))
        vit, meta = load_exported_vit(source, tracking_uri=tracking_uri)
    return Encoder(
        vit=vit,
        arch=meta.get("arch", ""),
        arch_kwargs=dict(meta.get("arch_kwargs", {})),
        mean=list(meta.get("mean") or IMAGENET_MEAN),
        std=list(meta.get("std") or IMAGENET_STD),
        source=uri,
    )


def random_init_like(encoder: Encoder, seed: int) -> nn.Module:
    """A freshly initialised timm model of the same architecture (timm's own init, seeded)."""
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(encoder.arch, pretrained=False, **encoder.arch_kwargs).eval()


def pooled_features(vit: nn.Module, images: torch.Tensor, features: str) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D): the CLS token or the mean of the patch tokens, after the final norm."""
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
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """One pass over `batches` through every model: ({name: (N, D) float32 features}, labels (N,), skipped)."""
    import torch

    feats: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels: list[torch.Tensor] = []
    skipped = 0
    with torch.inference_mode():
        for images, y, bad in batches:
            skipped += bad
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
