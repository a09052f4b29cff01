"""VQ-KD objective: a tiny encoder distils a tiny saved teacher through the EMA codebook."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from objectives.artifacts import save_encoder
from objectives.configs import TeacherConfig, VQKDConfig
from objectives.vqkd import VQKD, cosine_distance
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY)
    return save_encoder(
        model, tmp_path_factory.mktemp("teacher") / "tiny", "vit_tiny_patch16_224", {**TINY, "num_classes": 0}
    )


def make(teacher_dir: Path, **overrides: object) -> VQKD:
    cfg = VQKDConfig(
        teacher=TeacherConfig(source=str(teacher_dir)),
        num_codes=16,
        code_dim=8,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
        **overrides,
    )
    torch.manual_seed(1)
    model = ModelConfig(arch="vit_tiny_patch16_224", **TINY)
    return VQKD(cfg, build_backbone(model))


def test_cosine_distance_by_hand() -> None:
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, -1.0]]])
    # cosines: 1/sqrt(2) and -1 -> mean of (1 - cos) = (1 - 0.7071 + 2) / 2
    assert float(cosine_distance(pred, target)) == pytest.approx((1 - 2**-0.5 + 2) / 2)


def test_teacher_is_frozen_and_outside_the_trained_module(teacher_dir: Path) -> None:
    vqkd = make(teacher_dir)
    teacher = vqkd.frozen_modules()["teacher"]
    own = {id(p) for p in vqkd.parameters()}
    assert all(id(p) not in own and not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in vqkd.state_dict())
    assert "quantizer.codebook" in vqkd.state_dict()  # the codebook travels with checkpoints


def test_loss_falls_codes_are_used_and_tokenizer_is_read_only(teacher_dir: Path) -> None:
    vqkd = make(teacher_dir)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    batch = {"views": [images]}
    opt = torch.optim.AdamW([p for p in vqkd.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        out = vqkd(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    # 16 codes cannot reproduce every patch's teacher feature; the fit still improves clearly.
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
    assert {"vqkd/rec_loss", "vqkd/commit_loss", "vqkd/codebook_usage", "vqkd/perplexity", "vqkd/dead_codes"} <= set(
        out.metrics
    )
    assert 0 < float(out.metrics["vqkd/codebook_usage"]) <= 1
    # The tokenizer: ids of the nearest codes, the same as a training forward assigns, codebook untouched.
    vqkd.eval()
    before = vqkd.quantizer.codebook.clone()
    codes = vqkd.codes(images)
    assert codes.shape == (8, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert torch.equal(vqkd.quantizer(vqkd.encode(images).float()).codes, codes)
    assert torch.equal(vqkd.quantizer.codebook, before)


def test_gradient_reaches_the_encoder_through_the_codebook(teacher_dir: Path) -> None:
    vqkd = make(teacher_dir)
    out = vqkd({"views": [torch.randn(4, 3, 32, 32)]})
    out.loss.backward()
    enc = vqkd.backbone.vit.blocks[0].attn.qkv.weight.grad
    assert enc is not None and float(enc.abs().sum()) > 0  # straight-through estimator


def test_config_problems_and_grid_mismatch(teacher_dir: Path) -> None:
    bad = VQKDConfig(decay=1.5, decoder_embed_dim=10, decoder_num_heads=4, teacher=TeacherConfig(source="s3://x/t"))
    keys = {key for key, _ in bad.problems()}
    assert {"objective.decay", "objective.decoder_num_heads", "objective.teacher.source"} <= keys
    cfg = VQKDConfig(teacher=TeacherConfig(source=str(teacher_dir)), num_codes=16, code_dim=8, decoder_embed_dim=16)
    other_grid = ModelConfig(arch="vit_tiny_patch16_224", **{**TINY, "patch_size": 4})
    with pytest.raises(ValueError, match="patch grid"):
        VQKD(cfg, build_backbone(other_grid))
