"""A trained VQ-KD tokenizer as a frozen module: images -> code ids (BEiT v2's targets).

`save_tokenizer` writes what `VQKD.export` hands to MLflow; `load_tokenizer` reads it
back from a local directory, `runs:/<run_id>/tokenizer` or `models:/vqkd-<teacher>/latest`.
It is a "tokenizer" artifact (`objectives.artifacts`): tensors backbone.vit.* (timm key
names), encode_head.* and codebook; metadata arch, arch_kwargs, code_dim, num_codes, mean,
std and the teacher it was distilled from.

The encoder path is VQ-KD's own (`VitBackbone` -> Linear-Tanh-Linear -> l2-normalise ->
nearest code), so a loaded tokenizer gives exactly the codes the training run assigned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from objectives.artifacts import MODEL_URI_SCHEMES, Artifact, ArtifactError, read_artifact, save_artifact
from objectives.components.backbone import VitBackbone
from objectives.components.frozen import FrozenModel
from objectives.components.quantizer import nearest_code


def encode_head(width: int, code_dim: int) -> nn.Sequential:
    """VQ-KD's encoder task layer (unilm beit2 modeling_vqkd.py): Linear, Tanh, Linear to code_dim."""
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, code_dim))


def tokenize(backbone: VitBackbone, head: nn.Module, codebook: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> ids of the nearest codes (B, N): the one code path of training and export."""
    tokens = backbone.encode(backbone.embed_patches(images)).tokens[:, backbone.num_prefix_tokens :]
    z = F.normalize(head(tokens).float(), dim=-1)  # (B, N, code_dim)
    b, n, d = z.shape
    return nearest_code(z.reshape(b * n, d), codebook.float()).view(b, n)


class VQTokenizer(FrozenModel):
    """Frozen tokenizer: `forward(images)` -> code ids (B, N), long; always in eval mode."""

    def __init__(
        self,
        backbone: VitBackbone,
        head: nn.Module,
        codebook: torch.Tensor,
        *,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        tokenizer_mean: Sequence[float] | None = None,
        tokenizer_std: Sequence[float] | None = None,
        source: str = "",
    ) -> None:
        super().__init__(source)
        self.backbone = backbone
        self.encode_head = head
        self.register_buffer("codebook", codebook.float().clone())
        self.freeze(input_mean, input_std, tokenizer_mean, tokenizer_std)

    @property
    def num_codes(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.backbone.grid_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model_input(images, self.backbone.vit.patch_embed.proj.weight.dtype)
        return tokenize(self.backbone, self.encode_head, self.codebook, x)


def save_tokenizer(
    backbone: VitBackbone,
    head: nn.Module,
    codebook: torch.Tensor,
    path: str | Path,
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the tokenizer artifact into directory `path`; tensors in fp32."""
    tensors = {f"backbone.vit.{k}": v for k, v in backbone.vit.state_dict().items()}
    tensors.update({f"encode_head.{k}": v for k, v in head.state_dict().items()})
    tensors["codebook"] = codebook
    meta = {
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "code_dim": int(codebook.shape[1]),
        "num_codes": int(codebook.shape[0]),
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std],
        **(extra or {}),
    }
    return save_artifact(path, "tokenizer", tensors, meta)


def train_hint(img_size: int | None = None, patch_size: int | None = None) -> str:
    """How to make a tokenizer: the command a missing-tokenizer error prints."""
    model = f" model.img_size={img_size} model.patch_size={patch_size}" if img_size and patch_size else ""
    return (
        "train one with `python -m pretrain.run objective=vqkd objective.teacher.source=<teacher>"
        f"{model}` and pass objective.tokenizer=models:/vqkd-<teacher>/latest (or its export/tokenizer directory)"
    )


def load_tokenizer(
    source: str,
    *,
    tracking_uri: str | None = None,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
) -> VQTokenizer:
    """The frozen tokenizer at `source`: a `models:/`/`runs:/` URI or a local directory."""
    if "://" in source and not source.startswith(MODEL_URI_SCHEMES):
        raise ArtifactError(
            f"objective.tokenizer={source}: use models:/<name>@<alias>, runs:/<run_id>/tokenizer or a path"
        )
    if not source:
        raise ArtifactError(f"objective.tokenizer is empty; {train_hint()}")
    artifact = read_artifact(source, "tokenizer", tracking_uri=tracking_uri, hint=train_hint())
    return _from_artifact(artifact, input_mean, input_std)


def _from_artifact(
    artifact: Artifact, input_mean: Sequence[float] | None, input_std: Sequence[float] | None
) -> VQTokenizer:
    import timm

    meta = artifact.meta
    backbone = VitBackbone(timm.create_model(meta["arch"], pretrained=False, **meta["arch_kwargs"]))
    backbone.vit.load_state_dict(artifact.prefixed("backbone.vit."))
    head = encode_head(backbone.embed_dim, int(meta["code_dim"]))
    head.load_state_dict(artifact.prefixed("encode_head."))
    return VQTokenizer(
        backbone,
        head,
        artifact.tensors["codebook"],
        input_mean=input_mean,
        input_std=input_std,
        tokenizer_mean=meta.get("mean"),
        tokenizer_std=meta.get("std"),
        source=artifact.source,
    )
