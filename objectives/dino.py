"""DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021).

Self-distillation without labels. A student sees 2 global and several small local crops of
each image; an EMA teacher sees the 2 global crops. Both map a crop's [CLS] token through a
projection head to `out_dim` prototype scores; the student's softmax at temperature 0.1
matches the teacher's, centred (a running mean of the teacher's outputs over all ranks is
subtracted) and sharpened (temperature 0.04), on every pair of different crops:

    t_i = softmax((g_teacher(x_i) - c) / tau_t),  i in the 2 global crops     # no gradient
    s_v = log_softmax(g_student(x_v) / tau_s),    v in all crops
    loss = mean over pairs (i, v), v != i, of mean over images of -sum_k t_i[k] s_v[k]
    c <- 0.9 c + 0.1 mean(g_teacher(x_i))

Centring keeps one prototype from dominating, sharpening keeps the outputs from going
uniform: the two ways to collapse, watched by `dino/teacher_entropy` (0 or log(out_dim) is
collapse) and `dino/kl` (teacher to student). Recipe from facebookresearch/dino; see `DINOConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.needs import DataNeeds, MaskSpec
from objectives.base import LossOutput, Objective, RunContext
from objectives.components.augment import ViewAugment
from objectives.components.backbone import VitBackbone
from objectives.components.contrastive import world_size
from objectives.components.ema import buffer_copy, momentum_at, momentum_update
from objectives.components.pictures import MAX_IMAGES, display_scale, grid, heat_map, to_uint8_images
from objectives.components.zero import gathered_outside_forward
from objectives.configs import DINOConfig, IBOTConfig
from objectives.registry import register

GLOBAL_VIEWS = 2


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck, l2-normalised -> a linear layer whose rows have norm 1 -> prototype scores."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden: int, bottleneck: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden), nn.GELU()]
            dim = hidden
        mods.append(nn.Linear(dim, bottleneck))
        self.mlp = nn.Sequential(*mods)
        # weight_norm(Linear(bottleneck, out_dim, bias=False)) with weight_g fixed to 1 (norm_last_layer):
        # only the direction of each row is learnt.
        self.last_layer = nn.Parameter(torch.empty(out_dim, bottleneck))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.last_layer, std=0.02)

    def forward(self, x: torch.Tensor, *, freeze_last: bool = False) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim); freeze_last: no gradient into the last layer."""
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        weight = F.normalize(self.last_layer, dim=-1, eps=1e-6)
        return F.linear(x, weight.detach() if freeze_last else weight)


def dino_cross_entropy(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DINOLoss: student outputs of every crop (V tensors (B, K)), teacher outputs of the global crops
    (2 tensors (B, K)), centre (1, K) -> (loss, teacher probabilities (2, B, K), student log-probs (V, B, K))."""
    log_s = torch.stack([F.log_softmax(s.float() / student_temp, dim=-1) for s in student])  # (V, B, K)
    t = torch.stack([F.softmax((x.float() - center) / teacher_temp, dim=-1) for x in teacher]).detach()  # (2, B, K)
    total, terms = log_s.new_zeros(()), 0
    for i in range(t.shape[0]):
        for v in range(log_s.shape[0]):
            if v == i:
                continue  # the same global crop
            total = total + torch.sum(-t[i] * log_s[v], dim=-1).mean()
            terms += 1
    return total / terms, t, log_s


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (DINOv2): -mean log of each l2-normalised feature's distance to its nearest other one in the batch."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(-2.0)
        nearest = sims.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


@register("dino", DINOConfig)
class DINO(Objective):
    """Student (backbone + DINOHead) on all crops against an EMA teacher on the global ones."""

    def __init__(self, cfg: DINOConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        self.head = DINOHead(
            backbone.embed_dim,
            cfg.out_dim,
            hidden=cfg.head_hidden_dim,
            bottleneck=cfg.head_bottleneck_dim,
            layers=cfg.head_layers,
        )
        # Teacher: backbone + head as float32 buffers (checkpointed, never optimised or partitioned).
        self.teacher = buffer_copy(self._student())
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("current_momentum", torch.tensor(float(cfg.momentum_teacher)))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.total_steps = cfg.total_steps or int(self.context.total_steps or 0)
        if self.total_steps < 1:
            raise ValueError(
                "objective.total_steps: the teacher's momentum schedule needs the run's length; set "
                "objective.total_steps or pass RunContext(total_steps=...)"
            )
        mean, std = self.context.input_mean, self.context.input_std
        self.augment = [ViewAugment(cfg.global1, mean, std), ViewAugment(cfg.global2, mean, std)]
        self.augment_local = ViewAugment(cfg.local, mean, std)

    @classmethod
    def data_needs(cls, cfg: DINOConfig) -> DataNeeds:
        return DataNeeds(
            views=GLOBAL_VIEWS,
            local_views=cfg.local_views,
            local_size=cfg.local_size,
            local_scale=(float(cfg.local_scale[0]), float(cfg.local_scale[1])),
        )

    def _student(self) -> nn.ModuleDict:
        return nn.ModuleDict({"backbone": self.backbone, "head": self.head})

    def teacher_temp(self, step: int) -> float:
        cfg = self.cfg
        warmup = cfg.warmup_teacher_temp_fraction * self.total_steps
        if step >= warmup:
            return cfg.teacher_temp
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup

    def crops(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The photometrically augmented crops: 2 global (B, 3, S, S), then the local ones (B, 3, s, s)."""
        views = batch["views"]
        if len(views) < GLOBAL_VIEWS:
            raise ValueError(f"dino needs {GLOBAL_VIEWS} global crops, the batch has {len(views)} views")
        out = [self.augment[i](views[i]) for i in range(GLOBAL_VIEWS)]
        return out + [self.augment_local(v) for v in views[GLOBAL_VIEWS:]]

    def student_outputs(
        self, crops: list[torch.Tensor], *, freeze_last: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Head outputs per crop (B, K) and the global crops' CLS features (2B, D); one forward per crop size."""
        b = crops[0].shape[0]
        cls_global = self.backbone.pooled(torch.cat(crops[:GLOBAL_VIEWS]))  # (2B, D)
        features = [cls_global]
        if len(crops) > GLOBAL_VIEWS:
            features.append(self.backbone.pooled(torch.cat(crops[GLOBAL_VIEWS:])))  # (L B, D)
        out = self.head(torch.cat(features), freeze_last=freeze_last)
        return list(out.split(b)), cls_global

    @torch.no_grad()
    def teacher_outputs(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher's head outputs of the global crops, 2 x (B, K), in float32."""
        b = crops[0].shape[0]
        images = torch.cat(crops[:GLOBAL_VIEWS]).float()
        return list(self.teacher["head"](self.teacher["backbone"].pooled(images)).split(b))

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        """c <- m c + (1 - m) mean of the teacher outputs over all ranks' global crops."""
        out = torch.cat(teacher)
        batch_sum = out.sum(dim=0, keepdim=True)
        count = torch.tensor(float(out.shape[0]), device=out.device)
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_sum / count, alpha=1 - m)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        step = int(self.steps_done)
        crops = self.crops(batch)
        teacher = self.teacher_outputs(crops)
        freeze = step < self.cfg.freeze_last_layer_fraction * self.total_steps
        student, cls_global = self.student_outputs(crops, freeze_last=freeze)
        temp = self.teacher_temp(step)
        loss, t, log_s = dino_cross_entropy(student, teacher, self.center, self.cfg.student_temp, temp)
        metrics = {"dino/ce": loss.detach(), "dino/teacher_temp": torch.tensor(temp)}
        if self.cfg.koleo_weight > 0:
            reg = sum(koleo(c) for c in cls_global.split(crops[0].shape[0])) / GLOBAL_VIEWS
            loss = loss + self.cfg.koleo_weight * reg
            metrics["dino/koleo"] = reg.detach()
        with torch.no_grad():
            entropy = -(t * torch.log(t.clamp_min(1e-12))).sum(dim=-1).mean()
            kl = (t * (torch.log(t.clamp_min(1e-12)) - log_s[:GLOBAL_VIEWS].flip(0))).sum(dim=-1).mean()
            metrics.update(
                {
                    "dino/teacher_entropy": entropy,  # 0: one prototype wins; log(out_dim): uniform
                    "dino/kl": kl,  # teacher -> student on the other global crop
                    "dino/momentum": self.current_momentum.detach().clone(),
                }
            )
        if self.training:
            self.update_center(teacher)
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Teacher <- m teacher + (1 - m) student after every optimizer step (m: half cosine to 1)."""
        m = momentum_at(step + 1, self.total_steps, self.cfg.momentum_teacher)
        momentum_update(self._student(), self.teacher, m)
        self.current_momentum.fill_(m)
        self.steps_done.fill_(step + 1)

    @torch.no_grad()
    def pictures(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """`dino_attention`: per image, the first global crop and the last block's [CLS] attention over
        the patches, one heat map per head (the paper's Fig. 1; each map min-max scaled)."""
        images = batch["views"][0][:MAX_IMAGES]
        with gathered_outside_forward(self):
            attention = cls_attention(self.backbone, images).float().cpu().numpy()  # (B, heads, N)
        gh, gw = self.backbone.grid_size
        cell = self.backbone.patch_size
        original = to_uint8_images(images, self.context.input_mean, self.context.input_std)
        rows = [
            [original[i], *(heat_map(a.reshape(gh, gw), cell) for a in attention[i])] for i in range(original.shape[0])
        ]
        return {"dino_attention": grid(rows, scale=display_scale(images.shape[-1]))}


def cls_attention(backbone: VitBackbone, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> the last block's attention of the [CLS] query over the patch keys: (B, heads, N)."""
    vit = backbone.vit
    x = backbone.embed_patches(images)
    x = torch.cat([backbone._prefix_tokens(x.shape[0]), x], dim=1)
    x = vit.norm_pre(vit.pos_drop(x))
    for block in vit.blocks[:-1]:
        x = block(x)
    last = vit.blocks[-1]
    attn = last.attn
    h = last.norm1(x)
    b, n, d = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # (B, heads, n, d_h)
    weights = torch.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1), dim=-1)  # (B, heads, 1, n)
    return weights[:, :, 0, backbone.num_prefix_tokens :]


def masked_patch_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """iBOT's patch loss for one global crop: student patch outputs (B, N, K) of the masked crop, teacher's
    (B, N, K) of the intact one, mask (B, N) -> mean over images of (sum over masked patches of
    -sum_k t[k] log s[k]) / (masked patches of the image, at least 1)."""
    t = F.softmax((teacher.float() - center) / teacher_temp, dim=-1).detach()
    per_patch = torch.sum(-t * F.log_softmax(student.float() / student_temp, dim=-1), dim=-1)  # (B, N)
    m = mask.float()
    return (torch.sum(per_patch * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)).mean()


@register("ibot", IBOTConfig)
class IBOT(DINO):
    """DINO's [CLS] loss on all crop pairs + masked-patch self-distillation on the same global crop."""

    def __init__(self, cfg: IBOTConfig, backbone: VitBackbone, context: RunContext | None = None) -> None:
        super().__init__(cfg, backbone, context)
        width = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if not cfg.shared_head:
            # A second last layer for the patch tokens after the shared MLP (iBOTHead last_layer2).
            self.patch_last_layer = nn.Parameter(torch.empty(cfg.patch_out_dim, cfg.head_bottleneck_dim))
            nn.init.trunc_normal_(self.patch_last_layer, std=0.02)
        self.teacher = buffer_copy(self._student())
        self.register_buffer("center_patch", torch.zeros(1, 1, cfg.patch_out_dim))

    @classmethod
    def data_needs(cls, cfg: IBOTConfig) -> DataNeeds:
        needs = super().data_needs(cfg)
        # One block-wise mask per global crop (ImageFolderMask, pred_shape block).
        return dataclasses.replace(needs, mask=MaskSpec("block", cfg.pred_ratio, count=GLOBAL_VIEWS))

    def _student(self) -> nn.ModuleDict:
        parts = {"backbone": self.backbone, "head": self.head}
        if hasattr(self, "patch_last_layer"):
            parts["patch"] = _Holder(self.patch_last_layer)
        return nn.ModuleDict(parts)

    def patch_temp(self, step: int) -> float:
        cfg = self.cfg
        warmup = cfg.warmup_teacher_temp_fraction * self.total_steps
        if step >= warmup:
            return cfg.teacher_patch_temp
        return cfg.warmup_teacher_patch_temp + (cfg.teacher_patch_temp - cfg.warmup_teacher_patch_temp) * step / warmup

    @staticmethod
    def _heads(
        parts: nn.ModuleDict, tokens: torch.Tensor, *, freeze_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + N, D) final tokens -> ([CLS] scores (B, K), patch scores (B, N, K2)) through one MLP."""
        head = parts["head"]
        z = F.normalize(head.mlp(tokens), dim=-1, eps=1e-6)  # (B, 1 + N, bottleneck)
        last = F.normalize(head.last_layer, dim=-1, eps=1e-6)
        last = last.detach() if freeze_last else last
        patch_last = F.normalize(parts["patch"].weight, dim=-1, eps=1e-6) if "patch" in parts else last
        if freeze_last and "patch" in parts:
            patch_last = patch_last.detach()
        return F.linear(z[:, 0], last), F.linear(z[:, 1:], patch_last)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        cfg, step = self.cfg, int(self.steps_done)
        crops = self.crops(batch)
        masks = self.batch_mask(batch)  # (B, 2, N): True = masked, one per global crop
        b = crops[0].shape[0]
        with torch.no_grad():
            teacher_tokens = self.teacher["backbone"](torch.cat(crops[:GLOBAL_VIEWS]).float())
            t_cls, t_patch = self._heads(self.teacher, teacher_tokens)
        freeze = step < cfg.freeze_last_layer_fraction * self.total_steps
        student_cls, student_patch = [], []
        for i in range(GLOBAL_VIEWS):  # masked global crops: the mask token replaces the masked patch embeddings
            tokens = self.backbone.encode(
                self.backbone.embed_patches(crops[i], mask=masks[:, i], mask_token=self.mask_token)
            ).tokens
            s_cls, s_patch = self._heads(self._student(), tokens, freeze_last=freeze)
            student_cls.append(s_cls)
            student_patch.append(s_patch)
        if len(crops) > GLOBAL_VIEWS:
            local = self.backbone.pooled(torch.cat(crops[GLOBAL_VIEWS:]))
            student_cls += list(self.head(local, freeze_last=freeze).split(b))
        temp, patch_temp = self.teacher_temp(step), self.patch_temp(step)
        loss_cls, t, log_s = dino_cross_entropy(student_cls, list(t_cls.split(b)), self.center, cfg.student_temp, temp)
        t_patch_crops = t_patch.split(b)
        loss_patch = (
            sum(
                masked_patch_distillation(
                    student_patch[i], t_patch_crops[i], masks[:, i], self.center_patch, cfg.student_temp, patch_temp
                )
                for i in range(GLOBAL_VIEWS)
            )
            / GLOBAL_VIEWS
        )
        loss = cfg.lambda1 * loss_cls + cfg.lambda2 * loss_patch
        with torch.no_grad():
            entropy = -(t * torch.log(t.clamp_min(1e-12))).sum(dim=-1).mean()
            metrics = {
                "ibot/cls": loss_cls.detach(),
                "ibot/patch": loss_patch.detach(),
                "ibot/teacher_entropy": entropy,
                "ibot/mask_ratio": masks.float().mean(),
                "ibot/momentum": self.current_momentum.detach().clone(),
            }
        if self.training:
            self.update_center(list(t_cls.split(b)))
            self._update_patch_center(t_patch)
        return LossOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def _update_patch_center(self, t_patch: torch.Tensor) -> None:
        total = t_patch.float().sum(dim=(0, 1), keepdim=True)
        count = torch.tensor(float(t_patch.shape[0] * t_patch.shape[1]), device=t_patch.device)
        if world_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
            dist.all_reduce(count)
        m = self.cfg.center_momentum
        self.center_patch.mul_(m).add_(total / count, alpha=1 - m)


class _Holder(nn.Module):
    """A module around one parameter (so a bare last layer joins the EMA teacher's ModuleDict)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
