"""The run's backbone: `model.*` config -> the timm model behind the objectives' adapter."""

from __future__ import annotations

from objectives.components.backbone import (
    ConvNeXtBackbone,
    PooledBackbone,
    SwinBackbone,
    VitBackbone,
    fused_attn_enabled,
    set_fused_attn,
)
from pretrain.config import ModelConfig, model_family


def arch_kwargs(cfg: ModelConfig) -> dict[str, object]:
    """The `timm.create_model(cfg.arch, **kwargs)` arguments that fix the architecture (no weights, no drop path).

    ViTs and Swins are built for model.img_size and patch_size (a ViT also takes the optional
    width/depth/heads, a Swin embed_dim); model.kwargs adds any other timm argument (a Swin's
    window_size, depths, num_heads). Other families take images of any size.
    """
    kwargs: dict[str, object] = {"num_classes": 0}
    family = model_family(cfg)
    if family in ("vit", "swin"):  # patch grids: built for the input size
        kwargs.update(img_size=cfg.img_size, patch_size=cfg.patch_size)
    if family == "vit":
        for key in ("embed_dim", "depth", "num_heads"):
            value = getattr(cfg, key)
            if value is not None:
                kwargs[key] = value
    elif family == "swin" and cfg.embed_dim is not None:
        kwargs["embed_dim"] = cfg.embed_dim
    kwargs.update({key: list(v) if isinstance(v, (list, tuple)) else v for key, v in dict(cfg.kwargs).items()})
    return kwargs


def build_backbone(cfg: ModelConfig) -> VitBackbone | SwinBackbone | ConvNeXtBackbone | PooledBackbone:
    """Create the timm model named by `cfg.arch` with the config's overrides, behind its adapter."""
    import timm  # slow import (~5 s): only where a model is built

    if not timm.is_model(cfg.arch):
        raise ValueError(f"model.arch: unknown timm model {cfg.arch!r}; see timm.list_models()")
    kwargs = {**arch_kwargs(cfg), "pretrained": cfg.pretrained, "drop_path_rate": cfg.drop_path_rate}
    model = timm.create_model(cfg.arch, **kwargs)
    family = model_family(cfg)
    if family == "convnext":
        return ConvNeXtBackbone(model, cfg.img_size)
    if family not in ("vit", "swin"):
        return PooledBackbone(model)
    set_fused_attn(model, fused_attn_enabled(cfg.fused_attn))  # "auto" is settled where the device is known
    return VitBackbone(model) if family == "vit" else SwinBackbone(model)
