"""VQ-KD: BEiT v2's visual tokenizer, trained by distilling a frozen teacher through a codebook.

The ViT backbone encodes the image; a Linear-Tanh-Linear head maps each patch
token to a 32-d vector, which `NormEMAQuantizer` snaps to the nearest of 8192
l2-normalised codes (straight-through gradient, EMA codebook). A shallow ViT
decoder on the patch grid turns the codes back into features and is trained to
regress the teacher's patch features with a cosine loss, plus the commitment loss
(microsoft/unilm beit2 modeling_vqkd.py). After training, `codes(images)` is the
tokenizer BEiT v2 predicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from objectives.artifacts import registry_name, source_name
from objectives.base import ExportedModel, LossOutput, Objective, RunContext
from objectives.components.backbone import VitBackbone
from objectives.components.pictures import MAX_IMAGES, display_scale, grid, id_map, to_uint8_images, usage_histogram
from objectives.components.quantizer import NormEMAQuantizer
from objectives.components.teacher import attach_teacher
from objectives.components.tokenizer import encode_head, save_tokenizer, tokenize
from objectives.components.zero import gathered_outside_forward
from objectives.configs import VQKDConfig
from objectives.registry import register


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target); (B, N, D) each."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


# One crop per image, no mask.
@register("vqkd", VQKDConfig)
class VQKD(Objective):
    """Tokenizer training: encoder -> codes -> decoder regressing the teacher's patch features."""

    def __init__(self, cfg: VQKDConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        # Encoder task layer (modeling_vqkd.py encode_task_layer): Linear, Tanh, Linear to code_dim.
        self.encode_head = encode_head(backbone.embed_dim, cfg.code_dim)
        self.quantizer = NormEMAQuantizer(
            num_codes=cfg.num_codes,
            dim=cfg.code_dim,
            decay=cfg.decay,
            kmeans_init=cfg.kmeans_init,
            restart_dead_codes=cfg.restart_dead_codes,
            dead_code_window=cfg.dead_code_window,
        )
        teacher = attach_teacher(self, cfg.teacher)
        dec = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.code_dim, dec)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, backbone.num_patches, dec))
        self.decoder_blocks = nn.ModuleList(
            Block(dec, cfg.decoder_num_heads, qkv_bias=True) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dec)
        # Decoder task layer: Linear, Tanh, Linear to the teacher's feature size.
        self.decode_head = nn.Sequential(nn.Linear(dec, dec), nn.Tanh(), nn.Linear(dec, teacher.feature_dim))
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pre-quantisation vectors (B, N, code_dim)."""
        tokens = self.backbone.encode(self.backbone.embed_patches(images)).tokens
        return self.encode_head(tokens[:, self.backbone.num_prefix_tokens :])

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """The tokenizer: (B, 3, H, W) -> code ids (B, N); never updates the codebook."""
        return tokenize(self.backbone, self.encode_head, self.quantizer.codebook, images)

    def registered_name(self) -> str:
        """`objective.registered_name`, else "vqkd-<teacher>" (e.g. vqkd-vit_base_patch16_clip_224.openai)."""
        if self.cfg.registered_name:
            return self.cfg.registered_name
        return registry_name(f"vqkd-{source_name(self.cfg.teacher.source, self.context.tracking_uri or None)}")

    def export(self, out_dir: Path) -> list[ExportedModel]:
        """The encoder (teacher layout) and the tokenizer, registered as `registered_name()`."""
        exported = super().export(out_dir)
        ctx = self.context
        if not ctx.arch:
            return exported
        path = save_tokenizer(
            self.backbone,
            self.encode_head,
            self.quantizer.codebook,
            out_dir / "tokenizer",
            arch=ctx.arch,
            arch_kwargs=ctx.arch_kwargs,
            mean=ctx.input_mean,
            std=ctx.input_std,
            extra={"teacher": self.cfg.teacher.source},
        )
        params = {"teacher": self.cfg.teacher.source, "num_codes": str(self.cfg.num_codes), "arch": ctx.arch}
        return [*exported, ExportedModel("tokenizer", path, "tokenizer", self.registered_name(), params)]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised vectors (B, N, code_dim) -> predicted teacher features (B, N, D_teacher)."""
        x = self.decoder_embed(z_q) + self.decoder_pos_embed.to(z_q.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decode_head(self.decoder_norm(x))

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]
        teacher = self.frozen_modules()["teacher"]
        target = teacher(images).patches  # (B, N, D_teacher), no grad
        z = self.encode(images)
        # The codebook update runs in float32 whatever the training dtype.
        quant = self.quantizer(z.float())
        pred = self.decode(quant.z_q.to(z.dtype))
        rec = cosine_distance(pred, target)
        loss = rec + self.cfg.commit_weight * quant.commit_loss
        stats = self.quantizer.usage_stats(quant.codes)
        metrics = {
            "vqkd/rec_loss": rec.detach(),
            "vqkd/commit_loss": quant.commit_loss.detach(),
            **{f"vqkd/{k}": v.detach().float() for k, v in stats.items()},
        }
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The tokenizer's view: `code_ids` (original | code id per patch) and the `codebook_usage` histogram.

        codebook_usage: rank-frequency counts of the codes of these images' patches, K = codebook size.
        """
        images = batch["views"][0][:MAX_IMAGES]  # (B, 3, H, W)
        with gathered_outside_forward(self):
            codes = self.codes(images)  # (B, N); eval mode: the codebook is not updated
        gh, gw = self.backbone.grid_size
        k = self.quantizer.num_codes
        original = to_uint8_images(images, self.context.input_mean, self.context.input_std)
        codes_np = codes.view(-1, gh, gw).cpu().numpy()
        rows = [[original[i], id_map(codes_np[i], k, self.backbone.patch_size)] for i in range(original.shape[0])]
        counts = torch.bincount(codes.flatten(), minlength=k).cpu().numpy()  # (K,)
        return {
            "code_ids": grid(rows, scale=display_scale(images.shape[-1])),
            "codebook_usage": usage_histogram(counts, "codes"),
        }
