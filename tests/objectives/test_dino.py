"""DINO objective: the loss, centring, head and KoLeo against hand-written loops; multi-crop through a ViT;
the EMA teacher; attention maps against timm's own attention; centring over two gloo ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from data.needs import DataNeeds, MaskSpec
from objectives.base import RunContext
from objectives.configs import DINOConfig, ViewAugmentConfig
from objectives.dino import DINO, DINOHead, cls_attention, dino_cross_entropy, koleo
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

TINY = ModelConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
OFF = ViewAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def make(**overrides: object) -> DINO:
    torch.manual_seed(0)
    cfg = DINOConfig(
        out_dim=64,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        local_views=2,
        local_size=16,
        global1=OFF,
        global2=OFF,
        local=OFF,
        **overrides,
    )
    return DINO(cfg, build_backbone(TINY), RunContext(total_steps=20))


def batch(b: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "views": [torch.randn(b, 3, 32, 32, generator=gen) for _ in range(2)]
        + [torch.randn(b, 3, 16, 16, generator=gen) for _ in range(2)]
    }


def test_cross_entropy_over_pairs_of_different_crops_by_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, generator=gen) for _ in range(4)]  # 2 global + 2 local crops
    teacher = [torch.randn(2, 5, generator=gen) for _ in range(2)]
    center = torch.randn(1, 5, generator=gen)
    loss, _, _ = dino_cross_entropy(student, teacher, center, 0.1, 0.04)

    def softmax(row: list[float]) -> list[float]:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        return [v / sum(e) for v in e]

    total, terms = 0.0, 0
    for i in range(2):
        for v in range(4):
            if v == i:
                continue
            pair = 0.0
            for b in range(2):
                t = softmax([(x - c) / 0.04 for x, c in zip(teacher[i][b].tolist(), center[0].tolist(), strict=True)])
                s = softmax([x / 0.1 for x in student[v][b].tolist()])
                pair += -sum(ti * math.log(si) for ti, si in zip(t, s, strict=True))
            total += pair / 2
            terms += 1
    assert terms == 6 and float(loss) == pytest.approx(total / terms, rel=1e-5)


def test_head_rows_have_norm_one_and_the_frozen_last_layer_gets_no_gradient() -> None:
    torch.manual_seed(0)
    head = DINOHead(8, 12, hidden=16, bottleneck=4, layers=3)
    x = torch.randn(5, 8)
    out = head(x)
    z = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(out, z @ F.normalize(head.last_layer, dim=-1).T)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    head(x, freeze_last=True).sum().backward()
    assert head.last_layer.grad is None and head.mlp[0].weight.grad is not None


def test_koleo_by_loop() -> None:
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    expected = 0.0
    for i in range(4):
        d = min(math.dist(x[i].tolist(), x[j].tolist()) for j in range(4) if j != i)
        expected += -math.log(d + 1e-8)
    assert float(koleo(x)) == pytest.approx(expected / 4, rel=1e-5)


def test_forward_by_hand_with_the_center_update_and_the_teacher_temperature_warmup() -> None:
    model = make(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_fraction=0.5).train()
    assert [model.teacher_temp(s) for s in (0, 5, 10, 15)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    data = batch(3, 1)
    out = model(data)
    with torch.no_grad():
        crops = model.crops(data)  # every photometric op off: only the clamp to valid pixels
        g = torch.cat(crops[:2])
        student = model.head(torch.cat([model.backbone(g)[:, 0], model.backbone(torch.cat(crops[2:]))[:, 0]]))
        teacher = model.head(model.backbone(g)[:, 0])  # the teacher starts as a copy of the student
    expected, _, _ = dino_cross_entropy(list(student.split(3)), list(teacher.split(3)), torch.zeros(1, 64), 0.1, 0.04)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    torch.testing.assert_close(model.center, 0.1 * teacher.mean(dim=0, keepdim=True), rtol=1e-4, atol=1e-6)
    # The teacher is made of buffers; the student's last layer is frozen for the first step (1% of 20 -> step 0).
    assert not list(model.teacher.parameters())
    out.loss.backward()
    assert model.head.last_layer.grad is None and model.backbone.vit.blocks[0].attn.qkv.weight.grad is not None
    model.after_step(0)
    assert model(batch(3, 2)).loss.requires_grad
    assert float(model.current_momentum) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 20)) * 0.004)


def test_local_crops_use_the_resampled_position_embedding_as_timm_does() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(TINY)
    dynamic = timm.create_model(
        TINY.arch, img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
    ).eval()
    dynamic.load_state_dict(backbone.vit.state_dict())
    small = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(backbone.eval()(small), dynamic.forward_features(small))


def test_cls_attention_is_timms_last_block_attention() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(TINY).eval()
    images = torch.randn(2, 3, 32, 32)
    captured = {}
    last = backbone.vit.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("attn", i[0]))
    backbone(images)
    expected = captured["attn"][:, :, 0, 1:]  # (B, heads, N): the CLS query over the patch keys
    torch.testing.assert_close(cls_attention(backbone, images), expected)


def test_the_student_learns_a_fixed_teachers_targets(train_on_batch) -> None:
    """A teacher held still (momentum 1, centre momentum 1): the student's cross-entropy to its targets
    falls. (With the teacher and centre moving, DINO's loss on a fixed batch need not fall: centring
    spreads the teacher's targets, raising their entropy.)"""
    model = make(freeze_last_layer_fraction=0.0, momentum_teacher=1.0, center_momentum=1.0).train()
    data = batch(8, 3)
    losses, out = train_on_batch(model, data, 20, lr=1e-3)
    assert train_on_batch.falls(losses), losses


def test_registry_multi_crop_needs_config_and_pictures() -> None:
    assert get_objective_class("dino") is DINO
    assert DINO.data_needs(DINOConfig()) == DataNeeds(views=2, local_views=8, local_size=96, local_scale=(0.05, 0.4))
    bad = DINOConfig(out_dim=0, local_scale=[0.5, 0.2], teacher_temp=0.0, freeze_last_layer_fraction=1.0)
    assert [k for k, _ in bad.problems()] == [
        "objective.out_dim",
        "objective.local_scale",
        "objective.teacher_temp",
        "objective.freeze_last_layer_fraction",
    ]
    picture = make().eval().pictures(batch(3, 4))["dino_attention"]
    assert picture.shape == (2 + 3 * (128 + 2), 2 + 3 * (128 + 2), 3)  # image + one map per head (2)


def _center_rank(rank: int, world: int, out_dir: str) -> None:
    model = make()
    gen = torch.Generator().manual_seed(7)
    outputs = [torch.randn(4, 64, generator=gen) for _ in range(2 * world)]  # every rank draws all
    mine = outputs[2 * rank : 2 * rank + 2]
    model.update_center(mine)
    torch.save(model.center.clone(), Path(out_dir) / f"center{rank}.pt")


def test_centring_over_two_ranks_equals_one_process_on_both_batches(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_center_rank, 2, 2, str(tmp_path))
    gen = torch.Generator().manual_seed(7)
    everything = torch.cat([torch.randn(4, 64, generator=gen) for _ in range(4)])
    expected = 0.1 * everything.mean(dim=0, keepdim=True)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"center{rank}.pt", weights_only=True), expected)


# --- iBOT ---------------------------------------------------------------------------------------


def make_ibot(**overrides: object):
    from objectives.configs import IBOTConfig
    from objectives.dino import IBOT

    torch.manual_seed(0)
    overrides = {"patch_out_dim": 32, **overrides}
    cfg = IBOTConfig(
        out_dim=64,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
        local_views=2,
        local_size=16,
        global1=OFF,
        global2=OFF,
        local=OFF,
        **overrides,
    )
    return IBOT(cfg, build_backbone(TINY), RunContext(total_steps=20))


def ibot_masks(b: int) -> torch.Tensor:
    masks = torch.zeros(b, 2, 64, dtype=torch.bool)
    masks[:, 0, :20] = True
    masks[:, 1, 30:40] = True
    masks[0, 1] = False  # an image without masked patches counts 0, not NaN
    return masks


def test_masked_patch_distillation_by_loop_and_only_masked_positions_count() -> None:
    from objectives.dino import masked_patch_distillation

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    center = torch.randn(1, 1, 4, generator=gen)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    loss = masked_patch_distillation(s, t, mask, center, 0.1, 0.07)
    total = 0.0
    for n in (0, 2):
        tt = torch.softmax((t[0, n] - center[0, 0]) / 0.07, dim=-1).tolist()
        ls = torch.log_softmax(s[0, n] / 0.1, dim=-1).tolist()
        total += -sum(a * b for a, b in zip(tt, ls, strict=True))
    assert float(loss) == pytest.approx((total / 2 + 0.0) / 2, rel=1e-5)  # image 2 masks nothing: 0
    s2 = s.clone()
    s2[0, 1] += 100.0  # an unmasked position
    assert torch.equal(masked_patch_distillation(s2, t, mask, center, 0.1, 0.07), loss)


def test_ibot_forward_by_hand() -> None:
    from objectives.dino import masked_patch_distillation

    model = make_ibot(freeze_last_layer_fraction=0.0).train()
    assert [model.patch_temp(s) for s in (0, 3, 6, 10)] == pytest.approx([0.04, 0.055, 0.07, 0.07])  # 30% of 20
    data = {**batch(3, 1), "mask": ibot_masks(3)}
    out = model(data)
    with torch.no_grad():
        crops = model.crops(data)
        g = torch.cat(crops[:2])
        z = F.normalize(model.head.mlp(model.backbone(g)), dim=-1)
        t_cls = z[:, 0] @ F.normalize(model.head.last_layer, dim=-1).T
        t_patch = z[:, 1:] @ F.normalize(model.patch_last_layer, dim=-1).T
        s_cls, s_patch = [], []
        for i in range(2):
            tokens = model.backbone.encode(
                model.backbone.embed_patches(crops[i], mask=data["mask"][:, i], mask_token=model.mask_token)
            ).tokens
            zs = F.normalize(model.head.mlp(tokens), dim=-1)
            s_cls.append(zs[:, 0] @ F.normalize(model.head.last_layer, dim=-1).T)
            s_patch.append(zs[:, 1:] @ F.normalize(model.patch_last_layer, dim=-1).T)
        local = model.head(model.backbone(torch.cat(crops[2:]))[:, 0])
        cls_loss, _, _ = dino_cross_entropy(
            s_cls + list(local.split(3)), list(t_cls.split(3)), torch.zeros(1, 64), 0.1, 0.04
        )
        patch_loss = (
            sum(
                masked_patch_distillation(
                    s_patch[i], t_patch.split(3)[i], data["mask"][:, i], torch.zeros(1, 1, 32), 0.1, 0.04
                )
                for i in range(2)
            )
            / 2
        )
    assert float(out.metrics["ibot/cls"]) == pytest.approx(float(cls_loss), rel=1e-4)
    assert float(out.metrics["ibot/patch"]) == pytest.approx(float(patch_loss), rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(float(cls_loss + patch_loss), rel=1e-4)
    torch.testing.assert_close(model.center_patch, 0.1 * t_patch.mean(dim=(0, 1), keepdim=True), rtol=1e-4, atol=1e-6)
    out.loss.backward()
    assert model.mask_token.grad.abs().sum() > 0 and model.patch_last_layer.grad.abs().sum() > 0
    before = model.teacher.get_buffer("patch.weight").clone()
    with torch.no_grad():
        model.patch_last_layer.add_(1.0)
    model.after_step(0)  # the teacher's patch layer follows the student's by the momentum
    m = float(model.current_momentum)
    torch.testing.assert_close(
        model.teacher.get_buffer("patch.weight"), m * before + (1 - m) * model.patch_last_layer.detach()
    )


def test_ibot_needs_a_block_mask_per_global_crop_and_its_config() -> None:
    from objectives.configs import IBOTConfig
    from objectives.dino import IBOT

    assert get_objective_class("ibot") is IBOT
    needs = IBOT.data_needs(IBOTConfig())
    assert (needs.views, needs.local_views, needs.mask) == (2, 0, MaskSpec("block", 0.3, count=2))
    bad = IBOTConfig(shared_head=True, patch_out_dim=100, pred_ratio=0.0, lambda2=-1.0)
    assert [k for k, _ in bad.problems()] == ["objective.shared_head", "objective.pred_ratio", "objective.lambda2"]
    shared = make_ibot(patch_out_dim=64, shared_head=True)
    assert not hasattr(shared, "patch_last_layer")
    assert torch.isfinite(shared({**batch(2, 5), "mask": ibot_masks(2)}).loss)


def test_ibot_student_learns_a_fixed_teacher(train_on_batch) -> None:
    model = make_ibot(freeze_last_layer_fraction=0.0, momentum_teacher=1.0, center_momentum=1.0).train()
    data = {**batch(8, 3), "mask": ibot_masks(8)}
    losses, out = train_on_batch(model, data, 20, lr=1e-3)
    assert train_on_batch.falls(losses), losses
