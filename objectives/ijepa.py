"""I-JEPA: Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture" (CVPR 2023).

A context encoder sees one large block of the image (its patches only, with every target
patch removed); a narrow ViT predictor, given the context tokens and a mask token at each
position of a target block, predicts the features an EMA target encoder computes there from
the whole image. Four target blocks per image; no pixel reconstruction, no augmentation
beyond crops:

    h = LN(target_encoder(x))[targets]                # no gradient, LayerNorm without affine
    z = context_encoder(x[context])
    loss = smooth_l1(predictor(z, targets), h)        # mean over target patches and features

Recipe from facebookresearch/ijepa (configs/in1k_vith14_ep300.yaml, src/train.py,
src/models/vision_transformer.py, src/masks/multiblock.py); see `IJEPAConfig`.

The family's variants here: FlexPredict (noised target positions in the predictor) and DMT-JEPA
(each target patch's target aggregated from its most similar neighbours).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data.needs import DataNeeds, MaskSpec
from objectives.base import LossOutput, Objective, RunContext
from objectives.components.backbone import VitBackbone
from objectives.components.ema import EmaEncoder, buffer_copy, momentum_update
from objectives.components.pictures import MASK_GREY, MAX_IMAGES, display_scale, grid, id_colours, to_uint8_images
from objectives.components.pos_embed import sincos_2d
from objectives.components.predictor import JepaPredictor, LocalAggregation, gather_tokens, keep_indices
from objectives.configs import DMTJEPAConfig, FlexPredictConfig, IJEPAConfig
from objectives.registry import register


@register("ijepa", IJEPAConfig)
class IJEPA(Objective):
    """Context encoder (the backbone) + predictor against an EMA target encoder, on multi-block masks."""

    def __init__(self, cfg: IJEPAConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        # Fixed 2-D sin-cos positions in the encoder (vision_transformer.py: pos_embed requires_grad=False).
        backbone.use_fixed_pos_embed(sincos_2d(backbone.embed_dim, *backbone.grid_size))
        heads = cfg.predictor_num_heads or int(backbone.vit.blocks[0].attn.num_heads)
        self.predictor = JepaPredictor(
            backbone.embed_dim,
            backbone.grid_size,
            width=cfg.predictor_embed_dim,
            depth=cfg.predictor_depth,
            num_heads=heads,
        )
        self.target_encoder = EmaEncoder(backbone)  # float32 buffers: never optimised or partitioned
        self.total_steps = cfg.total_steps or int(self.context.total_steps or 0)
        self.register_buffer("current_momentum", torch.tensor(float(cfg.ema_momentum)))

    @classmethod
    def data_needs(cls, cfg: IJEPAConfig) -> DataNeeds:
        # One crop; the context and target blocks, (1 + num_targets, N) per sample, from the loader workers.
        return DataNeeds(views=1, mask=MaskSpec("multiblock", 0.0, targets=cfg.num_targets))

    def momentum(self, step: int) -> float:
        """EMA momentum after optimizer step `step` (0-based): linear from ema_momentum to ema_momentum_end."""
        cfg = self.cfg
        progress = min(1.0, step / self.total_steps) if self.total_steps > 0 else 0.0
        return cfg.ema_momentum + progress * (cfg.ema_momentum_end - cfg.ema_momentum)

    def block_indices(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context indices (B, Kc), target indices (T x B, Kt), target-major) of the batch's masks."""
        masks = self.batch_mask(batch)  # (B, 1 + T, N), True = masked
        t = self.cfg.num_targets
        if masks.dim() != 3 or masks.shape[1] != 1 + t:
            raise ValueError(f"{self.name} expects (B, 1 + {t}, N) multi-block masks, got {tuple(masks.shape)}")
        context_idx = keep_indices(~masks[:, 0])
        target_idx = keep_indices(masks[:, 1:].transpose(0, 1).flatten(0, 1))  # row t B + b: target t of b
        return context_idx, target_idx

    @torch.no_grad()
    def targets(self, images: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """The target encoder's final tokens, LayerNorm-ed without affine, at target_idx: (T B, Kt, D) float32."""
        h = self.target_tokens(images)
        repeats = target_idx.shape[0] // h.shape[0]
        return gather_tokens(h.repeat(repeats, 1, 1), target_idx)

    @torch.no_grad()
    def target_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The target encoder's patch tokens, LayerNorm-ed without affine: (B, N, D) float32."""
        h = self.target_encoder(images)[:, self.backbone.num_prefix_tokens :]
        return F.layer_norm(h, h.shape[-1:])

    def predictor_input(self, z: torch.Tensor) -> torch.Tensor:
        """What the predictor reads of the context tokens (B, Kc, D): the tokens themselves (I-JEPA)."""
        return z

    def predict(self, images: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor):
        """(context tokens (B, Kc, D), predictions (T B, Kt, D)) of the context encoder and the predictor."""
        prefix = self.backbone.num_prefix_tokens
        tokens = self.backbone.embed_patches(images)  # (B, N, D)
        z = self.backbone.encode(tokens, keep_idx=context_idx).tokens[:, prefix:]  # (B, Kc, D)
        pred = self.predictor(
            self.predictor_input(z), context_idx, target_idx, target_pos=self.target_positions(target_idx)
        )
        return z, pred

    def target_positions(self, target_idx: torch.Tensor) -> torch.Tensor | None:
        """The targets' position embeddings for the predictor; None: its own exact ones (I-JEPA)."""
        return None

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]  # (B, 3, H, W), normalised
        context_idx, target_idx = self.block_indices(batch)
        h = self.targets(images, target_idx)
        z, pred = self.predict(images, context_idx, target_idx)
        if self.cfg.loss == "smooth_l1":
            loss = F.smooth_l1_loss(pred.float(), h)
        else:
            loss = F.mse_loss(pred.float(), h)
        n = self.backbone.num_patches
        with torch.no_grad():
            # Collapse watch: the context encoder's per-dimension std over all its tokens (0 = collapsed).
            feature_std = z.float().flatten(0, 1).std(dim=0).mean()
        metrics = {
            f"{self.name}/feature_std": feature_std,
            f"{self.name}/context_ratio": torch.tensor(context_idx.shape[1] / n),
            f"{self.name}/target_ratio": torch.tensor(target_idx.shape[1] / n),
            f"{self.name}/momentum": self.current_momentum.detach().clone(),
        }
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """target <- m target + (1 - m) context encoder, after every optimizer step (train.py)."""
        m = self.momentum(step)
        self.target_encoder.update(self.backbone.vit, m)
        self.current_momentum.fill_(m)

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`<name>_blocks` (`ijepa_blocks`): per image, the image | the context the encoder sees (the rest grey) | each
        target block tinted in its own colour over the grey image."""
        images = batch["views"][0][:MAX_IMAGES]
        masks = self.batch_mask(batch)[: images.shape[0]].cpu().numpy()  # (B, 1 + T, N); no module runs
        gh, gw = self.backbone.grid_size
        cell = self.backbone.patch_size
        original = to_uint8_images(images, self.context.input_mean, self.context.input_std)  # (B, H, W, 3)
        colours = id_colours(np.arange(self.cfg.num_targets), self.cfg.num_targets)  # (T, 3)

        def upscale(m: np.ndarray) -> np.ndarray:  # (N,) -> (H, W) bool
            return m.reshape(gh, gw).repeat(cell, axis=0).repeat(cell, axis=1)

        rows = []
        for i in range(original.shape[0]):
            context = np.where(upscale(masks[i, 0])[..., None], np.uint8(MASK_GREY), original[i])
            tinted = np.full_like(original[i], MASK_GREY)
            for t in range(self.cfg.num_targets):
                inside = upscale(masks[i, 1 + t])[..., None]
                blend = (original[i].astype(np.uint16) + colours[t].astype(np.uint16)) // 2
                tinted = np.where(inside, blend.astype(np.uint8), tinted)
            rows.append([original[i], context, tinted])
        return {f"{self.name}_blocks": grid(rows, scale=display_scale(images.shape[-1]))}


@register("flexpredict", FlexPredictConfig)
class FlexPredict(IJEPA):
    """I-JEPA with stochastic target positions: pos + A n, n ~ N(0, sigma^2 I) in the encoder's width, A the
    predictor's input projection (shared, as the paper's remedy for the noise being learnt away)."""

    def target_positions(self, target_idx: torch.Tensor) -> torch.Tensor | None:
        """(T B, Kt, width) noised position embeddings of the targets while training; None (exact) otherwise."""
        sigma = self.cfg.position_noise
        if not self.training or sigma == 0:
            return None
        predictor = self.predictor
        weight = predictor.embed.weight  # A: (width, D)
        noise = torch.randn(*target_idx.shape, weight.shape[1], device=weight.device, dtype=weight.dtype) * sigma
        return predictor.pos_embed[target_idx].to(weight.dtype) + F.linear(noise, weight)


@register("dmtjepa", DMTJEPAConfig)
class DMTJEPA(IJEPA):
    """I-JEPA with discriminative masked targets: each patch's target aggregates its most similar window
    neighbours (an EMA aggregation head on the target tokens); the trained head conditions the
    predictor's input on the context."""

    def __init__(self, cfg: DMTJEPAConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        self.aggregation = LocalAggregation(
            backbone.embed_dim,
            backbone.grid_size,
            num_heads=cfg.aggregation_num_heads or int(backbone.vit.blocks[0].attn.num_heads),
            neighbours=cfg.neighbours,
            window=cfg.window,
            depth=cfg.aggregation_depth,
        )
        self.target_aggregation = buffer_copy(self.aggregation)  # EMA, float32 buffers like the target encoder
        self.register_buffer("neighbour_similarity", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def target_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """LN(target encoder tokens) -> the EMA head's per-patch aggregates of their chosen neighbours."""
        h, similarity = self.target_aggregation.targets(super().target_tokens(images))
        self.neighbour_similarity.copy_(similarity.mean())
        return h

    def predictor_input(self, z: torch.Tensor) -> torch.Tensor:
        return self.aggregation.context(z)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        out = super().forward(batch)
        # Mean cosine of the chosen neighbours to their patch (1 everywhere = collapsed target features).
        out.metrics[f"{self.name}/neighbour_similarity"] = self.neighbour_similarity.detach().clone()
        return out

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """I-JEPA's blocks, and `<name>_neighbours`: per image, the image | for three probe patches (a quarter,
        half and three quarters along the diagonal), the probe tinted red and the neighbours the target head
        chose for it tinted blue, the rest dimmed."""
        out = super().pictures(batch)
        images = batch["views"][0][:MAX_IMAGES]
        chosen, _ = self.target_aggregation.choose(super().target_tokens(images))  # (B, N, k); buffers only
        chosen = chosen.cpu().numpy()
        gh, gw = self.backbone.grid_size
        cell = self.backbone.patch_size
        probes = [int(f * gh) * gw + int(f * gw) for f in (0.25, 0.5, 0.75)]
        original = to_uint8_images(images, self.context.input_mean, self.context.input_std)  # (B, H, W, 3)
        red, blue = np.array([255, 0, 0], np.uint16), np.array([0, 90, 255], np.uint16)

        def cells(indices: list[int]) -> np.ndarray:  # patch indices -> (H, W, 1) bool
            m = np.zeros(gh * gw, dtype=bool)
            m[indices] = True
            return m.reshape(gh, gw).repeat(cell, axis=0).repeat(cell, axis=1)[..., None]

        rows = []
        for i in range(original.shape[0]):
            image = original[i].astype(np.uint16)
            dimmed = ((image + MASK_GREY) // 2).astype(np.uint8)
            row = [original[i]]
            for p in probes:
                panel = np.where(cells(chosen[i, p].tolist()), ((image + blue) // 2).astype(np.uint8), dimmed)
                row.append(np.where(cells([p]), ((image + red) // 2).astype(np.uint8), panel))
            rows.append(row)
        out[f"{self.name}_neighbours"] = grid(rows, scale=display_scale(images.shape[-1]))
        return out

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The target encoder and the target head follow the context encoder and the head with one momentum."""
        super().after_step(step)
        momentum_update(self.aggregation, self.target_aggregation, float(self.current_momentum))
