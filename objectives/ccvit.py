"""CCViT: masked image modeling on k-means centroids of pixel patches (Yan et al., 2023).

"Centroid-centered Modeling for Efficient Vision Transformer Pre-training"; official
code Cakeyan/CCViT_Public (datasets.py, engine_for_pretraining.py, modeling_pretrain.py).
The tokenizer is non-parametric: the token of a patch is its nearest k-means centroid
of raw [0, 1] patches, built here from the run's own data before step 1 (`prepare`).
The input is corrupted twice: block-wise masked patches become a learned mask token,
and some random unmasked patches get their centroid's pixels. At the masked and the
replaced positions the encoder predicts the centroid ids of the original patches
(CE through an LM head on the final tokens), and a patch-aggregation branch (final
CLS + an earlier block's patch tokens -> 2 blocks -> its own norm and Linear)
regresses the original patches' per-patch normalised pixels (MSE). Loss = CE + MSE.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from objectives.base import ExportedModel, LossOutput, Objective, RunContext
from objectives.components.aggregation import aggregation_blocks, aggregation_layer, beit_init, encode_with_aggregation
from objectives.components.backbone import VitBackbone
from objectives.components.kmeans import (
    from_pixels,
    image_patches,
    kmeans,
    load_centroids,
    nearest_centroid,
    rank_and_world,
    save_centroids,
    to_pixels,
)
from objectives.components.patches import masked_patch_mse, patchify, unpatchify
from objectives.components.pictures import MAX_IMAGES, display_scale, grid, id_map, to_uint8_images, usage_histogram
from objectives.configs import CCViTConfig
from objectives.registry import register

log = logging.getLogger(__name__)


def random_unmasked(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool: `count` positions per row drawn uniformly among the unmasked ones (torch's global RNG)."""
    if count == 0:
        return torch.zeros_like(mask)
    visible = int((~mask).sum(1).min())
    if visible < count:
        raise ValueError(f"cannot replace {count} patches: a row has only {visible} unmasked")
    noise = torch.rand(mask.shape, device=mask.device).masked_fill(mask, 2.0)  # masked positions sort last
    chosen = noise.topk(count, dim=1, largest=False).indices  # (B, count)
    return torch.zeros_like(mask).scatter_(1, chosen, True)


class Corruption(NamedTuple):
    """The encoder's input and what the losses need, from `CCViT.corrupt`."""

    images: torch.Tensor  # (B, 3, H, W) normalised, the input's dtype: replaced patches carry centroid pixels
    codes: torch.Tensor  # (B, N) long: centroid ids of the original patches
    replaced: torch.Tensor  # (B, N) bool: unmasked patches whose pixels were replaced
    patches: torch.Tensor  # (B, N, p*p*3) float32: the original patches' pixels in [0, 1]


# One crop and a block-wise mask, drawn in the loader workers.
@register("ccvit", CCViTConfig, mask="block")
class CCViT(Objective):
    """Mask-token + centroid-replacement corruption; CE on centroid ids and MSE on pixels."""

    centroids: torch.Tensor
    centroid_counts: torch.Tensor
    centroids_ready: torch.Tensor
    kmeans_stats: torch.Tensor

    def __init__(self, cfg: CCViTConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        patch = backbone.patch_size
        dim = patch * patch * 3
        centroids = self.context.inputs.get("centroids")
        source, counts, meta = "<given>", None, {}
        if centroids is None and cfg.tokenizer:
            centroids, counts, meta = load_centroids(cfg.tokenizer, tracking_uri=self.context.tracking_uri or None)
            source = cfg.tokenizer
        if centroids is not None and (centroids.ndim != 2 or centroids.shape[1] != dim):
            raise ValueError(
                f"objective.tokenizer {source}: centroids of shape {tuple(centroids.shape)}, but the encoder's "
                f"patches are {patch}x{patch}x3 = {dim} pixels; build centroids with the same model.patch_size"
            )
        k = cfg.num_centroids if centroids is None else int(centroids.shape[0])
        # Buffers: checkpoints carry them (a resumed run skips `prepare`), ZeRO-3 never splits them.
        self.register_buffer("centroids", torch.zeros(k, dim) if centroids is None else centroids.float().clone())
        self.register_buffer("centroid_counts", torch.zeros(k) if counts is None else counts.clone())
        self.register_buffer("centroids_ready", torch.tensor(centroids is not None))
        # The k-means build that made the centroids (from the file when reused): [seconds,
        # fraction of centroids owning sample points, mean squared error per pixel].
        stats = [float(meta.get(key, 0.0)) for key in ("kmeans_seconds", "usage", "mse")]
        self.register_buffer("kmeans_stats", torch.tensor(stats))
        self.num_replaced = round(backbone.num_patches * cfg.replace_ratio)
        width = backbone.embed_dim
        self.early_layers = aggregation_layer(cfg.early_layers, backbone.depth)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.aggregation_blocks = aggregation_blocks(backbone, cfg.head_layers)
        # --shared_lm_head False: the pixel branch has its own norm and head (modeling_pretrain.py cls_pt_*).
        self.pixel_norm = nn.LayerNorm(width, eps=1e-6)
        self.pixel_head = nn.Linear(width, dim)
        self.lm_head = nn.Linear(width, k)
        beit_init(self.mask_token, [self.lm_head, self.pixel_head, self.pixel_norm, *self.aggregation_blocks.modules()])

    @property
    def num_centroids(self) -> int:
        return int(self.centroids.shape[0])

    # --- the tokenizer ---------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, batches: Iterator[dict[str, Any]]) -> None:
        """Build the centroids by k-means on patches of this rank's stream (all ranks jointly)."""
        if bool(self.centroids_ready):
            return
        rank, world = rank_and_world()
        want = math.ceil(self.cfg.kmeans_samples / world)  # patches on this rank
        tic = time.perf_counter()
        chunks, have = [], 0
        for batch in batches:
            pixels = to_pixels(batch["views"][0], self.context.input_mean, self.context.input_std)
            patches = image_patches(pixels, self.backbone.patch_size)  # (B * N, p*p*3), whole images first
            chunks.append(patches[: want - have])
            have += chunks[-1].shape[0]
            if have >= want:
                break
        if not chunks:
            raise RuntimeError(f"rank {rank}: the data stream gave no batches to build the CCViT centroids from")
        x = torch.cat(chunks)
        sampled = time.perf_counter() - tic
        tic = time.perf_counter()
        result = kmeans(
            x, self.num_centroids, self.cfg.kmeans_iters, init=self.cfg.kmeans_init, seed=self.cfg.kmeans_seed
        )
        seconds = time.perf_counter() - tic
        self.set_centroids(result.centroids, result.counts)
        self.kmeans_stats.copy_(torch.tensor([seconds, result.usage, result.mse]))
        if rank == 0:
            log.info(
                "k-means: %d centroids of %dx%dx3 patches from %d patches x %d ranks (sampled in %.1f s) in %.1f s, "
                "%d iterations; %.1f%% of centroids used, mse %.3g per pixel, %d empty clusters split",
                self.num_centroids,
                self.backbone.patch_size,
                self.backbone.patch_size,
                x.shape[0],
                world,
                sampled,
                seconds,
                self.cfg.kmeans_iters,
                100 * result.usage,
                result.mse,
                result.splits,
            )

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Use these centroids (K, p*p*3) from now on."""
        self.centroids.copy_(centroids)
        self.centroid_counts.copy_(torch.zeros(self.num_centroids) if counts is None else counts)
        self.centroids_ready.fill_(True)

    @torch.no_grad()
    def corrupt(self, images: torch.Tensor, mask: torch.Tensor) -> Corruption:
        """Tokenise the original patches and replace `num_replaced` random unmasked patches by their centroid.

        Replacement happens in [0, 1] pixels before normalisation, as utils.kmeans_mask in the
        official code; the other pixels are passed through untouched.
        """
        if not bool(self.centroids_ready):
            raise RuntimeError(
                "CCViT centroids are not built: call prepare(batches) (the training loop does before step 1) "
                "or give objective.tokenizer"
            )
        mean, std = self.context.input_mean, self.context.input_std
        patch, grid = self.backbone.patch_size, self.backbone.grid_size
        patches = patchify(to_pixels(images, mean, std), patch)  # (B, N, p*p*3) in [0, 1]
        b, n, d = patches.shape
        centroids = self.centroids.float()
        codes = nearest_centroid(patches.reshape(b * n, d), centroids).view(b, n)
        replaced = random_unmasked(mask, self.num_replaced)
        centroid_images = from_pixels(unpatchify(centroids[codes], patch, grid), mean, std).to(images.dtype)
        where = unpatchify(replaced.unsqueeze(-1).expand(b, n, d), patch, grid)  # (B, 3, H, W) bool
        return Corruption(torch.where(where, centroid_images, images), codes, replaced, patches)

    # --- the model -------------------------------------------------------------------

    def encode(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final normed patch tokens and the pixel branch's normed tokens: both (B, N, D)."""
        final, x = encode_with_aggregation(
            self.backbone, images, mask, self.mask_token, self.early_layers, self.aggregation_blocks
        )
        return final, self.pixel_norm(x)[:, 1:]

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]
        mask = self.batch_mask(batch)  # (B, N)
        c = self.corrupt(images, mask)
        targets = mask | c.replaced  # (B, N): masked + replaced positions
        labels = c.codes[targets]  # (T,)
        final, pixel_tokens = self.encode(c.images, mask)
        logits = self.lm_head(final[targets])  # (T, K)
        ce = F.cross_entropy(logits.float(), labels)
        pix = masked_patch_mse(self.pixel_head(pixel_tokens).float(), c.patches, targets.float(), norm_pix=True)
        loss = ce + self.cfg.pixel_weight * pix
        with torch.no_grad():
            metrics = {
                "ccvit/ce_loss": ce.detach(),
                "ccvit/pix_loss": pix.detach(),
                "ccvit/acc": (logits.argmax(-1) == labels).float().mean(),
                # Distinct centroids among this batch's targets, as a fraction of all centroids.
                "ccvit/centroid_usage": torch.unique(labels).numel() / torch.tensor(float(self.num_centroids)),
                "ccvit/kmeans_seconds": self.kmeans_stats[0].clone(),
                "ccvit/kmeans_usage": self.kmeans_stats[1].clone(),
            }
        return LossOutput(loss=loss, metrics=metrics)

    # --- pictures --------------------------------------------------------------------

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """What the tokenizer sees: `centroid_ids` per image and the `centroid_usage` histogram.

        centroid_ids: original | centroid id per patch | the image rebuilt from its patches'
        centroids. centroid_usage: rank-frequency counts of the centroid ids of these images'
        patches. Only the tokenizer is drawn (nearest centroid, no module call, so nothing to
        gather under ZeRO-3); {} before the centroids are built.
        """
        if not bool(self.centroids_ready):
            log.warning("CCViT pictures: the centroids are not built yet, nothing to draw")
            return {}
        images = batch["views"][0][:MAX_IMAGES]  # (B, 3, H, W)
        mean, std = self.context.input_mean, self.context.input_std
        patch, (gh, gw) = self.backbone.patch_size, self.backbone.grid_size
        patches = patchify(to_pixels(images, mean, std), patch)  # (B, N, p*p*3) in [0, 1]
        b, n, d = patches.shape
        centroids = self.centroids.float()
        codes = nearest_centroid(patches.reshape(b * n, d), centroids).view(b, n)
        rebuilt = unpatchify(centroids[codes], patch, (gh, gw))  # (B, 3, H, W) in [0, 1]
        no_shift, no_scale = (0.0,) * 3, (1.0,) * 3
        original = to_uint8_images(images, mean, std)
        rebuilt_np = to_uint8_images(rebuilt, no_shift, no_scale)
        codes_np = codes.view(b, gh, gw).cpu().numpy()
        k = self.num_centroids
        rows = [[original[i], id_map(codes_np[i], k, patch), rebuilt_np[i]] for i in range(b)]
        counts = torch.bincount(codes.flatten(), minlength=k).cpu().numpy()  # (K,)
        return {
            "centroid_ids": grid(rows, scale=display_scale(images.shape[-1])),
            "centroid_usage": usage_histogram(counts, "centroids"),
        }

    # --- export ----------------------------------------------------------------------

    def export(self, out_dir: Path) -> list[ExportedModel]:
        """The encoder, and the centroids as `ccvit-centroids-<k>x<patch>` for later runs to reuse."""
        items = super().export(out_dir)
        if not bool(self.centroids_ready):
            return items
        patch, k = self.backbone.patch_size, self.num_centroids
        stats = self.kmeans_stats.tolist()
        path = save_centroids(
            out_dir / "centroids",
            self.centroids,
            patch_size=patch,
            counts=self.centroid_counts,
            extra={
                "source": self.cfg.tokenizer or "k-means",
                "kmeans_iters": self.cfg.kmeans_iters,
                "kmeans_samples": self.cfg.kmeans_samples,
                "kmeans_seconds": stats[0],
                "usage": stats[1],
                "mse": stats[2],
            },
        )
        name = self.cfg.registered_name or f"ccvit-centroids-{k}x{patch}"
        params = {"num_centroids": str(k), "patch_size": str(patch)}
        items.append(ExportedModel("centroids", path, "ccvit.centroids", registered_name=name, params=params))
        return items
