"""Frozen teachers: a timm ViT that maps normalised images to patch features.

Shared by the objectives that regress or quantise a teacher's features (VQ-KD,
MaskDistill, SemAIM*). A teacher comes from timm's pretrained weights, an MLflow
model URI, or a local file, and is only ever loaded from safetensors or with
`torch.load(weights_only=True)`: a pickle that builds objects is refused.

On-disk layout written by `save_teacher` (and logged to MLflow as a model's files):

    <dir>/teacher.safetensors   the timm state dict (timm's key names)
    <dir>/teacher.json          {"format": 1, "arch": <timm name>, "arch_kwargs": {...},
                                 "mean": [3 floats] | null, "std": [3 floats] | null}

Inputs: images normalised with the data pipeline's mean/std. When `load_teacher` is
given those (`input_mean`/`input_std`) and the teacher was trained with other ones
(timm's `pretrained_cfg`, or teacher.json), the teacher re-normalises per channel.
Resolution: a teacher built for another image size has its position embedding
resampled (timm `set_input_size`, bicubic), so its grid is img_size / its patch size;
images are never resized.
"""

from __future__ import annotations

import json
import logging
import pickle
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from objectives.configs import TEACHER_FILE_SUFFIXES, TEACHER_NORMALIZE, TeacherConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "teacher.safetensors"
META_FILE = "teacher.json"
LAYOUT_FORMAT = 1
# Nested checkpoints (DeiT/MAE "model", Lightning "state_dict") hold the weights under one of these.
NESTED_KEYS = ("model", "state_dict", "teacher")


def input_affine(
    input_mean: Sequence[float] | None,
    input_std: Sequence[float] | None,
    model_mean: Sequence[float] | None,
    model_std: Sequence[float] | None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Per-channel (scale, shift) that turn data-normalised images into the model's normalisation.

    x_model = (x * in_std + in_mean - m_mean) / m_std = x * scale + shift; (None, None)
    when any statistic is unknown or the two normalisations agree.
    """
    if None in (input_mean, input_std, model_mean, model_std):
        return None, None
    in_mean, in_std = torch.tensor(input_mean, dtype=torch.float32), torch.tensor(input_std, dtype=torch.float32)
    m_mean, m_std = torch.tensor(model_mean, dtype=torch.float32), torch.tensor(model_std, dtype=torch.float32)
    scale, shift = in_std / m_std, (in_mean - m_mean) / m_std
    if torch.equal(scale, torch.ones(3)) and torch.equal(shift, torch.zeros(3)):
        return None, None
    return scale, shift


class TeacherOutput(NamedTuple):
    """Teacher features of a batch."""

    patches: torch.Tensor  # (B, N, D)
    cls: torch.Tensor | None  # (B, D), when the teacher was asked for it


class Teacher(nn.Module):
    """A frozen timm ViT exposing one layer's patch (and CLS) features; always in eval mode."""

    def __init__(
        self,
        vit: nn.Module,
        *,
        layer: int = -1,
        normalize: str = "none",
        return_cls: bool = False,
        project: bool = False,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        teacher_mean: Sequence[float] | None = None,
        teacher_std: Sequence[float] | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        if not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
            raise ValueError(f"teacher {source!r}: {type(vit).__name__} is not a timm VisionTransformer")
        depth = len(vit.blocks)
        if not -1 <= layer < depth:
            raise ValueError(
                f"teacher {source!r}: layer {layer} out of range; use -1 (final, normed) or a block index 0..{depth - 1}"
            )
        if normalize not in TEACHER_NORMALIZE:
            raise ValueError(f"teacher normalize: {normalize!r} is not one of {TEACHER_NORMALIZE}")
        if return_cls and getattr(vit, "cls_token", None) is None:
            raise ValueError(f"teacher {source!r}: return_cls=True but the model has no class token")
        if project and (layer != -1 or not isinstance(getattr(vit, "head", None), nn.Linear)):
            raise ValueError(f"teacher {source!r}: project=True needs layer=-1 and a Linear head (num_classes > 0)")
        self.vit = vit
        self.layer = layer
        self.normalize = normalize
        self.return_cls = return_cls
        self.project = project
        self.source = source
        scale, shift = input_affine(input_mean, input_std, teacher_mean, teacher_std)
        self.renormalize = scale is not None
        scale = torch.ones(3) if scale is None else scale
        shift = torch.zeros(3) if shift is None else shift
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode (no dropout, no drop-path) whatever the caller asks."""
        return super().train(False)

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def feature_dim(self) -> int:
        return int(self.vit.head.out_features) if self.project else int(self.vit.embed_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """(B, 3, H, W) normalised images -> patches (B, N, D) and optionally CLS (B, D)."""
        x = images.to(self.in_scale.dtype)
        if self.renormalize:
            x = x * self.in_scale + self.in_shift
        x = x.to(self.vit.patch_embed.proj.weight.dtype)
        if self.layer == -1:
            tokens = self.vit.forward_features(x)  # (B, prefix + N, D), after the final norm
            if self.project:
                tokens = self.vit.head(tokens)  # (B, prefix + N, D')
        else:
            # Output of block `layer`, before any norm; prefix tokens come back separately.
            ((patches, prefix_tokens),) = self.vit.forward_intermediates(
                x,
                indices=[self.layer],
                return_prefix_tokens=True,
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
            tokens = torch.cat([prefix_tokens, patches], dim=1)  # (B, prefix + N, D)
        prefix = int(self.vit.num_prefix_tokens)
        patches = tokens[:, prefix:]  # (B, N, D)
        cls = tokens[:, 0] if self.return_cls else None  # (B, D)
        if self.normalize == "layer_norm":
            # MaskDistill target: LayerNorm over D without affine parameters.
            patches = F.layer_norm(patches, patches.shape[-1:])
            cls = None if cls is None else F.layer_norm(cls, cls.shape[-1:])
        return TeacherOutput(patches=patches, cls=cls)


# --- saving ----------------------------------------------------------------------


def _plain(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).contiguous().clone()


def save_teacher(
    model: nn.Module,
    path: str | Path,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Write `model`'s state dict as <path>/teacher.safetensors + teacher.json; returns the directory.

    mean/std: the input normalisation the model was trained with (None: same as the data's).
    """
    from safetensors.torch import save_file

    if isinstance(model, Teacher):
        model = model.vit
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    # contiguous clones: safetensors refuses tensors that share storage (tied or sliced weights).
    # fp32 whatever the training precision (bf16/fp16 parameters are widened).
    state = {k: _plain(v) for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    meta = {
        "format": LAYOUT_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std],
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def log_teacher_to_mlflow(
    model: nn.Module,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    run_id: str,
    tracking_uri: str | None = None,
    name: str = "teacher",
    registered_name: str = "",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> str:
    """Log the `save_teacher` layout as an MLflow 3 logged model of run `run_id`; returns its URI.

    No MLmodel flavor and no pickle: the model's files are just the layout. The run then
    resolves `runs:/<run_id>/<name>`; with `registered_name` a new registry version is made
    and `models:/<registered_name>/<version>` returned, else `runs:/<run_id>/<name>`.
    """
    from pretrain.registry import log_model_dir

    params = {"arch": arch, **{f"arch_kwargs.{k}": str(v) for k, v in (arch_kwargs or {}).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        save_teacher(model, tmp, arch, arch_kwargs, mean=mean, std=std)
        return log_model_dir(
            tmp,
            run_id=run_id,
            tracking_uri=tracking_uri,
            name=name,
            model_type="pretrain.teacher",
            params=params,
            registered_name=registered_name,
        )


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
        vit, mean, std = _from_timm(source.removeprefix("timm:"), cfg, img_size)
    elif source.startswith(("models:/", "runs:/")):
        vit, mean, std = _from_mlflow(source, cfg, img_size, tracking_uri)
    elif "://" in source:
        raise ValueError(
            f"teacher source {source!r}: unknown scheme; use timm:<name>, models:/<name>@<alias>, "
            f"runs:/<run_id>/<path>, or a local {'/'.join(TEACHER_FILE_SUFFIXES)} file or directory"
        )
    else:
        vit, mean, std = _from_path(Path(source), cfg, img_size)
    log.info("teacher %s: %s, layer %d, normalize %s", source, type(vit).__name__, cfg.layer, cfg.normalize)
    return Teacher(
        vit,
        layer=cfg.layer,
        normalize=cfg.normalize,
        return_cls=cfg.return_cls,
        project=cfg.project,
        input_mean=input_mean,
        input_std=input_std,
        teacher_mean=mean,
        teacher_std=std,
        source=source,
    )


Stats = Sequence[float] | None


def _from_timm(name: str, cfg: TeacherConfig, img_size: int | None) -> tuple[nn.Module, Stats, Stats]:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"teacher source timm:{name}: unknown timm model; see timm.list_models(pretrained=True)")
    kwargs = dict(cfg.arch_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size  # timm resamples the position embedding while loading
    try:
        vit = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # download errors come from requests, huggingface_hub, urllib, OSError...
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"teacher source timm:{name}: could not get pretrained weights ({type(err).__name__}: {first_line}); "
            "without network access save the teacher with objectives.teacher.save_teacher and pass a local "
            "path or a models:/ URI as objective.teacher.source"
        ) from None
    cfg_data = getattr(vit, "pretrained_cfg", {}) or {}
    return vit.eval(), cfg_data.get("mean"), cfg_data.get("std")


def _from_mlflow(
    uri: str, cfg: TeacherConfig, img_size: int | None, tracking_uri: str | None
) -> tuple[nn.Module, Stats, Stats]:
    from pretrain.registry import download_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        local = download_model_dir(uri, tmp, tracking_uri=tracking_uri)
        if not (local / WEIGHTS_FILE).is_file():
            found = sorted(p.name for p in local.iterdir()) if local.is_dir() else [local.name]
            raise FileNotFoundError(
                f"teacher source {uri}: no {WEIGHTS_FILE} in its files ({found}); "
                "log teachers with objectives.teacher.log_teacher_to_mlflow"
            )
        return _from_path(local, cfg, img_size, label=uri)


def _from_path(
    path: Path, cfg: TeacherConfig, img_size: int | None, *, label: str = ""
) -> tuple[nn.Module, Stats, Stats]:
    label = label or str(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"teacher source {label}: no such file {path}")
    if path.suffix not in TEACHER_FILE_SUFFIXES:
        raise ValueError(f"teacher source {label}: unsupported file type {path.suffix!r}; use {TEACHER_FILE_SUFFIXES}")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    arch = _pick_arch(label, cfg.arch, meta.get("arch", ""))
    kwargs = {**meta.get("arch_kwargs", {}), **cfg.arch_kwargs}
    state = _read_state_dict(path, label)
    vit = _build(arch, kwargs, state, label)
    if img_size is not None and tuple(vit.patch_embed.img_size) != (img_size, img_size):
        vit.set_input_size(img_size=(img_size, img_size))  # bicubic resampling of the position embedding
    return vit, meta.get("mean"), meta.get("std")


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


def _read_state_dict(path: Path, label: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = (str(err).strip().splitlines() or [""])[0][:160]
        raise ValueError(
            f"teacher source {label}: refused, not a plain weights file (torch.load weights_only=True: {first_line})"
        ) from None
    if isinstance(loaded, dict):
        for key in NESTED_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"teacher source {label}: expected a state dict of tensors, got {type(loaded).__name__}")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _build(arch: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor], label: str) -> nn.Module:
    """timm model `arch` with the weights of `state`; a one-line error when they do not fit."""
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"teacher source {label}: unknown timm arch {arch!r}; see timm.list_models('vit_*')")
    vit = timm.create_model(arch, pretrained=False, **kwargs)
    expected = vit.state_dict()
    if getattr(vit, "num_classes", 0) == 0:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a classifier the teacher never uses
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        examples = (missing + unexpected + wrong_shape)[:3]
        raise ValueError(
            f"teacher source {label}: weights do not fit arch {arch!r} with {kwargs}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys (e.g. {examples}); "
            "set objective.teacher.arch/arch_kwargs to the network the weights came from"
        )
    vit.load_state_dict(state)
    return vit


def load_exported_vit(source: str, *, tracking_uri: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The timm ViT of a `save_teacher` layout (an exported encoder) and its teacher.json.

    source: `models:/...`, `runs:/...` or a local directory/file. The weights must fit
    the recorded architecture exactly (strict load), from safetensors or weights_only.
    """
    cfg = TeacherConfig(source=source)
    with tempfile.TemporaryDirectory() as tmp:
        if source.startswith(("models:/", "runs:/")):
            from pretrain.registry import download_model_dir

            path, label = download_model_dir(source, tmp, tracking_uri=tracking_uri), source
        else:
            path, label = Path(source), source
        weights = path / WEIGHTS_FILE if path.is_dir() else path
        meta_path = weights.with_suffix(".json")
        if not weights.is_file():
            raise FileNotFoundError(f"{label}: no {WEIGHTS_FILE} there; is it an exported encoder?")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        vit, _, _ = _from_path(weights, cfg, None, label=label)
    return vit.eval(), meta
