"""Config dataclasses of the objectives (the `objective` config group).

They live in one torch-free module so that `pretrain.run` can validate a config
in well under a second, before torch, Ray or MLflow are imported. Each objective's
module (`objectives/<name>.py`) imports its dataclass from here. Defaults reproduce
the paper's recipe at paper scale; CPU presets live in `pretrain/conf/preset/`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ObjectiveConfig:
    """Fields every objective has."""

    # Registry name; set by the group's YAML (`objective=<name>`).
    name: str = "???"

    def problems(self) -> list[tuple[str, str]]:
        """Checks that need no torch: (key, problem) pairs; empty when valid."""
        return []


@dataclass
class MAEConfig(ObjectiveConfig):
    """MAE (He et al., 2022). Defaults: facebookresearch/mae models_mae.py, PRETRAIN.md."""

    name: str = "mae"
    # Fraction of patches removed per sample (paper Sec. 3, Fig. 5: 75%).
    mask_ratio: float = 0.75
    # Decoder: 8 blocks, width 512, 16 heads (mae_vit_base_patch16_dec512d8b).
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    # Loss on per-patch normalised pixels (PRETRAIN.md: --norm_pix_loss).
    norm_pix_loss: bool = True

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if not 0.0 < self.mask_ratio < 1.0:
            found.append(("objective.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}"))
        for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            if getattr(self, key) < 1:
                found.append((f"objective.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.decoder_num_heads >= 1 and self.decoder_embed_dim % self.decoder_num_heads:
            found.append(
                (
                    "objective.decoder_num_heads",
                    f"{self.decoder_num_heads} does not divide decoder_embed_dim={self.decoder_embed_dim}",
                )
            )
        return found
