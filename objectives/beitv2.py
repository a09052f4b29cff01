"""BEiT v2: masked image modeling with a VQ-KD visual tokenizer (Peng et al., 2022).

The frozen tokenizer maps the uncorrupted image to one code per patch. The encoder
sees the image with block-wise-masked patches replaced by a learned mask token and
predicts the codes of the masked patches through an LM head (cross-entropy). A
patch-aggregation branch concatenates the final CLS token with the patch tokens of
an earlier block, runs two more blocks, and predicts the same codes through the
same norm and LM head, so the CLS token must gather the image's content; the loss
is the sum of the two cross-entropies (microsoft/unilm beit2 modeling_pretrain.py,
engine_for_pretraining.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from objectives.base import LossOutput, Objective, RunContext
from objectives.components.aggregation import aggregation_blocks, aggregation_layer, beit_init, encode_with_aggregation
from objectives.components.backbone import VitBackbone
from objectives.components.pictures import MAX_IMAGES, display_scale, grid, id_map, to_uint8_images
from objectives.components.tokenizer import VQTokenizer, load_tokenizer
from objectives.components.zero import gathered_outside_forward
from objectives.configs import BEiTv2Config
from objectives.registry import register


def masked_targets(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Codes (B, N) of the masked positions (mask (B, N) bool), in row-major order: (M,)."""
    return codes[mask]


# One crop and a block-wise mask, drawn in the loader workers.
@register("beitv2", BEiTv2Config, mask="block")
class BEiTv2(Objective):
    """Mask-token MIM on tokenizer codes with BEiT v2's patch-aggregation branch."""

    def __init__(self, cfg: BEiTv2Config, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        tokenizer: VQTokenizer | None = self.context.inputs.get("tokenizer")
        if tokenizer is None:
            tokenizer = load_tokenizer(
                cfg.tokenizer,
                tracking_uri=self.context.tracking_uri or None,
                input_mean=self.context.input_mean,
                input_std=self.context.input_std,
            )
        if tokenizer.grid_size != backbone.grid_size:
            raise ValueError(
                f"objective.tokenizer {tokenizer.source}: its patch grid {tokenizer.grid_size} differs from the "
                f"encoder's {backbone.grid_size}; train the tokenizer with the same model.img_size/patch_size"
            )
        self.attach_frozen("tokenizer", tokenizer)
        self.early_layers = aggregation_layer(cfg.early_layers, backbone.depth)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        self.aggregation_blocks = aggregation_blocks(backbone, cfg.head_layers)
        # One LM head for both branches (--shared_lm_head True), over the tokenizer's vocabulary.
        self.lm_head = nn.Linear(backbone.embed_dim, tokenizer.num_codes)
        beit_init(self.mask_token, [self.lm_head, *self.aggregation_blocks.modules()])

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The tokenizer's codes of the uncorrupted images: (B, N) long."""
        return self.frozen_modules()["tokenizer"](images)

    def logits(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LM-head logits at the masked positions (M, V): from the final layer and from the aggregation branch."""
        final, x = encode_with_aggregation(
            self.backbone, images, mask, self.mask_token, self.early_layers, self.aggregation_blocks
        )
        aggregated = self.backbone.vit.norm(x)[:, 1:][mask]  # the shared final norm: (M, D)
        return self.lm_head(final[mask]), self.lm_head(aggregated)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        images = batch["views"][0]
        mask = self.batch_mask(batch)  # (B, N)
        labels = masked_targets(self.targets(images), mask)  # (M,)
        final_logits, agg_logits = self.logits(images, mask)
        mim = F.cross_entropy(final_logits.float(), labels)
        agg = F.cross_entropy(agg_logits.float(), labels)
        loss = mim + self.cfg.aggregation_weight * agg
        with torch.no_grad():
            metrics = {
                "beitv2/mim_loss": mim.detach(),
                "beitv2/agg_loss": agg.detach(),
                "beitv2/mim_acc": (final_logits.argmax(-1) == labels).float().mean(),
                "beitv2/agg_acc": (agg_logits.argmax(-1) == labels).float().mean(),
                "beitv2/mask_ratio": mask.float().mean(),
                # Distinct target codes in this batch, as a fraction of the vocabulary.
                "beitv2/target_codes": torch.unique(labels).numel() / torch.tensor(float(self.lm_head.out_features)),
            }
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`token_ids`: per image, original | the tokenizer's code per patch | the predicted code at masked patches.

        In the third panel the unmasked patches, which the model does not predict, are
        EMPTY_COLOUR (neutral grey); the codes come from the final-layer LM head.
        """
        images = batch["views"][0][:MAX_IMAGES]  # (B, 3, H, W)
        mask = self.batch_mask(batch)[:MAX_IMAGES]  # (B, N)
        codes = self.targets(images)  # (B, N), the frozen tokenizer
        with gathered_outside_forward(self):
            final_logits, _ = self.logits(images, mask)  # (M, V); the aggregation branch runs too (ZeRO-3 order)
        predicted = torch.full_like(codes, -1)
        predicted[mask] = final_logits.float().argmax(-1)
        gh, gw = self.backbone.grid_size
        patch, vocab = self.backbone.patch_size, self.lm_head.out_features
        original = to_uint8_images(images, self.context.input_mean, self.context.input_std)
        codes_np, predicted_np = codes.view(-1, gh, gw).cpu().numpy(), predicted.view(-1, gh, gw).cpu().numpy()
        rows = [
            [original[i], id_map(codes_np[i], vocab, patch), id_map(predicted_np[i], vocab, patch)]
            for i in range(original.shape[0])
        ]
        return {"token_ids": grid(rows, scale=display_scale(images.shape[-1]))}
