"""MaskDistill objective: a tiny student regresses a tiny saved teacher's LayerNorm-ed features."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from data.masks import block_patch_mask
from objectives.artifacts import save_encoder
from objectives.base import DataNeeds, MaskSpec, RunContext
from objectives.components.teacher import load_teacher
from objectives.configs import MaskDistillConfig, TeacherConfig
from objectives.maskdistill import MaskDistill, masked_feature_loss
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

ARCH = "vit_tiny_patch16_224"
STUDENT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# The teacher is narrower than the student, so the head really maps 32 -> 24 dims.
TEACHER = {**STUDENT, "embed_dim": 24}
PATCH, GRID = 8, 4  # 32 x 32 images: a 4 x 4 grid of 8 x 8 patches
N = GRID * GRID
MASKED_PER_IMAGE = round(N * 0.4)  # block masks hit the count exactly: 6 of 16


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0, **TEACHER)
    return save_encoder(model, tmp_path_factory.mktemp("teacher") / "tiny", ARCH, {**TEACHER, "num_classes": 0})


def make(teacher_dir: Path, **overrides: object) -> MaskDistill:
    # layer=1: the last of the tiny teacher's 2 blocks before the final norm, like layer=11 of CLIP ViT-B/16.
    teacher = TeacherConfig(source=str(teacher_dir), layer=1, normalize="layer_norm")
    torch.manual_seed(1)
    return MaskDistill(
        MaskDistillConfig(teacher=teacher, **overrides), build_backbone(ModelConfig(arch=ARCH, **STUDENT))
    )


def block_masks(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([block_patch_mask((GRID, GRID), gen, ratio=0.4) for _ in range(batch)])  # (B, N) bool


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def patch_pixels(b: int, i: int) -> tuple[int, slice, slice, slice]:
    """Index of the pixels of patch i (row-major) of image b."""
    row, col = divmod(i, GRID)
    return b, slice(None), slice(row * PATCH, (row + 1) * PATCH), slice(col * PATCH, (col + 1) * PATCH)


def teacher_by_hand(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of the teacher's last block, patch tokens only, no final norm: (B, N, D_t)."""
    with torch.no_grad():
        tokens = vit.patch_embed(x)
        tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + vit.pos_embed
        for block in vit.blocks:
            tokens = block(tokens)
        return tokens[:, 1:]


def student_by_hand(md: MaskDistill, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask token in place of each masked patch embedding, then the plain timm ViT and the head."""
    vit = md.backbone.vit
    with torch.no_grad():
        tokens = vit.patch_embed(x)  # (B, N, D)
        tokens = torch.where(mask.unsqueeze(-1), md.mask_token.expand_as(tokens), tokens)
        tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + vit.pos_embed
        for block in vit.blocks:
            tokens = block(tokens)
        return md.head(vit.norm(tokens)[:, 1:])


def loss_by_loop(pred: torch.Tensor, raw_target: torch.Tensor, mask: torch.Tensor, kind: str, beta: float) -> float:
    """The MaskDistill loss written out element by element in plain Python floats."""
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                continue
            t = raw_target[b, i].tolist()
            mean = sum(t) / len(t)
            var = sum((v - mean) ** 2 for v in t) / len(t)  # biased, as LayerNorm
            t = [(v - mean) / math.sqrt(var + 1e-5) for v in t]
            per = []
            for p, v in zip(pred[b, i].tolist(), t, strict=True):
                e = abs(p - v)
                if kind == "mse":
                    per.append(e * e)
                else:
                    per.append(0.5 * e * e / beta if e < beta else e - 0.5 * beta)
            total += sum(per) / len(per)
            count += 1
    return total / count


@pytest.mark.parametrize(("kind", "beta"), [("smooth_l1", 0.5), ("smooth_l1", 1.0), ("mse", 1.0)])
def test_loss_equals_a_loop_over_masked_patches(teacher_dir: Path, kind: str, beta: float) -> None:
    md = make(teacher_dir, loss=kind, smooth_l1_beta=beta)
    x, mask = images(3, 2), block_masks(3, 3)
    out = md({"views": [x], "mask": mask})
    teacher_vit = md.frozen_modules()["teacher"].model
    expected = loss_by_loop(student_by_hand(md, x, mask), teacher_by_hand(teacher_vit, x), mask, kind, beta)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert out.loss.dtype == torch.float32
    assert float(out.metrics["maskdistill/mask_ratio"]) == pytest.approx(MASKED_PER_IMAGE / N)


def test_unmasked_positions_do_not_enter_the_loss() -> None:
    gen = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, N, 5, generator=gen), torch.randn(2, N, 5, generator=gen)
    mask = block_masks(2, 5)
    base = masked_feature_loss(pred, target, mask)
    pred2, target2 = pred.clone(), target.clone()
    pred2[~mask], target2[~mask] = 1e6, float("nan")  # anything at visible positions
    assert torch.equal(masked_feature_loss(pred2, target2, mask), base)
    # ... while a change at one masked position does change it.
    b, i = mask.nonzero()[0].tolist()
    pred2[b, i] += 1.0
    assert not torch.equal(masked_feature_loss(pred2, target2, mask), base)


def test_student_never_sees_the_pixels_of_masked_patches(teacher_dir: Path) -> None:
    md = make(teacher_dir)
    x, mask = images(2, 6), block_masks(2, 7)
    perturbed = x.clone()
    for b, i in mask.nonzero().tolist():
        perturbed[patch_pixels(b, i)] = 10 * torch.randn(3, PATCH, PATCH)
    with torch.no_grad():
        assert torch.equal(md.predict(perturbed, mask), md.predict(x, mask))
        # The teacher sees the whole image, so its targets (and the loss) do move.
        teacher = md.frozen_modules()["teacher"]
        assert not torch.allclose(teacher(perturbed).patches, teacher(x).patches)
    # Zero gradient to every pixel of a masked patch, non-zero to the visible ones.
    x.requires_grad_(True)
    md.predict(x, mask).square().sum().backward()
    for b in range(2):
        for i in range(N):
            grad = x.grad[patch_pixels(b, i)]
            assert (float(grad.abs().sum()) == 0.0) == bool(mask[b, i]), (b, i)


def test_teacher_is_frozen_and_outside_the_trained_module(teacher_dir: Path) -> None:
    md = make(teacher_dir)
    teacher = md.frozen_modules()["teacher"]
    own = {id(p) for p in md.parameters()}
    assert all(id(p) not in own and not p.requires_grad for p in teacher.parameters())
    state = md.state_dict()
    assert not any(k.startswith("teacher") for k in state)
    assert state["mask_token"].shape == (1, 1, 32) and state["head.weight"].shape == (24, 32)
    md.train()
    assert not teacher.training
    md({"views": [images(2, 8)], "mask": block_masks(2, 9)}).loss.backward()
    assert md.mask_token.grad is not None and float(md.mask_token.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_run_context_and_a_prebuilt_teacher(teacher_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model(ARCH, num_classes=0, **TEACHER)
    clip_like = save_encoder(vit, tmp_path / "t", ARCH, {**TEACHER, "num_classes": 0}, mean=[0.5] * 3, std=[0.25] * 3)
    backbone = build_backbone(ModelConfig(arch=ARCH, **STUDENT))
    cfg = MaskDistillConfig(teacher=TeacherConfig(source=str(clip_like), layer=1, normalize="layer_norm"))
    # The run's data statistics reach the teacher, which re-normalises to its own (0.5, 0.25).
    md = MaskDistill(cfg, backbone, RunContext(input_mean=(0.0,) * 3, input_std=(1.0,) * 3))
    teacher = md.frozen_modules()["teacher"]
    assert teacher.renormalize
    assert torch.allclose(teacher.in_scale.flatten(), torch.full((3,), 4.0))
    assert torch.allclose(teacher.in_shift.flatten(), torch.full((3,), -2.0))
    # A teacher built by the caller is used as is (keyword-only, as VQ-KD).
    prebuilt = load_teacher(TeacherConfig(source=str(teacher_dir), layer=1, normalize="layer_norm"))
    given = RunContext(inputs={"teacher": prebuilt})
    assert MaskDistill(cfg, backbone, given).frozen_modules()["teacher"] is prebuilt


def test_loss_falls_on_a_fixed_batch(teacher_dir: Path) -> None:
    md = make(teacher_dir)
    batch = {"views": [images(8, 10)], "mask": block_masks(8, 11)}
    opt = torch.optim.AdamW(md.parameters(), lr=3e-3)
    losses, cosines = [], []
    for _ in range(30):
        out = md(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        cosines.append(float(out.metrics["maskdistill/cosine"]))
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    assert cosines[-1] > cosines[0] + 0.2


def test_mask_drawn_when_the_batch_has_none(teacher_dir: Path) -> None:
    md = make(teacher_dir)
    x = images(4, 12)
    torch.manual_seed(13)
    first = md({"views": [x]})
    torch.manual_seed(13)
    again = md({"views": [x]})
    assert float(first.metrics["maskdistill/mask_ratio"]) == pytest.approx(MASKED_PER_IMAGE / N)
    assert torch.equal(first.loss, again.loss)  # the mask comes from torch's (seeded) global RNG


def test_registry_data_needs_and_config_problems(teacher_dir: Path) -> None:
    assert get_objective_class("maskdistill") is MaskDistill
    cfg = MaskDistillConfig()
    assert cfg.problems() == []
    assert (cfg.mask_ratio, cfg.loss, cfg.teacher.normalize, cfg.teacher.project) == (
        0.4,
        "smooth_l1",
        "layer_norm",
        False,
    )
    assert MaskDistill.data_needs(cfg) == DataNeeds(views=1, mask=MaskSpec("block", 0.4))
    bad = MaskDistillConfig(mask_ratio=1.0, loss="l3", smooth_l1_beta=0.0, teacher=TeacherConfig(source="s3://x/t"))
    assert {key for key, _ in bad.problems()} == {
        "objective.mask_ratio",
        "objective.loss",
        "objective.smooth_l1_beta",
        "objective.teacher.source",
    }
    assert [k for k, _ in MaskDistillConfig(mask_ratio=0.0).problems()] == ["objective.mask_ratio"]
    # The paper default layer=11 does not exist in a 2-block teacher: a clear error, not a silent pick.
    with pytest.raises(ValueError, match="layer 11 out of range"):
        MaskDistill(
            MaskDistillConfig(teacher=TeacherConfig(source=str(teacher_dir), normalize="layer_norm", layer=11)),
            build_backbone(ModelConfig(arch=ARCH, **STUDENT)),
        )
    with pytest.raises(ValueError, match="patch grid"):
        MaskDistill(
            MaskDistillConfig(teacher=TeacherConfig(source=str(teacher_dir), layer=1, normalize="layer_norm")),
            build_backbone(ModelConfig(arch=ARCH, **{**STUDENT, "patch_size": 4})),
        )
