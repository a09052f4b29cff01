"""Frozen teachers: a timm model that maps normalised images to patch features.

Shared by the objectives that regress or quantise a teacher's features (VQ-KD,
MaskDistill, SemAIM*): `attach_teacher` loads one, checks its patch grid against the
encoder's and holds it outside the objective's parameters. A teacher comes from timm's
pretrained weights, an encoder artifact (`objectives.artifacts`: a local directory, a
`runs:/` or `models:/` URI), or a bare weights file, and is only ever loaded from
safetensors or with `torch.load(weights_only=True)`: a pickle that builds objects is refused.

Inputs: images normalised with the data pipeline's mean/std. When `load_teacher` is
given those (`input_mean`/`input_std`) and the teacher was trained with other ones
(timm's `pretrained_cfg`, or the artifact's pretrain.json), the teacher re-normalises per channel.
Resolution: a teacher built for another image size has its position embedding
resampled (timm `set_input_size`, bicubic), so its grid is img_size / its patch size;
images are never resized.

Non-ViT teachers (ResNet, ConvNeXt, Swin, any timm model with `feature_info`): one feature
map flattened into tokens; `layer` picks which (-1: the last, after the final norm), and its
stride must equal the encoder's patch size (stride 16 is index 3 of a ResNet, 2 of a ConvNeXt
or Swin; the error names the index).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from objectives.artifacts import (
    META_FILE,
    MODEL_URI_SCHEMES,
    ArtifactError,
    ArtifactNotFound,
    first_line,
    holds_artifact,
    read_artifact,
)
from objectives.components.frozen import FrozenModel
from objectives.configs import TEACHER_FILE_SUFFIXES, TEACHER_NORMALIZE, TeacherConfig

if TYPE_CHECKING:
    from objectives.base import Objective

log = logging.getLogger(__name__)

# Nested checkpoints (DeiT/MAE "model", Lightning "state_dict") hold the weights under one of these.
NESTED_KEYS = ("model", "state_dict", "teacher")


class TeacherOutput(NamedTuple):
    """Teacher features of a batch."""

    patches: torch.Tensor  # (B, N, D)
    cls: torch.Tensor | None  # (B, D), when the teacher was asked for it


class Teacher(FrozenModel):
    """A frozen timm model exposing one layer's patch features (and a ViT's CLS); always in eval mode.

    A VisionTransformer gives its tokens. A hierarchical model (ResNet, ConvNeXt, Swin: any timm
    model with `feature_info` and `forward_intermediates`) gives one feature map, flattened row by
    row into tokens: its cells are the patches of a ViT whose patch size is that map's stride.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layer: int = -1,
        normalize: str = "none",
        return_cls: bool = False,
        project: bool = False,
        img_size: int | None = None,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        source: str = "",
    ) -> None:
        super().__init__(source)
        name = type(model).__name__
        self.is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")
        if self.is_vit:
            depth = len(model.blocks)
            img_size = int(model.patch_embed.img_size[0])
        else:
            if not getattr(model, "feature_info", None) or not hasattr(model, "forward_intermediates"):
                raise ValueError(
                    f"teacher {source!r}: {name} gives neither patch tokens (a timm VisionTransformer) "
                    "nor feature maps (timm feature_info + forward_intermediates)"
                )
            if img_size is None:
                raise ValueError(f"teacher {source!r}: a {name} teacher needs the image size to know its grid")
            depth = len(model.feature_info)
        if not -1 <= layer < depth:
            unit = "a block index" if self.is_vit else f"a feature index (strides {self._strides(model)})"
            raise ValueError(
                f"teacher {source!r}: layer {layer} out of range; use -1 (final, normed) or {unit} 0..{depth - 1}"
            )
        if normalize not in TEACHER_NORMALIZE:
            raise ValueError(f"teacher normalize: {normalize!r} is not one of {TEACHER_NORMALIZE}")
        if return_cls and getattr(model, "cls_token", None) is None:
            raise ValueError(f"teacher {source!r}: return_cls=True but the model has no class token")
        if project and (not self.is_vit or layer != -1 or not isinstance(getattr(model, "head", None), nn.Linear)):
            raise ValueError(
                f"teacher {source!r}: project=True needs a ViT, layer=-1 and a Linear head (num_classes > 0)"
            )
        self.model = model
        self.layer = layer
        self.img_size = img_size
        self.normalize = normalize
        self.return_cls = return_cls
        self.project = project
        self.freeze(input_mean, input_std, teacher_mean, teacher_std)

    @staticmethod
    def _strides(model: nn.Module) -> list[int]:
        return [int(f["reduction"]) for f in model.feature_info]

    def _feature_index(self) -> int:
        return self.layer if self.layer >= 0 else len(self.model.feature_info) - 1

    @property
    def patch_size(self) -> int:
        """The stride of the features: the ViT's patch size, or the chosen feature map's reduction."""
        if self.is_vit:
            return int(self.model.patch_embed.patch_size[0])
        return self._strides(self.model)[self._feature_index()]

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.is_vit:
            return tuple(int(g) for g in self.model.patch_embed.grid_size)
        side = self.img_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def feature_dim(self) -> int:
        if not self.is_vit:
            return int(self.model.feature_info[self._feature_index()]["num_chs"])
        return int(self.model.head.out_features) if self.project else int(self.model.embed_dim)

    def layer_for_stride(self, stride: int) -> int | None:
        """The feature index of a hierarchical teacher whose stride is `stride` (None: none is, or a ViT)."""
        if self.is_vit:
            return None
        strides = self._strides(self.model)
        return strides.index(stride) if stride in strides else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised images -> patches (B, N, D) and optionally CLS (B, D)."""
        x = self.model_input(images, next(self.model.parameters()).dtype)
        if not self.is_vit:
            # One feature map (B, C, h, w), NCHW for every family; the last one after the model's final
            # norm where it has one (Swin's norm, ConvNeXt's norm_pre), like forward_features.
            (fmap,) = self.model.forward_intermediates(
                x, indices=[self._feature_index()], norm=self.layer == -1, intermediates_only=True
            )
            patches, cls = fmap.flatten(2).transpose(1, 2), None  # (B, h*w, C)
        else:
            patches, cls = self._vit_tokens(x)
        if self.normalize == "layer_norm":
            # MaskDistill target: LayerNorm over D without affine parameters.
            patches = F.layer_norm(patches, patches.shape[-1:])
            cls = None if cls is None else F.layer_norm(cls, cls.shape[-1:])
        return TeacherOutput(patches=patches, cls=cls)

    def _vit_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        vit = self.model
        if self.layer == -1:
            tokens = vit.forward_features(x)  # (B, prefix + N, D), after the final norm
            if self.project:
                tokens = vit.head(tokens)  # (B, prefix + N, D')
        else:
            # Output of block `layer`, before any norm; prefix tokens come back separately.
            ((patches, prefix_tokens),) = vit.forward_intermediates(
                x,
                indices=[self.layer],
                return_prefix_tokens=True,
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
            tokens = torch.cat([prefix_tokens, patches], dim=1)  # (B, prefix + N, D)
        prefix = int(vit.num_prefix_tokens)
        return tokens[:, prefix:], (tokens[:, 0] if self.return_cls else None)


# --- loading ---------------------------------------------------------------------


def load_teacher(
    cfg: TeacherConfig,
    *,
    img_size: int | None = None,
    input_mean: Sequence[float] | None = None,
    input_std: Sequence[float] | None = None,
    tracking_uri: str | None = None,
) -> Teacher:
    """Build the frozen teacher `cfg` describes, for images of `img_size` normalised with input_mean/std."""
    source = cfg.source
    if source.startswith("timm:"):
        model, mean, std = _from_timm(source.removeprefix("timm:"), cfg)
    elif "://" in source and not source.startswith(MODEL_URI_SCHEMES):
        raise ArtifactError(
            f"teacher source {source!r}: unknown scheme; use timm:<name>, models:/<name>@<alias>, "
            f"runs:/<run_id>/<path>, or a local {'/'.join(TEACHER_FILE_SUFFIXES)} file or directory"
        )
    else:
        state, meta = _read_weights(source, tracking_uri)
        model = build_timm_model(
            _pick_arch(source, cfg.arch, meta.get("arch", "")),
            {**meta.get("arch_kwargs", {}), **cfg.arch_kwargs},
            state,
            label=f"teacher source {source}",
            hint="set objective.teacher.arch/arch_kwargs to the network the weights came from",
        )
        mean, std = meta.get("mean"), meta.get("std")
    if img_size is not None:
        _fit_input_size(model, img_size)
    log.info("teacher %s: %s, layer %d, normalize %s", source, type(model).__name__, cfg.layer, cfg.normalize)
    return Teacher(
        model,
        layer=cfg.layer,
        normalize=cfg.normalize,
        return_cls=cfg.return_cls,
        project=cfg.project,
        img_size=img_size or _default_img_size(model),
        input_mean=input_mean,
        input_std=input_std,
        teacher_mean=mean,
        teacher_std=std,
        source=source,
    )


def _fit_input_size(model: nn.Module, img_size: int) -> None:
    """A model built for another image size (ViT, Swin) resamples its position tables (timm
    `set_input_size`, bicubic); a convolutional one takes any size as it is."""
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None and tuple(built) != (img_size, img_size):
        model.set_input_size(img_size=(img_size, img_size))


def _default_img_size(model: nn.Module) -> int | None:
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:
        return int(built[0])
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if size else None


def attach_teacher(objective: Objective, cfg: TeacherConfig) -> Teacher:
    """The objective's frozen teacher: `context.inputs["teacher"]`, else loaded from `cfg`; on the encoder's grid,
    held outside its parameters.

    The teacher sees the batch's images, re-normalised to its own statistics (CLIP's differ
    from ImageNet's) and at the encoder's image size (position embedding resampled).
    """
    backbone, ctx = objective.backbone, objective.context
    teacher = ctx.inputs.get("teacher")
    if teacher is None:
        teacher = load_teacher(
            cfg,
            img_size=backbone.grid_size[0] * backbone.patch_size,
            input_mean=ctx.input_mean,
            input_std=ctx.input_std,
            tracking_uri=ctx.tracking_uri or None,
        )
    if teacher.grid_size != backbone.grid_size:
        fits = teacher.layer_for_stride(backbone.patch_size)
        hint = (
            f"set objective.teacher.layer={fits} (its stride-{backbone.patch_size} features)"
            if fits is not None
            else f"use a teacher whose features have stride {backbone.patch_size}, the encoder's patch size"
        )
        raise ValueError(
            f"the teacher's patch grid {teacher.grid_size} (stride {teacher.patch_size}) differs from the "
            f"encoder's {backbone.grid_size}; {hint}"
        )
    objective.attach_frozen("teacher", teacher)
    return teacher


Stats = Sequence[float] | None


def _from_timm(name: str, cfg: TeacherConfig) -> tuple[nn.Module, Stats, Stats]:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"teacher source timm:{name}: unknown timm model; see timm.list_models(pretrained=True)")
    try:
        model = timm.create_model(name, pretrained=True, **cfg.arch_kwargs)
    except Exception as err:  # download errors come from requests, huggingface_hub, urllib, OSError...
        raise RuntimeError(
            f"teacher source timm:{name}: could not get pretrained weights ({first_line(err)}); "
            "without network access save the teacher with objectives.artifacts.save_encoder and pass a local "
            "path or a models:/ URI as objective.teacher.source"
        ) from None
    cfg_data = getattr(model, "pretrained_cfg", {}) or {}
    return model.eval(), cfg_data.get("mean"), cfg_data.get("std")


def _is_bare_file(path: Path) -> bool:
    """A weights file outside an artifact directory (.pt/.pth, or a .safetensors with no metadata beside it)."""
    if path.suffix in (".pt", ".pth"):
        return True
    if path.suffix != ".safetensors":
        return False
    return not holds_artifact(path.parent, "encoder")


def _read_weights(source: str, tracking_uri: str | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, artifact metadata or {}) of an encoder artifact or a bare weights file."""
    path = Path(source).expanduser()
    if source.startswith(MODEL_URI_SCHEMES) or not _is_bare_file(path):
        hint = "save teachers with objectives.artifacts.save_encoder (or log them to MLflow in that layout)"
        if not source.startswith(MODEL_URI_SCHEMES) and not path.exists():
            raise ArtifactNotFound(f"teacher source {source}: no such file {path}")
        artifact = read_artifact(source, "encoder", tracking_uri=tracking_uri, hint=hint)
        return artifact.tensors, artifact.meta
    if not path.is_file():
        raise ArtifactNotFound(f"teacher source {source}: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), {}
    return _read_torch_file(path, source), {}


def _pick_arch(label: str, configured: str, stored: str) -> str:
    if configured and stored and configured != stored:
        raise ValueError(
            f"teacher source {label}: objective.teacher.arch={configured!r} but the file says {stored!r}; "
            "leave arch empty or make them agree"
        )
    if not (configured or stored):
        raise ValueError(
            f"teacher source {label}: no {META_FILE} beside it; set objective.teacher.arch to its timm name"
        )
    return configured or stored


def _read_torch_file(path: Path, label: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pt/.pth file, weights only; nested under "model"/"state_dict"/"teacher" is fine."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"teacher source {label}: refused, not a plain weights file (torch.load weights_only=True, {first_line(err)})"
        ) from None
    if isinstance(loaded, dict):
        for key in NESTED_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"teacher source {label}: expected a state dict of tensors, got {type(loaded).__name__}")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def build_timm_model(
    arch: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], *, label: str, hint: str
) -> nn.Module:
    """timm model `arch` with the weights of `state` (strict); a one-line error when they do not fit."""
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"{label}: unknown timm arch {arch!r}; see timm.list_models('vit_*')")
    vit = timm.create_model(arch, pretrained=False, **kwargs)
    expected = vit.state_dict()
    if getattr(vit, "num_classes", 0) == 0:
        # A classifier the model never uses; a head's own parts (ConvNeXt's head.norm) stay.
        state = {k: v for k, v in state.items() if not k.startswith("head.") or k in expected}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        examples = (missing + unexpected + wrong_shape)[:3]
        raise ValueError(
            f"{label}: weights do not fit arch {arch!r} with {kwargs}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys (e.g. {examples}); {hint}"
        )
    vit.load_state_dict(state)
    return vit


def load_encoder(
    source: str, *, tracking_uri: str | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model of an encoder artifact (local, fsspec URL, runs:/ or models:/) and its metadata.

    The weights must fit the recorded architecture exactly (strict load).
    """
    artifact = read_artifact(
        source,
        "encoder",
        tracking_uri=tracking_uri,
        storage_options=storage_options,
        hint="is it an exported encoder (<run dir>/export/encoder)?",
    )
    meta = artifact.meta
    vit = build_timm_model(
        _pick_arch(source, "", meta.get("arch", "")),
        dict(meta.get("arch_kwargs", {})),
        artifact.tensors,
        label=source,
        hint="the files do not match their metadata",
    )
    return vit.eval(), meta
