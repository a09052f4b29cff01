"""Config dataclasses of the objectives (the `objective` config group).

They live in one torch-free module so that `pretrain.run` can validate a config
in well under a second, before torch, Ray or MLflow are imported. Each objective's
module (`objectives/<name>.py`) imports its dataclass from here. Defaults reproduce
the paper's recipe at paper scale; CPU presets live in `pretrain/conf/preset/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


# Where a teacher's weights come from (see objectives/teacher.py).
TEACHER_SCHEMES = ("timm:", "models:/", "runs:/")
TEACHER_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
TEACHER_NORMALIZE = ("none", "layer_norm")


@dataclass
class TeacherConfig:
    """A frozen network whose features are the targets of VQ-KD, MaskDistill and SemAIM*.

    Loaded by `objectives.teacher.load_teacher`; objectives hold one as a field
    (`objective.teacher`) and validate it with `problems("objective.teacher")`.
    """

    # "timm:<name>" (timm pretrained weights, needs the network), an MLflow model URI
    # ("models:/<name>@<alias>", "models:/<name>/<version>", "runs:/<run_id>/<path>"), or a
    # local file (.safetensors, .pt, .pth) or directory in the `save_teacher` layout.
    # Default: the CLIP ViT-B/16 teacher of BEiT v2 (Sec. 2.1; unilm beit2 TOKENIZER.md)
    # and MaskDistill ("A Unified View of Masked Image Modeling", Sec. 4).
    source: str = "timm:vit_base_patch16_clip_224.openai"
    # timm architecture; needed when the weights file has no sibling teacher.json.
    arch: str = ""
    # Extra `timm.create_model` kwargs (img_size, patch_size, embed_dim, depth, num_heads, ...).
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # Which features: -1 = final tokens after the last norm; k >= 0 = output of block k (0-based).
    layer: int = -1
    # "none" | "layer_norm": LayerNorm without affine over D, the MaskDistill target.
    normalize: str = "none"
    # Also return the teacher's CLS feature (SemAIM* orders patches by CLS-patch similarity).
    return_cls: bool = False
    # Apply the model's head to every final token: BEiT v2's CLIP teacher regresses
    # `encode_image(x, return_all_tokens=True) @ visual.proj` (unilm beit2 modeling_vqkd.py).
    project: bool = False

    def problems(self, prefix: str = "objective.teacher") -> list[tuple[str, str]]:
        """Checks that need no torch: (key, problem) pairs; empty when valid."""
        found = []
        src = self.source
        if not (src.startswith(TEACHER_SCHEMES) or src.endswith(TEACHER_FILE_SUFFIXES) or "://" not in src):
            found.append(
                (
                    f"{prefix}.source",
                    f"unknown scheme in {src!r}; use timm:<name>, models:/<name>@<alias>, runs:/<id>/<path>, "
                    f"or a local {'/'.join(TEACHER_FILE_SUFFIXES)} file or directory",
                )
            )
        if src.startswith("timm:") and not src.removeprefix("timm:"):
            found.append((f"{prefix}.source", "timm: needs a model name, e.g. timm:vit_base_patch16_clip_224.openai"))
        if self.layer < -1:
            found.append((f"{prefix}.layer", f"must be -1 (final, normed) or a block index >= 0, got {self.layer}"))
        if self.normalize not in TEACHER_NORMALIZE:
            found.append((f"{prefix}.normalize", f"must be one of {TEACHER_NORMALIZE}, got {self.normalize!r}"))
        if self.project and self.layer != -1:
            found.append(
                (f"{prefix}.project", f"the head applies to final tokens only (layer=-1), got layer={self.layer}")
            )
        return found


# VQ-KD: the visual tokenizer of BEiT v2 (Peng et al., 2022, Sec. 2.2), trained by
# distilling a teacher's patch features through a quantised bottleneck. Values from
# microsoft/unilm beit2 (modeling_vqkd.py, norm_ema_quantizer.py, TOKENIZER.md).
@dataclass
class VQKDConfig(ObjectiveConfig):
    """VQ-KD tokenizer training: encoder -> 32-d codes -> decoder regressing teacher features."""

    name: str = "vqkd"
    # Whose features the decoder regresses (paper: CLIP ViT-B/16, projected).
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(project=True))
    # Codebook: 8192 codes of 32 dims, l2-normalised, EMA decay 0.99, k-means init.
    num_codes: int = 8192
    code_dim: int = 32
    decay: float = 0.99
    kmeans_init: bool = True
    # Re-seed codes unused for `dead_code_window` steps (a remedy for low usage on small data).
    restart_dead_codes: bool = False
    dead_code_window: int = 100
    # Decoder: 3 ViT blocks of width 768 and 12 heads (vqkd_encoder_base_decoder_3x768x12).
    decoder_embed_dim: int = 768
    decoder_depth: int = 3
    decoder_num_heads: int = 12
    # loss = (1 - cosine) reconstruction + commit_weight * MSE(sg[z_q], z) (beta = 1.0).
    commit_weight: float = 1.0
    # Registry name of the exported tokenizer; "" = "vqkd-<teacher name>". Each run adds a
    # version; objective.tokenizer=models:/<name>/latest loads the newest.
    registered_name: str = ""

    def problems(self) -> list[tuple[str, str]]:
        found = self.teacher.problems("objective.teacher")
        for key in ("num_codes", "code_dim", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            if getattr(self, key) < 1:
                found.append((f"objective.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if not 0.0 < self.decay < 1.0:
            found.append(("objective.decay", f"must be in (0, 1), got {self.decay}"))
        if self.decoder_embed_dim >= 1 and self.decoder_num_heads >= 1:
            if self.decoder_embed_dim % self.decoder_num_heads:
                found.append(("objective.decoder_num_heads", f"must divide decoder_embed_dim={self.decoder_embed_dim}"))
        if self.commit_weight < 0:
            found.append(("objective.commit_weight", f"must be >= 0, got {self.commit_weight}"))
        return found


# BEiT v2 MIM stage (Peng et al., 2022, Sec. 2.3): predict the VQ-KD codes of masked patches.
# Values from microsoft/unilm beit2 (PRETRAINING.md ViT-B/16 300-epoch recipe,
# modeling_pretrain.py, masking_generator.py, run_beitv2_pretraining.py).
@dataclass
class BEiTv2Config(ObjectiveConfig):
    """BEiT v2: mask-token corruption, CE on the frozen tokenizer's codes, plus the patch-aggregation CE."""

    name: str = "beitv2"
    # The frozen VQ-KD tokenizer: models:/<name>/latest (or /<version>, @<alias>),
    # runs:/<run_id>/tokenizer, or a local export/tokenizer directory. Required.
    tokenizer: str = ""
    # Block-wise mask of exactly 75 of 196 patches (--num_mask_patches 75); the same
    # fraction on other grids (round(N * ratio) patches).
    mask_ratio: float = 0.3827
    # Patch aggregation: final CLS + the output of block `early_layers` (1-based) -> `head_layers`
    # blocks -> the shared final norm and LM head (--early_layers 9 --head_layers 2
    # --shared_lm_head True for ViT-B; 21 for ViT-L). null = max(1, depth - 3): 9 of 12, 21 of 24.
    early_layers: int | None = None
    head_layers: int = 2
    # Weight of the aggregation branch's CE; the paper's loss is the plain sum (1.0).
    aggregation_weight: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if not self.tokenizer:
            found.append(
                (
                    "objective.tokenizer",
                    "required: a VQ-KD tokenizer (models:/<name>/latest, runs:/<run_id>/tokenizer or a directory); "
                    "train one with `python -m pretrain.run objective=vqkd objective.teacher.source=<teacher>` "
                    "and pass objective.tokenizer=models:/vqkd-<teacher>/latest",
                )
            )
        elif "://" in self.tokenizer and not self.tokenizer.startswith(("models:/", "runs:/")):
            found.append(("objective.tokenizer", f"use models:/..., runs:/... or a local path, got {self.tokenizer!r}"))
        if not 0.0 < self.mask_ratio < 1.0:
            found.append(("objective.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}"))
        if self.early_layers is not None and self.early_layers < 1:
            found.append(
                ("objective.early_layers", f"must be >= 1 (a 1-based block count) or null, got {self.early_layers}")
            )
        if self.head_layers < 0:
            found.append(("objective.head_layers", f"must be >= 0, got {self.head_layers}"))
        if self.aggregation_weight < 0:
            found.append(("objective.aggregation_weight", f"must be >= 0, got {self.aggregation_weight}"))
        return found


# MaskDistill: "A Unified View of Masked Image Modeling" (Peng et al., 2022, arXiv 2210.10615).
# The official code (microsoft/unilm unimim/) was never released (unimim/README.md; unilm issues
# #1084, #1579), so values the paper's text does not give come from the public reimplementations
# drkostas/MaskDistill-PyTorch (configs/pretrain.yaml, which reports reproducing the paper's ViT-B
# numbers) and bwconrad/masked-distillation; each field says which.
MASKDISTILL_LOSSES = ("smooth_l1", "mse")


@dataclass
class MaskDistillConfig(ObjectiveConfig):
    """MaskDistill: regress LayerNorm-ed frozen-teacher patch features at block-masked positions."""

    name: str = "maskdistill"
    # Teacher for ViT-B: CLIP ViT-B/16 (drkostas configs/pretrain.yaml teacher "ViT-B/16", loaded
    # with OpenAI's clip). Which output is not in the paper text available here; both
    # reimplementations regress the unprojected 768-d output of the last
    # transformer block, before CLIP's ln_post, patch tokens only: layer=11 (last of 12 blocks,
    # pre-norm), project=False. Another teacher needs layer = its depth - 1. Target
    # normalisation: LayerNorm without affine ("normalized semantic features", abstract).
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(layer=11, normalize="layer_norm"))
    # Block-wise (BEiT) masking of 40% of the patches (drkostas configs/pretrain.yaml mask_ratio 0.40,
    # mask_type block; bwconrad README --data.mask_ratio 0.4). Exact count: round(196 * 0.4) = 78.
    mask_ratio: float = 0.4
    # "smooth_l1" (both reimplementations; the paper's Table 1 lists each method's loss, its
    # MaskDistill row could not be read here) or "mse".
    loss: str = "smooth_l1"
    # Smooth-l1 transition point. Not found in the paper text available here; 1.0 is PyTorch's
    # default and drkostas' reproducing config (bwconrad uses 2.0).
    smooth_l1_beta: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        found = self.teacher.problems("objective.teacher")
        if not 0.0 < self.mask_ratio < 1.0:
            found.append(("objective.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}"))
        if self.loss not in MASKDISTILL_LOSSES:
            found.append(("objective.loss", f"must be one of {MASKDISTILL_LOSSES}, got {self.loss!r}"))
        if not self.smooth_l1_beta > 0:
            found.append(("objective.smooth_l1_beta", f"must be > 0, got {self.smooth_l1_beta}"))
        return found


# === contrastive: simclr, mocov3 ===
# === end contrastive ===


# === ccvit ===
# === end ccvit ===


# === semaim ===
# === end semaim ===
