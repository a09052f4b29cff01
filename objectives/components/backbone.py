"""The backbone contract: a timm model behind a small adapter.

Four kinds, one shared surface (`timm_model`, `embed_dim`, `pooled(images)`):

- `VitBackbone`, a timm ViT: patch tokens, keep-index masking, per-block features.
  Objectives use it instead of copying a ViT: MAE encodes only the kept tokens,
  BEiT-style MIM replaces tokens with a mask token, aggregation heads read the output
  of an intermediate block. Its pooled feature is the final normed CLS token.
- `SwinBackbone`, a timm Swin: its pooled feature, and its final feature map with masked
  patch embeddings (`feature_map`, which `VitBackbone` has too: SimMIM).
- `ConvNeXtBackbone`, a timm ConvNeXt: its pooled feature, and its final feature map with
  masked regions computed densely as a sparse convolution would (`feature_map`: FCMAE).
- `PooledBackbone`, any other timm model (ResNet, ...): only the pooled
  feature timm's own head would see (`forward_head(..., pre_logits=True)`).

An objective names the backbone families it runs on in its config class (`families`,
objectives/configs.py); pairing it with another family is a config error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class EncoderOutput:
    """Final normalised tokens and the requested intermediate block outputs."""

    tokens: torch.Tensor  # (B, prefix + N, D), after the final norm
    block_outputs: dict[int, torch.Tensor]  # block index (0-based) -> (B, prefix + N, D), pre-norm


class VitBackbone(nn.Module):
    """Wraps a timm `VisionTransformer`; its weights keep timm's names under `vit.`."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
            raise TypeError(f"{type(vit).__name__} is not a timm VisionTransformer (no patch_embed/blocks)")
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size ViTs are not supported: the patch grid must be fixed")
        self.vit = vit
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.grid_size = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = int(vit.embed_dim)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.depth = len(vit.blocks)
        if vit.cls_token is None:
            raise ValueError("the backbone needs a class token (timm class_token=True)")

    @property
    def timm_model(self) -> nn.Module:
        """The timm model itself (what is exported, under timm's key names)."""
        return self.vit

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the final normed CLS token (B, D) (timm's global_pool="token")."""
        return self(images)[:, 0]

    # --- position embeddings -------------------------------------------------
    def _patch_pos_embed(self) -> torch.Tensor:
        pos = self.vit.pos_embed  # (1, [prefix +] N, D)
        return pos if self.vit.no_embed_class else pos[:, self.num_prefix_tokens :]

    def _prefix_tokens(self, batch: int) -> torch.Tensor:
        prefix = [self.vit.cls_token.expand(batch, -1, -1)]  # (B, 1, D)
        if getattr(self.vit, "reg_token", None) is not None:
            prefix.append(self.vit.reg_token.expand(batch, -1, -1))
        tokens = torch.cat(prefix, dim=1)
        if not self.vit.no_embed_class:
            tokens = tokens + self.vit.pos_embed[:, : self.num_prefix_tokens]
        return tokens

    @torch.no_grad()
    def use_fixed_pos_embed(self, table: torch.Tensor) -> None:
        """Replace the learned position embedding by a fixed table (MAE: 2-D sin-cos).

        table: (N, D) for the patches; prefix positions get zeros.
        """
        pos = self.vit.pos_embed
        full = torch.zeros_like(pos)
        full[:, pos.shape[1] - self.num_patches :] = table.to(pos.dtype)
        pos.copy_(full)
        pos.requires_grad_(False)

    # --- forward pieces ------------------------------------------------------
    def embed_patches(
        self,
        images: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens with position embedding, no prefix: (B, N, D).

        With `mask` (B, N) bool (True = masked) and `mask_token` (1, 1, D), the embedding
        of each masked patch is replaced by the mask token before the position embedding
        is added (BEiT-style corruption: the encoder sees every position).
        """
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        if grid == self.grid_size:
            x = self.vit.patch_embed(images)
        else:
            return self._embed_other_size(images, grid, mask)
        if mask is not None:
            if mask_token is None:
                raise ValueError("embed_patches: a mask needs a mask_token")
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        return x + self._patch_pos_embed()

    def _embed_other_size(self, images: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        """Patch tokens of images of another size than the model's (a multi-crop's local views): the
        same patch projection, the position embedding resampled to their grid (bicubic, as DINO's
        `interpolate_pos_encoding` and timm's `resample_abs_pos_embed`)."""
        from timm.layers import resample_abs_pos_embed

        if mask is not None:
            raise ValueError("embed_patches: masks are only for images of the model's own size")
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} px are not a multiple of the {self.patch_size}-px patches"
            )
        pe = self.vit.patch_embed
        x = pe.norm(pe.proj(images).flatten(2).transpose(1, 2))  # (B, h w, D), as PatchEmbed without its size check
        pos = resample_abs_pos_embed(self._patch_pos_embed(), list(grid), list(self.grid_size), num_prefix_tokens=0)
        return x + pos.to(x.dtype)

    def encode(
        self,
        patch_tokens: torch.Tensor,
        *,
        keep_idx: torch.Tensor | None = None,
        return_blocks: Sequence[int] = (),
    ) -> EncoderOutput:
        """Run the transformer on patch tokens (B, N, D) from `embed_patches`.

        keep_idx: (B, K) indices of the patches to keep (MAE-style), or None for all.
        return_blocks: block indices (0-based, negative allowed) whose outputs to return.
        """
        x = patch_tokens
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        x = torch.cat([self._prefix_tokens(x.shape[0]), x], dim=1)
        x = self.vit.pos_drop(x)
        x = self.vit.norm_pre(x)
        wanted = {i % self.depth for i in return_blocks}
        outputs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.vit.blocks):
            x = block(x)
            if i in wanted:
                outputs[i] = x
        return EncoderOutput(tokens=self.vit.norm(x), block_outputs=outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Plain forward: final normalised tokens (B, prefix + N, D)."""
        return self.encode(self.embed_patches(images)).tokens

    # --- the masked feature map (SimMIM) ------------------------------------
    @property
    def patch_dim(self) -> int:
        """Width of a patch embedding (where a mask token replaces it)."""
        return self.embed_dim

    @property
    def stride(self) -> int:
        """Pixels per position of `feature_map`."""
        return self.patch_size

    def feature_map(
        self, images: torch.Tensor, *, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) -> the final normed patch tokens as a map (B, D, H / stride, W / stride);
        with `mask` (B, N) and `mask_token` (1, 1, D), masked patch embeddings are replaced first."""
        tokens = self.encode(self.embed_patches(images, mask=mask, mask_token=mask_token)).tokens
        patches = tokens[:, self.num_prefix_tokens :]  # (B, N, D)
        return patches.transpose(1, 2).reshape(patches.shape[0], self.embed_dim, *self.grid_size)


class _TimmHeadBackbone(nn.Module):
    """What the non-ViT adapters share: the wrapped timm model under `model.`, and its pooled feature."""

    model: nn.Module

    @property
    def timm_model(self) -> nn.Module:
        return self.model

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D): the features timm's classifier would read (pooled, head norm applied)."""
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pooled(images)


class SwinBackbone(_TimmHeadBackbone):
    """A timm SwinTransformer: its pooled feature, and its final feature map with masked patch embeddings.

    Weights keep timm's names under `model.`. Masking happens where SimMIM's Swin does it: on the
    patch embeddings (B, H/p, W/p, C), before the first stage; the stages then see every position.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not all(hasattr(model, name) for name in ("patch_embed", "layers", "norm", "feature_info")):
            raise TypeError(f"{type(model).__name__} is not a timm SwinTransformer (patch_embed/layers/norm)")
        self.model = model
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.grid_size = tuple(int(g) for g in model.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = int(model.num_features)
        self.patch_dim = int(model.feature_info[0]["num_chs"])
        self.stride = int(model.feature_info[-1]["reduction"])

    def feature_map(
        self, images: torch.Tensor, *, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) -> the final normed map (B, D, H / stride, W / stride) (timm's forward_features,
        channels first); with `mask` (B, N) and `mask_token` (1, 1, C0), masked patch embeddings are replaced."""
        x = self.model.patch_embed(images)  # (B, H/p, W/p, C0), channels last
        if mask is not None:
            if mask_token is None:
                raise ValueError("feature_map: a mask needs a mask_token")
            w = mask.view(x.shape[0], x.shape[1], x.shape[2], 1).to(x.dtype)
            x = x * (1 - w) + mask_token.view(1, 1, 1, -1).to(x.dtype) * w
        x = self.model.norm(self.model.layers(x))  # (B, h, w, D)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBackbone(_TimmHeadBackbone):
    """A timm ConvNeXt (V1 or V2): its pooled feature, and its final feature map with masked regions.

    `feature_map(images, mask=)` is FCMAE's dense stand-in for sparse convolution (ConvNeXt V2
    TRAINING.md, "masked (dense) convolution", the model the paper trained with): masked
    positions are set to zero after the stem, before and after every depthwise convolution
    (the only layer that mixes positions), and at the input of every Global Response Norm (the
    only one that pools over positions), so visible positions see exactly what a sparse
    convolution over the visible positions computes. Masks are on the final grid (one position
    per `stride` px, 32 for the standard stem), upsampled to each stage's grid. Weights keep
    timm's names under `model.`.
    """

    def __init__(self, model: nn.Module, img_size: int) -> None:
        super().__init__()
        if not all(hasattr(model, name) for name in ("stem", "stages", "feature_info")):
            raise TypeError(f"{type(model).__name__} is not a timm ConvNeXt (stem/stages)")
        self.model = model
        self.embed_dim = int(model.num_features)
        self.stride = self.patch_size = int(model.feature_info[-1]["reduction"])
        if img_size % self.stride:
            raise ValueError(f"model.img_size={img_size} is not a multiple of the ConvNeXt's stride {self.stride}")
        self.grid_size = (img_size // self.stride, img_size // self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self._visible: torch.Tensor | None = None  # (B, 1, h, w) at the final grid during a masked forward
        self._visible_at: dict[tuple[int, bool, torch.dtype], torch.Tensor] = {}  # that mask per grid, this forward
        model.stem.register_forward_hook(self._mask_output)
        for stage in model.stages:
            for block in stage.blocks:
                block.conv_dw.register_forward_pre_hook(self._mask_input)
                block.conv_dw.register_forward_hook(self._mask_output)
                grn = getattr(getattr(block, "mlp", None), "grn", None)
                if grn is not None:
                    grn.register_forward_pre_hook(self._mask_input)

    def _visible_like(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """The visible-position mask (1 = visible) at the grid of `x`: (B, 1, H, W) or (B, H, W, 1).

        Built once per grid, layout and dtype in a masked forward (every block of a stage asks for it
        two or three times)."""
        height = x.shape[1] if channels_last else x.shape[2]
        key = (height, channels_last, x.dtype)
        if key not in self._visible_at:
            visible = self._visible
            scale = height // visible.shape[2]
            up = visible.repeat_interleave(scale, 2).repeat_interleave(scale, 3).to(x.dtype)  # (B, 1, H, W)
            self._visible_at[key] = up.permute(0, 2, 3, 1) if channels_last else up
        return self._visible_at[key]

    def _mask_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if self._visible is None:
            return None
        channels_last = tuple(getattr(module, "spatial_dim", (2, 3))) == (1, 2)  # timm's GRN after a Linear
        return (args[0] * self._visible_like(args[0], channels_last), *args[1:])

    def _mask_output(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if self._visible is None:
            return None
        return out * self._visible_like(out, channels_last=False)  # the stem and depthwise convolutions: (B, C, H, W)

    def feature_map(self, images: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> the final map (B, D, H / stride, W / stride); with `mask` (B, N) over the final
        grid (True = masked), computed as on the visible regions only (masked positions hold no meaning)."""
        if mask is None:
            return self.model.forward_features(images)
        self._visible = (~mask.bool()).view(mask.shape[0], 1, *self.grid_size)
        try:
            return self.model.forward_features(images)
        finally:
            self._visible, self._visible_at = None, {}


class PooledBackbone(_TimmHeadBackbone):
    """Any timm model with a pooling head (num_classes=0): one feature vector per image.

    Its weights keep timm's names under `model.`. BatchNorm layers (ResNets) normalise over
    the global batch of all workers, as SimCLR's global BN and MoCo's SyncBatchNorm do
    (objectives.components.contrastive.SyncBatchNorm2d, on any backend): per-worker
    statistics of small local batches would also let a contrastive model cheat through them.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from objectives.components.contrastive import global_batchnorm

        if not hasattr(model, "forward_head") or not hasattr(model, "num_features"):
            raise TypeError(f"{type(model).__name__} is not a timm model with a pooling head (forward_head)")
        self.model = global_batchnorm(model)
        self.embed_dim = int(model.num_features)


def fused_attn_enabled(
    setting: bool | str, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> bool:
    """model.fused_attn for a run on `device` in `dtype`: "auto" is fused except in bf16 on a CPU."""
    if isinstance(setting, bool):
        return setting
    return not (device is not None and device.type == "cpu" and dtype == torch.bfloat16)


def set_fused_attn(root: nn.Module, enabled: bool) -> None:
    """Fused or explicit attention in every timm attention module under `root` (backbone, decoders, heads).

    timm's Attention decides per module, at creation, from a global setting; objectives build
    their own timm blocks (MAE's decoder, BEiT v2's aggregation head), so the run sets it on
    the whole objective module.
    """
    for module in root.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
