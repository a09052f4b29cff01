"""Config dataclasses of the objectives (the `objective` config group).

They live in one torch-free module so that `pretrain.run` can validate a config
in well under a second, before torch, Ray or MLflow are imported. Each objective's
module (`objectives/<name>.py`) imports its dataclass from here. Defaults reproduce
the paper's recipe at paper scale; CPU presets live in `pretrain/conf/preset/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# An input left to `stage:<objective>` is produced by that objective's stage: the run
# resolves it from the model registry or trains the stage first (pretrain/pipeline.py).
STAGE_PREFIX = "stage:"


def stage_of(value: str) -> str:
    """The producing stage named by `stage:<objective>`, else ""."""
    return value.removeprefix(STAGE_PREFIX) if value.startswith(STAGE_PREFIX) else ""


@dataclass(frozen=True)
class StageInput:
    """What an objective consumes from an earlier stage.

    role: "teacher" | "tokenizer" | "centroids"; key: the config key holding it
    (e.g. "objective.tokenizer"); kind: the artifact kind it must be (objectives.artifacts);
    value: the key's value (a URI, a path, or `stage:<objective>` to be resolved).
    """

    role: str
    key: str
    kind: str
    value: str


@dataclass
class ObjectiveConfig:
    """Fields every objective has."""

    # Registry name; set by the group's YAML (`objective=<name>`).
    name: str = "???"
    # Backbone families (pretrain.config.FAMILIES) the objective runs on: a ViT's patch tokens
    # for masking and per-patch targets by default; ("any",) when it uses only the pooled
    # feature of an image, which every timm model gives (pretrain.config.backbone_problems).
    families: ClassVar[tuple[str, ...]] = ("vit",)
    # How a ViT encoder trained by it is read for evaluation (recorded by the export; eval.features
    # auto follows it): "cls" token, or "mean" of the patch tokens for objectives that train no CLS.
    features: ClassVar[str] = "cls"

    def problems(self) -> list[tuple[str, str]]:
        """Checks that need no torch: (key, problem) pairs; empty when valid."""
        return []

    def inputs(self) -> list[StageInput]:
        """What this run consumes from earlier stages (a teacher, a tokenizer, centroids)."""
        found = []
        if getattr(self, "tokenizer", ""):
            found.append(StageInput("tokenizer", "objective.tokenizer", "tokenizer", self.tokenizer))
        teacher = getattr(self, "teacher", None)
        if teacher is not None and teacher.source:
            found.append(StageInput("teacher", "objective.teacher.source", "encoder", teacher.source))
        return found

    def outputs(self) -> tuple[str, ...]:
        """Artifact kinds a run of this objective exports for later stages."""
        return ("encoder",)

    def backbone_problems(self, family: str) -> list[tuple[str, str]]:
        """Settings that fit only some backbone families (family: pretrain.config.model_family)."""
        return []

    def upstream(self) -> dict[str, str]:
        """Models of earlier stages this run uses ({"tokenizer": uri, "teacher": source}): lineage of its export."""
        return {i.role: i.value for i in self.inputs()}


def decoder_problems(cfg: Any) -> list[tuple[str, str]]:
    """A transformer decoder's sizes (MAE, CrossMAE): decoder_embed_dim/depth/num_heads >= 1, the heads divide the width."""
    found = [
        (f"objective.{key}", f"must be >= 1, got {getattr(cfg, key)}")
        for key in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
        if getattr(cfg, key) < 1
    ]
    if cfg.decoder_num_heads >= 1 and cfg.decoder_embed_dim % cfg.decoder_num_heads:
        found.append(
            (
                "objective.decoder_num_heads",
                f"{cfg.decoder_num_heads} does not divide decoder_embed_dim={cfg.decoder_embed_dim}",
            )
        )
    return found


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
        return found + decoder_problems(self)


# Where a teacher's weights come from (see objectives/components/teacher.py).
TEACHER_SCHEMES = ("timm:", "models:/", "runs:/")
TEACHER_FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
TEACHER_NORMALIZE = ("none", "layer_norm")


@dataclass
class SimMIMConfig(ObjectiveConfig):
    """SimMIM (Xie et al., CVPR 2022). Defaults: microsoft/SimMIM models/simmim.py, data/data_simmim.py,
    configs/*/simmim_pretrain__*.yaml."""

    # A mask token replaces the embedding of every masked patch at the input; the encoder sees
    # every position: a ViT or a Swin (its feature map).
    families: ClassVar[tuple[str, ...]] = ("vit", "swin")

    name: str = "simmim"
    # Random masking of square groups of mask_patch_size px (32 px over 16-px ViT or 4-px Swin
    # patches), ceil(groups x mask_ratio) groups per image (MaskGenerator: MASK_PATCH_SIZE 32,
    # MASK_RATIO 0.6).
    mask_ratio: float = 0.6
    mask_patch_size: int = 32

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if not 0.0 < self.mask_ratio < 1.0:
            found.append(("objective.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}"))
        if self.mask_patch_size < 1:
            found.append(("objective.mask_patch_size", f"must be >= 1, got {self.mask_patch_size}"))
        return found


@dataclass
class FCMAEConfig(ObjectiveConfig):
    """FCMAE (Woo et al., CVPR 2023, ConvNeXt V2). Defaults: facebookresearch/ConvNeXt-V2 models/fcmae.py,
    main_pretrain.py, TRAINING.md."""

    # A fully convolutional encoder with dense masking: ConvNeXt (the paper's: ConvNeXt V2, with GRN).
    families: ClassVar[tuple[str, ...]] = ("convnext",)

    name: str = "fcmae"
    # Fraction of the 32 x 32 px regions (one per position of the encoder's final map) masked
    # per image (--mask_ratio 0.6; gen_random_mask: L - int(L x 0.4) of L regions).
    mask_ratio: float = 0.6
    # One ConvNeXt V2 block of width 512 (--decoder_depth 1 --decoder_embed_dim 512).
    decoder_embed_dim: int = 512
    decoder_depth: int = 1
    # MSE on per-patch normalised pixels of the masked regions (--norm_pix_loss, on by default).
    norm_pix_loss: bool = True

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if not 0.0 < self.mask_ratio < 1.0:
            found.append(("objective.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}"))
        for key in ("decoder_embed_dim", "decoder_depth"):
            if getattr(self, key) < 1:
                found.append((f"objective.{key}", f"must be >= 1, got {getattr(self, key)}"))
        return found


@dataclass
class TeacherConfig:
    """A frozen network (a timm ViT, or a ResNet/ConvNeXt/Swin feature map) whose features are the
    targets of VQ-KD, MaskDistill and SemAIM*.

    Loaded by `objectives.components.teacher.load_teacher`; objectives hold one as a field
    (`objective.teacher`) and validate it with `problems("objective.teacher")`.
    """

    # "timm:<name>" (timm pretrained weights, needs the network), an MLflow model URI
    # ("models:/<name>@<alias>", "models:/<name>/<version>", "runs:/<run_id>/<path>"), or a
    # local file (.safetensors, .pt, .pth) or an encoder artifact directory (objectives.artifacts).
    # Default: the CLIP ViT-B/16 teacher of BEiT v2 (Sec. 2.1; unilm beit2 TOKENIZER.md)
    # and MaskDistill ("A Unified View of Masked Image Modeling", Sec. 4).
    source: str = "timm:vit_base_patch16_clip_224.openai"
    # timm architecture; needed for a bare weights file (no pretrain.json beside it).
    arch: str = ""
    # Extra `timm.create_model` kwargs (img_size, patch_size, embed_dim, depth, num_heads, ...).
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # Which features: -1 = final tokens after the last norm; k >= 0 = output of block k (0-based).
    # A ResNet/ConvNeXt/Swin teacher gives feature map k (timm feature_info order), its cells as
    # patches: pick the one whose stride is the encoder's patch size (16: 3 on a ResNet, 2 on the others).
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

    def outputs(self) -> tuple[str, ...]:
        return ("encoder", "tokenizer")

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


TOKENIZER_REQUIRED = (
    "required: a VQ-KD tokenizer (models:/<name>/latest, runs:/<run_id>/tokenizer or a directory), or "
    "stage:vqkd to take it from the registry or train it first; or train one with `python -m pretrain.run "
    "objective=vqkd` and pass objective.tokenizer=models:/vqkd-<teacher>/latest"
)


# BEiT v2 MIM stage (Peng et al., 2022, Sec. 2.3): predict the VQ-KD codes of masked patches.
# Values from microsoft/unilm beit2 (PRETRAINING.md ViT-B/16 300-epoch recipe,
# modeling_pretrain.py, masking_generator.py, run_beitv2_pretraining.py).
@dataclass
class BEiTv2Config(ObjectiveConfig):
    """BEiT v2: mask-token corruption, CE on the frozen tokenizer's codes, plus the patch-aggregation CE."""

    name: str = "beitv2"
    # The frozen VQ-KD tokenizer: models:/<name>/latest (or /<version>, @<alias>),
    # runs:/<run_id>/tokenizer, a local export/tokenizer directory, or stage:vqkd (the newest
    # compatible registered tokenizer, else one trained first by a vqkd stage). Required.
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
            found.append(("objective.tokenizer", TOKENIZER_REQUIRED))
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


@dataclass
class ViewAugmentConfig:
    """Photometric augmentation of one view, applied per sample in torch (objectives/components/augment.py).

    The data pipeline already crops (RandomResizedCrop, data.crop_scale_min) and flips. Defaults:
    BYOL's recipe as in moco-v3 main_moco.py `augmentation1` (ColorJitter(0.4, 0.4, 0.2, 0.1) with
    p=0.8, grayscale p=0.2, blur p=1.0, no solarisation).
    """

    # Colour jitter, applied with probability jitter_prob, its four ops in a random order (torchvision
    # ColorJitter): factors uniform in [1 - x, 1 + x] (brightness, contrast, saturation), hue shift in [-hue, hue].
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    # Gaussian blur, sigma uniform in blur_sigma pixels of a 224-px image, scaled with the image side
    # (moco-v3 moco/loader.py GaussianBlur([.1, 2.]); SimCLR data_util.py sigma in [0.1, 2.0]).
    blur_prob: float = 1.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # Solarisation (x >= 0.5 -> 1 - x; BYOL, moco-v3 moco/loader.py Solarize).
    solarize_prob: float = 0.0

    def problems(self, prefix: str) -> list[tuple[str, str]]:
        """Checks that need no torch: (key, problem) pairs; empty when valid."""
        found = []
        for key in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                found.append((f"{prefix}.{key}", f"a probability in [0, 1], got {value}"))
        for key in ("brightness", "contrast", "saturation"):
            value = getattr(self, key)
            if value < 0:
                found.append((f"{prefix}.{key}", f"must be >= 0, got {value}"))
        if not 0.0 <= self.hue <= 0.5:
            found.append((f"{prefix}.hue", f"must be in [0, 0.5], got {self.hue}"))
        sigma = list(self.blur_sigma)
        if len(sigma) != 2 or not 0 < sigma[0] <= sigma[1]:
            found.append((f"{prefix}.blur_sigma", f"need [low, high] with 0 < low <= high, got {sigma}"))
        return found


# CrossMAE: Fu, Lian, Wang, et al., "Rethinking Patch Dependence for Masked Autoencoders" (2024);
# TonyLianLong/CrossMAE (models_cross.py, transformer_utils.py, main_pretrain.py).
@dataclass
class CrossMAEConfig(ObjectiveConfig):
    """CrossMAE: MAE's encoder; a decoder of cross-attention only, from mask queries to the visible
    tokens, reconstructing a subset of the masked patches, each block reading its own learned mix of
    the encoder's block outputs."""

    name: str = "crossmae"
    # Patches removed per sample (--mask_ratio 0.75) and patches reconstructed (--kept_mask_ratio
    # 0.25 of all patches: a third of the masked ones), both fractions of N.
    mask_ratio: float = 0.75
    prediction_ratio: float = 0.25
    # Decoder: 8 cross-attention blocks of width 512, 16 heads (as MAE's decoder; models_cross.py).
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    # Feature weighting (--weight_fm): decoder block j reads LN_j(sum_i w_ji h_i) over the encoder's
    # block outputs h_i; false: every block reads the encoder's final normed tokens.
    weight_fm: bool = True
    norm_pix_loss: bool = True

    def problems(self) -> list[tuple[str, str]]:
        found = []
        for key in ("mask_ratio", "prediction_ratio"):
            if not 0.0 < getattr(self, key) < 1.0:
                found.append((f"objective.{key}", f"must be in (0, 1), got {getattr(self, key)}"))
        if 0.0 < self.prediction_ratio < 1.0 and self.prediction_ratio > self.mask_ratio:
            found.append(
                (
                    "objective.prediction_ratio",
                    f"{self.prediction_ratio} exceeds mask_ratio={self.mask_ratio}: only masked patches are reconstructed",
                )
            )
        return found + decoder_problems(self)


# DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021);
# facebookresearch/dino (main_dino.py argparse defaults, DINOHead in vision_transformer.py,
# DataAugmentationDINO, DINOLoss). KoLeo: Oquab et al., DINOv2 (2023), dinov2/loss/koleo_loss.py.
@dataclass
class DINOConfig(ObjectiveConfig):
    """DINO: a student on 2 global + several local crops matches an EMA teacher's centred, sharpened
    distribution over `out_dim` prototypes of the global crops (cross-entropy, no labels)."""

    name: str = "dino"
    # Projection head (DINOHead): 3-layer MLP (GELU, hidden 2048) to a 256-d bottleneck, l2-normalised,
    # then a weight-normalised linear layer of norm 1 (norm_last_layer=True) to out_dim prototypes.
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_layers: int = 3
    # Multi-crop: 2 global crops (area data.crop_scale_min..1: --global_crops_scale 0.4 1) and
    # --local_crops_number 8 local crops of 96 px from --local_crops_scale 0.05 0.4 of the area.
    local_views: int = 8
    local_size: int = 96
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # Temperatures: student 0.1; teacher linear from warmup_teacher_temp to teacher_temp over
    # warmup_teacher_temp_fraction of the run (--warmup_teacher_temp 0.04 --teacher_temp 0.04
    # --warmup_teacher_temp_epochs 0 by default; the README's longer runs warm 0.04 -> 0.07).
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_fraction: float = 0.0
    # Centre of the teacher's outputs: EMA of the batch mean over all ranks (--center_momentum 0.9).
    center_momentum: float = 0.9
    # Teacher = EMA of student backbone + head, momentum from 0.996 to 1 with a half cosine (--momentum_teacher).
    momentum_teacher: float = 0.996
    total_steps: int = 0
    # The last layer gets no gradient for this fraction of the run (--freeze_last_layer 1 of 100 epochs).
    freeze_last_layer_fraction: float = 0.01
    # DINOv2's KoLeo regulariser on the student's global-crop CLS features (0 = off; DINOv2: 0.1).
    koleo_weight: float = 0.0
    # Photometric views (DataAugmentationDINO): colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8 and grayscale 0.2
    # everywhere; global 1: blur p=1.0; global 2: blur p=0.1 + solarise p=0.2; local crops: blur p=0.5.
    global1: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)
    global2: ViewAugmentConfig = field(default_factory=lambda: ViewAugmentConfig(blur_prob=0.1, solarize_prob=0.2))
    local: ViewAugmentConfig = field(default_factory=lambda: ViewAugmentConfig(blur_prob=0.5))

    def problems(self) -> list[tuple[str, str]]:
        found = []
        for key in ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "head_layers", "local_size"):
            if getattr(self, key) < 1:
                found.append((f"objective.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.local_views < 0:
            found.append(("objective.local_views", f"must be >= 0, got {self.local_views}"))
        scale = list(self.local_scale)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            found.append(("objective.local_scale", f"need [low, high] with 0 < low <= high <= 1, got {scale}"))
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if not getattr(self, key) > 0:
                found.append((f"objective.{key}", f"must be > 0, got {getattr(self, key)}"))
        for key in ("warmup_teacher_temp_fraction", "freeze_last_layer_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                found.append((f"objective.{key}", f"must be in [0, 1), got {getattr(self, key)}"))
        for key in ("center_momentum", "momentum_teacher"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                found.append((f"objective.{key}", f"must be in [0, 1], got {getattr(self, key)}"))
        if self.koleo_weight < 0:
            found.append(("objective.koleo_weight", f"must be >= 0, got {self.koleo_weight}"))
        if self.total_steps < 0:
            found.append(("objective.total_steps", f"must be >= 0, got {self.total_steps}"))
        for key in ("global1", "global2", "local"):
            found += getattr(self, key).problems(f"objective.{key}")
        return found


# iBOT: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022);
# bytedance/ibot (main_ibot.py argparse defaults, models/head.py iBOTHead, loader.py ImageFolderMask).
@dataclass
class IBOTConfig(DINOConfig):
    """iBOT: DINO's [CLS] self-distillation plus masked-patch self-distillation: the student sees its
    global crops block-masked and matches the teacher's patch distributions at the masked positions."""

    name: str = "ibot"
    # --out_dim 8192 --patch_out_dim 8192: the [CLS] and the patch prototypes.
    out_dim: int = 8192
    patch_out_dim: int = 8192
    # One head MLP; shared_head true: one last layer for [CLS] and patches (--shared_head; the
    # official default keeps a second last layer for patches in the student, false here too).
    shared_head: bool = False
    # Block-wise masks of the global crops (--pred_shape block --pred_ratio 0.3), one per crop.
    pred_ratio: float = 0.3
    # Patch temperatures: teacher linear from 0.04 to 0.07 over the teacher-temperature warmup
    # (--warmup_teacher_patch_temp 0.04 --teacher_patch_temp 0.07), student as for [CLS].
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    # Loss weights (--lambda1 1.0 [CLS], --lambda2 1.0 patches).
    lambda1: float = 1.0
    lambda2: float = 1.0
    local_views: int = 0  # --local_crops_number 0 by default (the ViT-S recipe: 10)
    warmup_teacher_temp_fraction: float = 0.3  # --warmup_teacher_temp_epochs 30 of --epochs 100

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        if self.patch_out_dim < 1:
            found.append(("objective.patch_out_dim", f"must be >= 1, got {self.patch_out_dim}"))
        if self.shared_head and self.patch_out_dim != self.out_dim:
            found.append(
                (
                    "objective.shared_head",
                    f"needs patch_out_dim == out_dim, got {self.patch_out_dim} and {self.out_dim}",
                )
            )
        if not 0.0 < self.pred_ratio < 1.0:
            found.append(("objective.pred_ratio", f"must be in (0, 1), got {self.pred_ratio}"))
        for key in ("teacher_patch_temp", "warmup_teacher_patch_temp"):
            if not getattr(self, key) > 0:
                found.append((f"objective.{key}", f"must be > 0, got {getattr(self, key)}"))
        for key in ("lambda1", "lambda2"):
            if getattr(self, key) < 0:
                found.append((f"objective.{key}", f"must be >= 0, got {getattr(self, key)}"))
        return found


# I-JEPA: Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
# Architecture" (CVPR 2023); facebookresearch/ijepa (configs/in1k_vith14_ep300.yaml, src/train.py,
# src/models/vision_transformer.py, src/masks/multiblock.py).
@dataclass
class IJEPAConfig(ObjectiveConfig):
    """I-JEPA: a context encoder on one large block, a narrow ViT predictor regressing the EMA target
    encoder's (layer-normed) features of several target blocks; no pixels, no augmentation but crops."""

    # The encoder trains no CLS token: its representation is the mean of the patch tokens
    # (the paper's linear probes pool the last layer's patch features).
    features: ClassVar[str] = "mean"

    name: str = "ijepa"
    # Multi-block masks (mask: num_pred_masks 4, pred_mask_scale [0.15, 0.2], aspect_ratio [0.75, 1.5],
    # num_enc_masks 1, enc_mask_scale [0.85, 1.0], allow_overlap false, min_keep 10 at 14 x 14),
    # drawn per sample in the loader workers (data.masks.multiblock_mask).
    num_targets: int = 4
    # Predictor: a narrow ViT (meta: pred_depth 12, pred_emb_dim 384), as many heads as the encoder
    # (0 = the encoder's; VisionTransformerPredictor num_heads=encoder.num_heads), fixed 2-D sin-cos positions.
    predictor_embed_dim: int = 384
    predictor_depth: int = 12
    predictor_num_heads: int = 0
    # Target encoder: EMA of the context encoder, momentum linear from 0.996 to 1.0 over the run
    # (optimization: ema [0.996, 1.0]; train.py momentum_scheduler). total_steps 0 = trainer.max_steps.
    ema_momentum: float = 0.996
    ema_momentum_end: float = 1.0
    total_steps: int = 0
    # Loss between predictions and the target encoder's final tokens after a LayerNorm without
    # affine: smooth L1 (train.py loss_fn: F.smooth_l1_loss; the paper's text says L2) or "mse".
    loss: str = "smooth_l1"

    def problems(self) -> list[tuple[str, str]]:
        found = []
        for key in ("num_targets", "predictor_embed_dim", "predictor_depth"):
            if getattr(self, key) < 1:
                found.append((f"objective.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.predictor_num_heads < 0:
            found.append(
                ("objective.predictor_num_heads", f"must be >= 0 (0 = the encoder's), got {self.predictor_num_heads}")
            )
        elif self.predictor_num_heads and self.predictor_embed_dim % self.predictor_num_heads:
            found.append(
                (
                    "objective.predictor_num_heads",
                    f"{self.predictor_num_heads} does not divide predictor_embed_dim={self.predictor_embed_dim}",
                )
            )
        if not 0.0 <= self.ema_momentum <= self.ema_momentum_end <= 1.0:
            found.append(
                (
                    "objective.ema_momentum",
                    f"need 0 <= ema_momentum <= ema_momentum_end <= 1, got {self.ema_momentum}, {self.ema_momentum_end}",
                )
            )
        if self.total_steps < 0:
            found.append(("objective.total_steps", f"must be >= 0, got {self.total_steps}"))
        if self.loss not in ("smooth_l1", "mse"):
            found.append(("objective.loss", f"must be smooth_l1 or mse, got {self.loss!r}"))
        return found


# FlexPredict: Bar et al., "Stochastic positional embeddings improve masked image modeling"
# (ICML 2024; first titled "Predicting masked tokens in stochastic locations improves masked image
# modeling"). I-JEPA with noised target positions in the predictor.
@dataclass
class FlexPredictConfig(IJEPAConfig):
    """FlexPredict: I-JEPA whose predictor gets each target's position embedding plus A n, n ~ N(0, sigma^2 I),
    with A the predictor's own input projection (so the noise cannot be scaled away without also
    shrinking the context)."""

    name: str = "flexpredict"
    # sigma of the position noise (the paper's default 0.25).
    position_noise: float = 0.25

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        if self.position_noise < 0:
            found.append(("objective.position_noise", f"must be >= 0, got {self.position_noise}"))
        return found


# DMT-JEPA: Mo, Yun, "DMT-JEPA: Discriminative Masked Targets for Joint-Embedding Predictive
# Architecture" (2024); DMTJEPA/DMTJEPA (configs/in1k_vitb16_ep600.yaml, src/train.py,
# src/models/local_agg_head.py). I-JEPA with each target patch's target aggregated from its
# semantically nearest window neighbours.
@dataclass
class DMTJEPAConfig(IJEPAConfig):
    """DMT-JEPA: I-JEPA whose targets are, per masked patch, a cross-attention aggregate of its `neighbours`
    most similar patches in a `window` x `window` neighbourhood (an EMA head on the target encoder), and
    whose predictor reads the context tokens through the trained copy of that head."""

    name: str = "dmtjepa"
    # Masked semantic neighbouring (patch: patch_k_num 4, patch_k_size 3): the 4 most cosine-similar of
    # the 8 patches around each patch (the window wraps around the grid's edges, as get_local_index).
    neighbours: int = 4
    window: int = 3
    # Local aggregation target head (LocalAggHead): 2 class-attention blocks, MLP ratio 4, as many heads
    # as the encoder (0 = the encoder's; helper.py init_model num_heads=encoder.num_heads). The target
    # side is its EMA copy with the target encoder's momentum (train.py step 3).
    aggregation_depth: int = 2
    aggregation_num_heads: int = 0

    def problems(self) -> list[tuple[str, str]]:
        found = super().problems()
        window_ok = self.window >= 3 and self.window % 2 == 1
        if not window_ok:
            found.append(("objective.window", f"must be odd and >= 3, got {self.window}"))
        most = self.window**2 - 1 if window_ok else None
        if self.neighbours < 1 or (most is not None and self.neighbours > most):
            bound = f"in 1..{most} for window {self.window}" if most is not None else ">= 1"
            found.append(("objective.neighbours", f"must be {bound}, got {self.neighbours}"))
        if self.aggregation_depth < 1:
            found.append(("objective.aggregation_depth", f"must be >= 1, got {self.aggregation_depth}"))
        if self.aggregation_num_heads < 0:
            found.append(
                (
                    "objective.aggregation_num_heads",
                    f"must be >= 0 (0 = the encoder's), got {self.aggregation_num_heads}",
                )
            )
        return found


# MSBReg: Moon, Buracas, Park, Kim, Canny, "An Embedding-Dynamic Approach to Self-supervised
# Learning" (WACV 2023, arXiv 2207.03552). Its Method section and official code could not be read
# here: the values marked "unverified" are this project's choices, documented in docs/objectives.md.
@dataclass
class MSBRegConfig(ObjectiveConfig):
    """MSBReg: multiview centroid loss + singular value loss + Brownian diffusive loss, BYOL-style EMA target."""

    # The pooled feature only: any timm model (the paper trains ResNet-50).
    families: ClassVar[tuple[str, ...]] = ("any",)

    name: str = "msbreg"
    # Views per image whose centroids are matched (the paper's "multiple views"; the count is unverified).
    views: int = 2
    # Weights of the singular value and Brownian terms (0.1 for the Brownian term as the public
    # centroid/Brownian implementation; 1.0 for the singular value term: both unverified).
    sv_weight: float = 1.0
    brownian_weight: float = 0.1
    # BYOL's projector and predictor (Linear 4096 -> BN -> ReLU -> Linear 256) and its EMA target:
    # momentum 0.996 -> 1 with a half cosine over training (the paper's "a la BYOL"; unverified).
    dim: int = 256
    mlp_dim: int = 4096
    momentum: float = 0.996
    total_steps: int = 0
    # BYOL's asymmetric views: view 1 blur p=1.0; view 2 blur p=0.1 + solarise p=0.2 (views alternate).
    view1: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)
    view2: ViewAugmentConfig = field(default_factory=lambda: ViewAugmentConfig(blur_prob=0.1, solarize_prob=0.2))

    def problems(self) -> list[tuple[str, str]]:
        found = self.view1.problems("objective.view1") + self.view2.problems("objective.view2")
        if self.views < 2:
            found.append(
                ("objective.views", f"must be >= 2 (a centroid of one view attracts nothing), got {self.views}")
            )
        for key in ("dim", "mlp_dim"):
            if getattr(self, key) < 1:
                found.append((f"objective.{key}", f"must be >= 1, got {getattr(self, key)}"))
        for key in ("sv_weight", "brownian_weight"):
            if getattr(self, key) < 0:
                found.append((f"objective.{key}", f"must be >= 0, got {getattr(self, key)}"))
        if not 0.0 <= self.momentum < 1.0:
            found.append(("objective.momentum", f"must be in [0, 1), got {self.momentum}"))
        if self.total_steps < 0:
            found.append(("objective.total_steps", f"must be >= 0 (0 = trainer.max_steps), got {self.total_steps}"))
        return found


# RotNet: Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
# Rotations" (ICLR 2018); gidariss/FeatureLearningRotNet (dataloader.py, architectures/, config/).
@dataclass
class RotNetConfig(ObjectiveConfig):
    """RotNet: each image at 0, 90, 180 and 270 degrees; a head on the pooled feature predicts which."""

    # The pooled feature only: any timm model (the paper: NIN, AlexNet, ResNet).
    families: ClassVar[tuple[str, ...]] = ("any",)

    name: str = "rotnet"
    # Rotation classifier on the pooled feature: `head_layers` Linear layers, BN + ReLU between, the
    # hidden ones `head_hidden_dim` wide (null = the encoder width). The paper's heads are the top of
    # the network (NIN's last conv blocks, AlexNet's fully connected layers), so the evaluated
    # features are not the 4-way classifier's input; 1 = a linear classifier.
    head_layers: int = 2
    head_hidden_dim: int | None = None

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if self.head_layers < 1:
            found.append(("objective.head_layers", f"must be >= 1, got {self.head_layers}"))
        if self.head_hidden_dim is not None and self.head_hidden_dim < 1:
            found.append(
                ("objective.head_hidden_dim", f"must be >= 1 or null (= encoder width), got {self.head_hidden_dim}")
            )
        return found


# SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
# Representations" (ICML 2020); google-research/simclr (README.md, tf2/run.py flags, objective.py,
# model.py, data_util.py). The paper trains ResNets; ViT choices are noted per field.
@dataclass
class SimCLRConfig(ObjectiveConfig):
    """SimCLR: two views, encoder -> projection MLP -> NT-Xent over the gathered batch."""

    families: ClassVar[tuple[str, ...]] = ("any",)

    name: str = "simclr"
    # NT-Xent temperature: 0.1 with batch 4096 (tf2/run.py --temperature default, README ImageNet command).
    # The README's small-batch CIFAR-10 command uses 0.5.
    temperature: float = 0.1
    # Projection head (tf2/run.py --num_proj_layers 3 --proj_out_dim 128; model.py ProjectionHead: hidden
    # layers as wide as the encoder output, BN + ReLU, last layer with BN): on the CLS token of the
    # final normed tokens (timm's global_pool="token", as MoCo v3's ViT). null = the encoder width.
    proj_layers: int = 3
    proj_hidden_dim: int | None = None
    proj_dim: int = 128
    # Both views: colour distortion of strength 1.0 (data_util.py color_jitter: brightness, contrast,
    # saturation 0.8 s, hue 0.2 s, p=0.8; grayscale p=0.2) and blur p=0.5, no solarisation.
    augment: ViewAugmentConfig = field(
        default_factory=lambda: ViewAugmentConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_prob=0.5)
    )

    def problems(self) -> list[tuple[str, str]]:
        found = self.augment.problems("objective.augment")
        if not self.temperature > 0:
            found.append(("objective.temperature", f"must be > 0, got {self.temperature}"))
        for key in ("proj_layers", "proj_dim"):
            if getattr(self, key) < 1:
                found.append((f"objective.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.proj_hidden_dim is not None and self.proj_hidden_dim < 1:
            found.append(
                ("objective.proj_hidden_dim", f"must be >= 1 or null (= encoder width), got {self.proj_hidden_dim}")
            )
        return found


# MoCo v3: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers" (ICCV 2021);
# facebookresearch/moco-v3 (main_moco.py, moco/builder.py MoCo_ViT, vits.py, CONFIG.md ViT recipes).
def momentum_contrast_problems(cfg: Any, sizes: tuple[str, ...]) -> list[tuple[str, str]]:
    """The checks MoCo v3 and MoBY share: two views, temperature, head sizes, momentum and its schedule."""
    found = cfg.view1.problems("objective.view1") + cfg.view2.problems("objective.view2")
    if not cfg.temperature > 0:
        found.append(("objective.temperature", f"must be > 0, got {cfg.temperature}"))
    for key in sizes:
        if getattr(cfg, key) < 1:
            found.append((f"objective.{key}", f"must be >= 1, got {getattr(cfg, key)}"))
    if not 0.0 <= cfg.momentum < 1.0:
        found.append(("objective.momentum", f"must be in [0, 1), got {cfg.momentum}"))
    if cfg.total_steps < 0:
        found.append(("objective.total_steps", f"must be >= 0 (0 = trainer.max_steps), got {cfg.total_steps}"))
    return found


@dataclass
class MoCoV3Config(ObjectiveConfig):
    """MoCo v3: query encoder + projector + predictor vs a momentum key encoder, symmetric InfoNCE x 2T."""

    families: ClassVar[tuple[str, ...]] = ("any",)

    name: str = "mocov3"
    # Softmax temperature (CONFIG.md ViT: --moco-t=.2); the loss is CE x 2T (builder.py contrastive_loss).
    temperature: float = 0.2
    # Projector: 3-layer MLP, hidden 4096, output 256; predictor: 2-layer, 4096 -> 256; BN in every
    # hidden layer and (without affine) after the last (--moco-mlp-dim 4096 --moco-dim 256, MoCo_ViT).
    dim: int = 256
    mlp_dim: int = 4096
    # Projector depth; "auto": 3 on a ViT (MoCo_ViT), 2 on other backbones (MoCo_ResNet, builder.py).
    proj_layers: int | str = "auto"
    # Momentum of the key encoder, from `momentum` to 1 with a half-cosine over training
    # (--moco-m 0.99 --moco-m-cos, adjust_moco_momentum); false = constant.
    momentum: float = 0.99
    momentum_cosine: bool = True
    # Optimizer steps of the cosine schedule; 0 = the run's length (trainer.max_steps, RunContext.total_steps).
    total_steps: int = 0
    # Frozen random patch projection (--stop-grad-conv1 in every ViT recipe of CONFIG.md; vits.py re-inits it
    # xavier-uniform and sets requires_grad=False), and fixed 2-D sin-cos position embeddings (vits.py).
    # "auto": on for a ViT, off for other backbones (the ResNet recipe has neither: main_moco.py resnet50).
    freeze_patch_embed: bool | str = "auto"
    fixed_pos_embed: bool | str = "auto"
    # Asymmetric views (main_moco.py, BYOL's recipe): view 1 blur p=1.0; view 2 blur p=0.1 + solarise p=0.2.
    view1: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)
    view2: ViewAugmentConfig = field(default_factory=lambda: ViewAugmentConfig(blur_prob=0.1, solarize_prob=0.2))

    def problems(self) -> list[tuple[str, str]]:
        found = momentum_contrast_problems(self, ("dim", "mlp_dim"))
        for key in ("freeze_patch_embed", "fixed_pos_embed"):
            value = getattr(self, key)
            if not (isinstance(value, bool) or value == "auto"):
                found.append((f"objective.{key}", f"must be true, false or auto, got {value!r}"))
        layers = self.proj_layers
        if not (layers == "auto" or (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 1)):
            found.append(("objective.proj_layers", f"must be auto or an integer >= 1, got {layers!r}"))
        return found

    def backbone_problems(self, family: str) -> list[tuple[str, str]]:
        # The ViT recipe's two tricks act on a patch projection and position embeddings.
        return [
            (f"objective.{key}", f"is a ViT setting (a {family} backbone has no ViT {what}); use auto or false")
            for key, what in (("freeze_patch_embed", "patch projection"), ("fixed_pos_embed", "position embedding"))
            if family != "vit" and getattr(self, key) is True
        ]


@dataclass
class MoBYConfig(ObjectiveConfig):
    """MoBY (Xie et al., 2021, "Self-Supervised Learning with Swin Transformers"): MoCo v2 + BYOL.
    Defaults: SwinTransformer/Transformer-SSL models/moby.py, configs/moby_swin_tiny.yaml."""

    # The pooled feature only: any timm model (the paper: Swin-T and DeiT-S).
    families: ClassVar[tuple[str, ...]] = ("any",)

    name: str = "moby"
    # CONTRAST_TEMPERATURE 0.2; CONTRAST_NUM_NEGATIVE 4096 keys per queue (one queue per view).
    temperature: float = 0.2
    queue_size: int = 4096
    # Projector and predictor: 2-layer MLPs, hidden 4096, output 256, BN + ReLU between
    # (PROJ_NUM_LAYERS 2, PRED_NUM_LAYERS 2, MoBYMLP inner_dim 4096 out_dim 256).
    proj_layers: int = 2
    pred_layers: int = 2
    dim: int = 256
    mlp_dim: int = 4096
    # Target encoder momentum 0.99 -> 1 with a half cosine over training (CONTRAST_MOMENTUM 0.99,
    # _momentum_update_key_encoder); its drop path is 0 (TARGET_DROP_PATH_RATE 0.0; the online
    # encoder's is model.drop_path_rate, ONLINE_DROP_PATH_RATE 0.2 for Swin-T).
    momentum: float = 0.99
    # Optimizer steps of the cosine schedule; 0 = the run's length (trainer.max_steps).
    total_steps: int = 0
    # BYOL's asymmetric views (AUG.SSL_AUG, as MoCo v3): view 1 blur p=1.0; view 2 blur p=0.1 + solarise p=0.2.
    view1: ViewAugmentConfig = field(default_factory=ViewAugmentConfig)
    view2: ViewAugmentConfig = field(default_factory=lambda: ViewAugmentConfig(blur_prob=0.1, solarize_prob=0.2))

    def problems(self) -> list[tuple[str, str]]:
        return momentum_contrast_problems(self, ("queue_size", "proj_layers", "pred_layers", "dim", "mlp_dim"))


# CCViT: "Centroid-centered Modeling for Efficient Vision Transformer Pre-training" (Yan et al.,
# 2023, arXiv 2303.04664). Values from the official code Cakeyan/CCViT_Public: README.md (ViT-B
# pre-training command), train_faiss_kmeans.py, run_ccvit_pretraining.py, datasets.py,
# engine_for_pretraining.py (--use_dual_loss True), modeling_pretrain.py.
KMEANS_INIT_CHOICES = ("random", "kmeans++")


@dataclass
class CCViTConfig(ObjectiveConfig):
    """CCViT: k-means centroids of pixel patches as tokens; mask + centroid replacement; CE on ids + pixel MSE."""

    name: str = "ccvit"
    # Existing centroids to reuse: models:/ccvit-centroids-<k>x<patch>/latest (or /<version>),
    # runs:/<run_id>/centroids, an export/centroids directory, or the official script's
    # <exp>_centroids.npy. "" = build them by k-means on this run's data before step 1.
    tokenizer: str = ""
    # k-means over raw patches in [0, 1]: 8192 centroids, 20 iterations, seed 1 (train_faiss_kmeans.py
    # --k 8192 --n_iter 20, clus.seed = 1; faiss's init: k random sample points).
    num_centroids: int = 8192
    kmeans_iters: int = 20
    kmeans_init: str = "random"
    kmeans_seed: int = 1
    # Patches sampled for k-means over all ranks: all 196 patches of 50 images x 1000 classes
    # (--sample 50) = 9.8M. Taken from the training stream (augmented crops), whole images first.
    kmeans_samples: int = 9_800_000
    # Block-wise mask of exactly 75 of 196 patches (--num_mask_patches 75); round(N * ratio) elsewhere.
    mask_ratio: float = 0.3827
    # Of the unmasked patches, round(N * ratio) drawn uniformly get their centroid's pixels
    # (--num_replaced_patches 20 of 196; datasets.py DataAugmentationForCCViT).
    replace_ratio: float = 0.102
    # Pixel branch: final CLS + patch tokens of block `early_layers` (1-based) -> `head_layers`
    # blocks -> its own norm and Linear to p*p*3 pixels (--early_layers 9 --head_layers 2
    # --shared_lm_head False for ViT-B; 21 for ViT-L). null = max(1, depth - 3).
    early_layers: int | None = None
    head_layers: int = 2
    # loss = CE(centroid ids) + pixel_weight * MSE(per-patch normalised pixels) (loss_1 + loss_2).
    pixel_weight: float = 1.0
    # Registry name of the exported centroids; "" = "ccvit-centroids-<k>x<patch size>".
    registered_name: str = ""

    def inputs(self) -> list[StageInput]:
        """Given centroids ("" = k-means in this run, no earlier stage)."""
        return [StageInput("centroids", "objective.tokenizer", "centroids", self.tokenizer)] if self.tokenizer else []

    def outputs(self) -> tuple[str, ...]:
        return ("encoder", "centroids")

    def problems(self) -> list[tuple[str, str]]:
        found = []
        if "://" in self.tokenizer and not self.tokenizer.startswith(("models:/", "runs:/")):
            found.append(
                (
                    "objective.tokenizer",
                    f"use models:/..., runs:/<run_id>/centroids, a local directory or .npy, or '' to build "
                    f"centroids by k-means; got {self.tokenizer!r}",
                )
            )
        if self.num_centroids < 2:
            found.append(("objective.num_centroids", f"must be >= 2, got {self.num_centroids}"))
        if self.kmeans_iters < 1:
            found.append(("objective.kmeans_iters", f"must be >= 1, got {self.kmeans_iters}"))
        if self.kmeans_init not in KMEANS_INIT_CHOICES:
            found.append(("objective.kmeans_init", f"must be one of {KMEANS_INIT_CHOICES}, got {self.kmeans_init!r}"))
        if not self.tokenizer and self.kmeans_samples < self.num_centroids:
            found.append(
                (
                    "objective.kmeans_samples",
                    f"{self.kmeans_samples} patches cannot make {self.num_centroids} centroids; sample at least "
                    f"objective.num_centroids (the paper: ~1200 per centroid)",
                )
            )
        if not 0.0 < self.mask_ratio < 1.0:
            found.append(("objective.mask_ratio", f"must be in (0, 1), got {self.mask_ratio}"))
        if not 0.0 <= self.replace_ratio < 1.0:
            found.append(("objective.replace_ratio", f"must be in [0, 1), got {self.replace_ratio}"))
        elif 0.0 < self.mask_ratio < 1.0 and self.mask_ratio + self.replace_ratio >= 1.0:
            found.append(
                (
                    "objective.replace_ratio",
                    f"mask_ratio + replace_ratio must be < 1 (replaced patches are unmasked ones), "
                    f"got {self.mask_ratio} + {self.replace_ratio}",
                )
            )
        if self.early_layers is not None and self.early_layers < 1:
            found.append(
                ("objective.early_layers", f"must be >= 1 (a 1-based block count) or null, got {self.early_layers}")
            )
        if self.head_layers < 0:
            found.append(("objective.head_layers", f"must be >= 0, got {self.head_layers}"))
        if self.pixel_weight < 0:
            found.append(("objective.pixel_weight", f"must be >= 0, got {self.pixel_weight}"))
        return found


# SemAIM: Song et al., "Semantic-Aware Autoregressive Image Modeling for Visual Representation
# Learning" (AAAI 2024, arXiv 2312.10457). Values from the official skyoux/SemAIM (README.md
# pre-training command, main_pretrain.py, models/models_semaim.py, engines/engine_pretrain.py).
SEMAIM_TARGETS = ("pixels", "teacher")
SEMAIM_ORDERS = ("semantic", "random")
SEMAIM_ORDER_SOURCES = ("model", "ema")


@dataclass
class SemAIMConfig(ObjectiveConfig):
    """SemAIM: autoregression from the most CLS-like patch outwards, two-stream (XLNet-style) attention."""

    name: str = "semaim"
    # "pixels": SemAIM (blurred, per-patch normalised pixels); "teacher": SemAIM*, l2-normalised teacher
    # patch features with the order from the teacher's CLS-patch similarity (--predict_feature clip).
    target: str = "pixels"
    # SemAIM*'s teacher (README: CLIP features, "85.3" with ViT-B): CLIP ViT-B/16's final tokens after
    # ln_post, projected (engine_pretrain.py forward_features_clip: ln_post(x) @ proj, 512-d). Its CLS
    # gives the order (return_cls). Used only with target=teacher.
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(project=True, return_cls=True))
    # "semantic": centre = the patch most similar to CLS, then by grid distance to it
    # (--permutation_type attention_center --attention_type cls); "random": SAIM's stochastic order.
    order: str = "semantic"
    # Whose similarity map orders the patches (target=pixels): "model" = the current encoder, no grad,
    # in eval mode (README command: no --use_ema_model); "ema" = an EMA copy (--use_ema_model).
    order_source: str = "model"
    # Tie-break between equidistant patches: + U(0, 1) * 1e-3 (generate_attention_distance_center_permutation).
    order_noise: float = 1.0e-3
    # Query-stream blocks, one after every depth / query_depth encoder blocks (--query_depth 12 for
    # ViT-B's 12); null = the encoder's depth. Separate weights (share_weight=False).
    query_depth: int | None = None
    # Gaussian blur of the target image, zero padding (--gaussian_kernel_size 9 --gaussian_sigma 1,
    # util/blocks.py GaussianConv2d); blur_kernel_size 0 = no blur.
    blur_kernel_size: int = 9
    blur_sigma: float = 1.0
    # Per-patch normalised pixel targets (--norm_pix_loss), L2 over all patches (--loss_type L2).
    norm_pix_loss: bool = True
    # EMA of the encoder for order_source=ema (main_pretrain.py ModelEma(decay=0.999), updated every
    # step; engine_pretrain.py raises the decay linearly to 0.9999 over the first 100 of 800 epochs).
    ema_decay: float = 0.999
    ema_decay_end: float = 0.9999
    ema_ramp_fraction: float = 0.125

    def inputs(self) -> list[StageInput]:
        """The teacher only for SemAIM* (target=teacher)."""
        return [i for i in super().inputs() if i.role != "teacher" or self.target == "teacher"]

    def problems(self) -> list[tuple[str, str]]:
        found = []
        choices = (("target", SEMAIM_TARGETS), ("order", SEMAIM_ORDERS), ("order_source", SEMAIM_ORDER_SOURCES))
        for key, valid in choices:
            if getattr(self, key) not in valid:
                found.append((f"objective.{key}", f"must be one of {valid}, got {getattr(self, key)!r}"))
        if self.target == "teacher":
            found += self.teacher.problems("objective.teacher")
        if self.order_source == "ema" and (self.target == "teacher" or self.order == "random"):
            found.append(
                (
                    "objective.order_source",
                    "ema orders patches only with target=pixels and order=semantic (the teacher or chance "
                    "gives the order otherwise); use order_source=model",
                )
            )
        if self.order_noise < 0:
            found.append(("objective.order_noise", f"must be >= 0, got {self.order_noise}"))
        if self.query_depth is not None and self.query_depth < 1:
            found.append(("objective.query_depth", f"must be >= 1 or null (= encoder depth), got {self.query_depth}"))
        if self.blur_kernel_size < 0 or (self.blur_kernel_size > 0 and self.blur_kernel_size % 2 == 0):
            found.append(("objective.blur_kernel_size", f"must be odd, or 0 for no blur, got {self.blur_kernel_size}"))
        if self.blur_kernel_size > 0 and not self.blur_sigma > 0:
            found.append(("objective.blur_sigma", f"must be > 0, got {self.blur_sigma}"))
        for key in ("ema_decay", "ema_decay_end"):
            if not 0.0 <= getattr(self, key) < 1.0:
                found.append((f"objective.{key}", f"must be in [0, 1), got {getattr(self, key)}"))
        if not 0.0 <= self.ema_ramp_fraction <= 1.0:
            found.append(("objective.ema_ramp_fraction", f"must be in [0, 1], got {self.ema_ramp_fraction}"))
        return found


def objective_config_classes() -> list[type[ObjectiveConfig]]:
    """The config dataclass of every objective defined here (torch-free: the schemas and config checks)."""
    return [
        cls
        for cls in globals().values()
        if isinstance(cls, type) and issubclass(cls, ObjectiveConfig) and cls is not ObjectiveConfig
    ]
