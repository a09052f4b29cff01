"""SemAIM: the semantic order, the two-stream masks, blurred targets and causality (tiny models, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from objectives.artifacts import save_encoder
from objectives.base import DataNeeds, RunContext
from objectives.configs import SemAIMConfig, TeacherConfig
from objectives.registry import get_objective_class
from objectives.semaim import (
    SemAIM,
    centre_out_keys,
    cls_patch_similarity,
    gaussian_blur,
    masked_block,
    order_ranks,
    two_stream_masks,
)
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TEACHER = {**TINY, "embed_dim": 24}  # narrower than the student: the head really maps 32 -> 24
PATCH, GRID = 8, 4  # 32 x 32 images: a 4 x 4 grid of 8 x 8 patches
N = GRID * GRID


def make(seed: int = 1, model: dict | None = None, **overrides: object) -> SemAIM:
    torch.manual_seed(seed)
    return SemAIM(SemAIMConfig(**overrides), build_backbone(ModelConfig(arch=ARCH, **(model or TINY))))


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def patch_pixels(b: int, i: int) -> tuple[int, slice, slice, slice]:
    """Index of the pixels of patch i (row-major) of image b."""
    row, col = divmod(i, GRID)
    return b, slice(None), slice(row * PATCH, (row + 1) * PATCH), slice(col * PATCH, (col + 1) * PATCH)


def random_ranks(batch: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)])  # (B, N): a permutation each


def ranks_by_loop(keys: torch.Tensor) -> torch.Tensor:
    """Position of each patch in the order: how many patches have a smaller key."""
    out = torch.zeros(keys.shape, dtype=torch.long)
    for b in range(keys.shape[0]):
        for i in range(keys.shape[1]):
            out[b, i] = sum(1 for j in range(keys.shape[1]) if keys[b, j] < keys[b, i])
    return out


# --- masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [1, 2])
def test_masks_match_a_brute_force_construction(prefix: int) -> None:
    rank = random_ranks(3, 9, seed=0)
    content, query = two_stream_masks(rank, prefix)
    assert content.shape == query.shape == (3, 1, prefix + 9, prefix + 9)
    assert content.dtype == query.dtype == torch.bool
    for b in range(3):
        for i in range(prefix + 9):
            for j in range(prefix + 9):
                if i < prefix:  # CLS sees only itself (models_semaim.py top_padding)
                    want_c = want_q = j < prefix
                elif j < prefix:  # every patch sees CLS (left_padding)
                    want_c = want_q = True
                else:
                    ri, rj = int(rank[b, i - prefix]), int(rank[b, j - prefix])
                    want_c, want_q = rj <= ri, rj < ri
                assert bool(content[b, 0, i, j]) == want_c, (b, i, j)
                assert bool(query[b, 0, i, j]) == want_q, (b, i, j)
    # The first patch of the order sees only CLS in the query stream; the last sees every patch but itself.
    first, last = int((rank[0] == 0).nonzero()), int((rank[0] == 8).nonzero())
    assert int(query[0, 0, prefix + first].sum()) == prefix
    assert int(query[0, 0, prefix + last].sum()) == prefix + 8


def test_ranks_from_keys() -> None:
    keys = torch.rand(4, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(order_ranks(keys), ranks_by_loop(keys))


# --- the order ---------------------------------------------------------------------------


def test_similarity_is_a_softmax_of_cosines() -> None:
    cls = torch.tensor([[2.0, 0.0]])
    patches = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [-1.0, 1.0], [1.0, 1.0]]])
    cosines = [1.0, 0.0, -1 / math.sqrt(2), 1 / math.sqrt(2)]
    total = sum(math.exp(c) for c in cosines)
    expected = torch.tensor([[math.exp(c) / total for c in cosines]])
    torch.testing.assert_close(cls_patch_similarity(cls, patches), expected)


def test_order_grows_out_of_the_most_similar_patch() -> None:
    sim = torch.full((1, N), 0.01)
    sim[0, 1 * GRID + 2] = 0.5  # centre at row 1, column 2
    keys = centre_out_keys(sim, (GRID, GRID), torch.zeros(1, N))
    # Euclidean grid distances to (1, 2), a few by hand.
    for (row, col), dist in {
        (1, 2): 0.0,
        (0, 2): 1.0,
        (2, 3): math.sqrt(2),
        (0, 0): math.sqrt(5),
        (3, 0): 2 * math.sqrt(2),
    }.items():
        assert float(keys[0, row * GRID + col]) == pytest.approx(dist)
    noise = torch.rand(1, N, generator=torch.Generator().manual_seed(2)) * 1e-3
    rank = order_ranks(centre_out_keys(sim, (GRID, GRID), noise))[0]
    assert int(rank[1 * GRID + 2]) == 0
    dist = {i: math.dist(divmod(i, GRID), (1, 2)) for i in range(N)}
    for i in range(N):
        for j in range(N):
            if dist[i] < dist[j] - 1e-9:
                assert rank[i] < rank[j], (i, j)
    # Noise only breaks ties: the four neighbours at distance 1 come 1st..4th in the noise's order.
    ring = [0 * GRID + 2, 1 * GRID + 1, 1 * GRID + 3, 2 * GRID + 2]
    assert sorted(int(rank[i]) for i in ring) == [1, 2, 3, 4]
    assert [int(rank[i]) for i in sorted(ring, key=lambda i: float(noise[0, i]))] == [1, 2, 3, 4]


def test_order_from_tokens_centres_on_the_patch_most_like_cls() -> None:
    sem = make()
    cls = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    patches = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(4))
    patches[0, 13] = 5 * cls[0]  # cosine 1
    patches[1, 6] = 0.1 * cls[1]
    rank, similarity = sem.order_from_tokens(cls, patches)
    assert [int((rank[b] == 0).nonzero()) for b in range(2)] == [13, 6]
    torch.testing.assert_close(similarity, cls_patch_similarity(cls, patches))


def test_student_order_pass_is_the_eval_mode_unmasked_encoder() -> None:
    sem = make(model={**TINY, "drop_path_rate": 0.5}).train()
    x = images(2, 5)
    tokens = sem.student_tokens(x)
    assert sem.backbone.training  # the training mode comes back
    sem.backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(tokens, sem.backbone(x))  # no drop path: deterministic


# --- targets -----------------------------------------------------------------------------


def test_blur_equals_a_hand_convolution_and_torchvision() -> None:
    img = torch.randn(1, 2, 5, 6, generator=torch.Generator().manual_seed(6))
    k, sigma = 3, 0.8
    w = [[math.exp(-((dy - 1) ** 2 + (dx - 1) ** 2) / (2 * sigma**2)) for dx in range(k)] for dy in range(k)]
    total = sum(map(sum, w))
    out = gaussian_blur(img, k, sigma)
    for c in range(2):
        for y in range(5):
            for x in range(6):
                acc = 0.0
                for dy in range(k):
                    for dx in range(k):
                        yy, xx = y + dy - 1, x + dx - 1
                        if 0 <= yy < 5 and 0 <= xx < 6:  # zero padding
                            acc += w[dy][dx] / total * float(img[0, c, yy, xx])
                assert float(out[0, c, y, x]) == pytest.approx(acc, abs=1e-5)
    # The recipe's kernel 9, sigma 1: torchvision on a zero-padded image, centre crop (no reflection reaches it).
    big = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    padded = F.pad(big, (4, 4, 4, 4))
    expected = tv_gaussian_blur(padded, [9, 9], [1.0, 1.0])[..., 4:-4, 4:-4]
    torch.testing.assert_close(gaussian_blur(big, 9, 1.0), expected, atol=1e-5, rtol=1e-5)


def test_pixel_targets_are_blurred_then_normalised_per_patch() -> None:
    sem = make()
    x = images(2, 8)
    blurred = tv_gaussian_blur(F.pad(x, (4, 4, 4, 4)), [9, 9], [1.0, 1.0])[..., 4:-4, 4:-4]
    targets = sem.pixel_targets(x)
    assert targets.shape == (2, N, PATCH * PATCH * 3)
    for b in range(2):
        for i in range(N):
            values = blurred[patch_pixels(b, i)].permute(1, 2, 0).flatten()  # (p, q, c) order inside a patch
            mean = float(values.mean())
            var = sum((float(v) - mean) ** 2 for v in values) / (len(values) - 1)  # unbiased
            expected = (values - mean) / math.sqrt(var + 1e-6)
            torch.testing.assert_close(targets[b, i], expected, atol=1e-4, rtol=1e-4)


# --- streams, causality, loss -----------------------------------------------------------


def test_masked_block_without_a_mask_is_the_timm_block() -> None:
    sem = make()
    x = torch.randn(2, 1 + N, 32, generator=torch.Generator().manual_seed(9))
    block = sem.backbone.vit.blocks[0]
    everything = torch.ones(2, 1, 1 + N, 1 + N, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(masked_block(block, x, everything), block(x))


def test_causality_of_both_streams_on_the_real_forward() -> None:
    sem = make(model={**TINY, "depth": 4}, query_depth=2).eval()
    x = images(2, 10)
    rank = random_ranks(2, N, seed=11)
    with torch.no_grad():
        base = sem.two_stream(x, rank)
        for b, u in [(0, int((rank[0] == 0).nonzero())), (0, int((rank[0] == 7).nonzero())), (1, 3)]:
            perturbed = x.clone()
            perturbed[patch_pixels(b, u)] = 10 * torch.randn(3, PATCH, PATCH)
            out = sem.two_stream(perturbed, rank)
            assert torch.equal(out.content[1 - b], base.content[1 - b])  # other images untouched
            assert torch.allclose(out.content[b, 0], base.content[b, 0])  # CLS sees only itself
            for i in range(N):
                content_same = torch.allclose(out.content[b, 1 + i], base.content[b, 1 + i], atol=1e-6)
                pred_same = torch.allclose(out.prediction[b, i], base.prediction[b, i], atol=1e-6)
                # content of i moves iff u is i or comes before it; the prediction at i iff u comes strictly before.
                assert content_same == bool(rank[b, u] > rank[b, i]), ("content", b, u, i)
                assert pred_same == bool(rank[b, u] >= rank[b, i]), ("query", b, u, i)


def test_loss_equals_a_hand_computation() -> None:
    sem = make().train()
    x = images(3, 12)
    torch.manual_seed(13)
    out = sem({"views": [x]})
    # The same order by hand: eval-mode tokens, softmax of cosines, argmax, distance + the same noise.
    torch.manual_seed(13)
    noise = torch.rand(3, N) * 1e-3
    with torch.no_grad():
        tokens = sem.student_tokens(x)
        keys = torch.zeros(3, N)
        for b in range(3):
            cos = [float(F.cosine_similarity(tokens[b, 0], tokens[b, 1 + i], dim=0)) for i in range(N)]
            centre = max(range(N), key=lambda i: cos[i])
            for i in range(N):
                keys[b, i] = math.dist(divmod(i, GRID), divmod(centre, GRID)) + noise[b, i]
        rank = ranks_by_loop(keys)
        pred = sem.two_stream(x, rank).prediction
        target = sem.pixel_targets(x)
    expected = sum(float((pred[b, i] - target[b, i]).square().mean()) for b in range(3) for i in range(N)) / (3 * N)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert out.loss.dtype == torch.float32
    assert set(out.metrics) == {"semaim/centre_peak", "semaim/loss_first_quarter", "semaim/loss_last_quarter"}


def test_loss_falls_on_a_fixed_batch() -> None:
    # Smooth images (bicubic 3x3 -> 32x32): a patch is predictable from its earlier neighbours.
    coarse = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(14))
    smooth = F.interpolate(coarse, size=32, mode="bicubic", align_corners=True)
    sem = make()
    opt = torch.optim.AdamW([p for p in sem.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for step in range(30):
        torch.manual_seed(step)  # the order's tie-break noise, as the loop seeds each step
        out = sem({"views": [smooth]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses  # ~0.5-0.6 over seeds


def test_random_order_and_gradients_reach_encoder_query_blocks_and_head() -> None:
    sem = make(order="random")
    torch.manual_seed(15)
    out = sem({"views": [images(2, 16)]})
    assert "semaim/centre_peak" not in out.metrics
    out.loss.backward()
    for name in ("backbone.vit.blocks.0.attn.qkv.weight", "query_blocks.1.q.weight", "head.fc2.weight"):
        grad = dict(sem.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert not sem.backbone.vit.pos_embed.requires_grad  # fixed sin-cos, as models_semaim.py


# --- SemAIM*: a teacher's features and order ---------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0, **TEACHER)
    return save_encoder(model, tmp_path_factory.mktemp("teacher") / "tiny", ARCH, {**TEACHER, "num_classes": 0})


def test_teacher_target_and_teacher_order(teacher_dir: Path) -> None:
    teacher_cfg = TeacherConfig(source=str(teacher_dir), project=False)  # return_cls is forced on
    torch.manual_seed(1)
    sem = SemAIM(SemAIMConfig(target="teacher", teacher=teacher_cfg), build_backbone(ModelConfig(arch=ARCH, **TINY)))
    teacher = sem.frozen_modules()["teacher"]
    assert teacher.return_cls and not any(k.startswith("teacher") for k in sem.state_dict())
    assert sem.head.fc2.out_features == 24
    x = images(2, 17)
    torch.manual_seed(18)
    out = sem({"views": [x]})
    torch.manual_seed(18)
    noise = torch.rand(2, N) * 1e-3
    with torch.no_grad():
        tokens = teacher.model.forward_features(x)  # (B, 1 + N, 24): the teacher's final normed tokens
        keys = torch.zeros(2, N)
        for b in range(2):
            cos = [float(F.cosine_similarity(tokens[b, 0], tokens[b, 1 + i], dim=0)) for i in range(N)]
            centre = max(range(N), key=lambda i: cos[i])
            for i in range(N):
                keys[b, i] = math.dist(divmod(i, GRID), divmod(centre, GRID)) + noise[b, i]
        pred = sem.two_stream(x, ranks_by_loop(keys)).prediction
    total = 0.0
    for b in range(2):
        for i in range(N):
            p, t = pred[b, i].tolist(), tokens[b, 1 + i].tolist()
            pn, tn = math.sqrt(sum(v * v for v in p)), math.sqrt(sum(v * v for v in t))
            total += sum((a / pn - c / tn) ** 2 for a, c in zip(p, t, strict=True))
    assert float(out.loss.detach()) == pytest.approx(total / (2 * N), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="patch grid"):
        SemAIM(
            SemAIMConfig(target="teacher", teacher=teacher_cfg),
            build_backbone(ModelConfig(arch=ARCH, **{**TINY, "patch_size": 4})),
        )


# --- EMA order encoder ---------------------------------------------------------------------


def test_ema_encoder_lives_in_fp32_buffers_and_follows_the_decay_ramp() -> None:
    torch.manual_seed(1)
    backbone = build_backbone(ModelConfig(arch=ARCH, **TINY))
    sem = SemAIM(SemAIMConfig(order_source="ema"), backbone, RunContext(total_steps=80))
    ema = sem.ema
    assert ema is not None
    # Not trained, not partitioned: no parameters of the objective; checkpointed: in the state dict.
    own = {id(p) for p in sem.parameters()}
    assert not any(id(b) in own for b in ema.buffers())
    assert "ema.encoder.vit.blocks.0.attn.qkv.weight" in sem.state_dict()
    assert sum(p.numel() for p in sem.parameters()) == sum(p.numel() for n, p in sem.named_parameters())
    # Ramp over 12.5% of 80 steps = 10 steps: 0.999 -> 0.9999, then flat.
    assert sem.ema_decay_at(0) == pytest.approx(0.999)
    assert sem.ema_decay_at(5) == pytest.approx(0.99945)
    assert sem.ema_decay_at(40) == pytest.approx(0.9999)
    # One update by hand.
    live = backbone.vit
    before = {n: b.clone() for n, b in ema.encoder.vit.named_buffers()}
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    sem.after_step(5)
    d = 0.99945
    for name, p in live.named_parameters():
        torch.testing.assert_close(ema.encoder.vit.get_buffer(name), d * before[name] + (1 - d) * p.detach())
    # Casts of the whole objective move the EMA but keep it fp32; it stays in eval mode.
    sem.to(torch.bfloat16).train()
    assert ema.encoder.vit.cls_token.dtype == torch.float32 and live.cls_token.dtype == torch.bfloat16
    assert not ema.training and sem.backbone.training
    # The order comes from the EMA's tokens, not the live encoder's.
    sem.float()
    x = images(2, 19)
    with torch.no_grad():
        torch.testing.assert_close(sem.student_tokens(x), ema.encoder(x))
        assert not torch.allclose(sem.student_tokens(x), sem.backbone.eval()(x), atol=1e-3)


def test_registry_data_needs_and_config_problems() -> None:
    assert get_objective_class("semaim") is SemAIM
    cfg = SemAIMConfig()
    assert cfg.problems() == []
    assert (cfg.blur_kernel_size, cfg.blur_sigma, cfg.order_noise, cfg.query_depth) == (9, 1.0, 1e-3, None)
    assert (cfg.teacher.project, cfg.teacher.return_cls, cfg.teacher.layer) == (True, True, -1)
    assert SemAIM.data_needs(cfg) == DataNeeds(views=1)
    bad = SemAIMConfig(
        target="clip",
        order="raster",
        order_source="teacher",
        order_noise=-1.0,
        query_depth=0,
        blur_kernel_size=4,
        ema_decay=1.0,
        ema_ramp_fraction=2.0,
    )
    assert {key for key, _ in bad.problems()} == {
        "objective.target",
        "objective.order",
        "objective.order_source",
        "objective.order_noise",
        "objective.query_depth",
        "objective.blur_kernel_size",
        "objective.ema_decay",
        "objective.ema_ramp_fraction",
    }
    assert [k for k, _ in SemAIMConfig(blur_kernel_size=3, blur_sigma=0.0).problems()] == ["objective.blur_sigma"]
    assert SemAIMConfig(blur_kernel_size=0, blur_sigma=0.0).problems() == []  # no blur: sigma unused
    assert [k for k, _ in SemAIMConfig(order_source="ema", target="teacher").problems()] == ["objective.order_source"]
    # The teacher is validated only when it is used.
    assert SemAIMConfig(teacher=TeacherConfig(source="s3://x/t")).problems() == []
    assert [k for k, _ in SemAIMConfig(target="teacher", teacher=TeacherConfig(source="s3://x")).problems()] == [
        "objective.teacher.source"
    ]
    with pytest.raises(ValueError, match="query_depth: 3 must divide the encoder depth 2"):
        make(query_depth=3)
    with pytest.raises(ValueError, match="objective.order"):
        make(order="raster")


# --- ZeRO-3, two ranks: the EMA gathers partitioned parameters and survives a checkpoint ------------


def _zero3_worker(rank: int, out_dir: str) -> None:
    import deepspeed

    from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig
    from pretrain.engine import build_engine

    torch.manual_seed(0)  # the same initial weights on both ranks
    backbone = build_backbone(ModelConfig(arch=ARCH, **TINY))
    sem = SemAIM(SemAIMConfig(order_source="ema"), backbone, RunContext(total_steps=8))
    init = {n: p.detach().clone() for n, p in backbone.vit.named_parameters()}
    engine = build_engine(
        sem,
        OptimConfig(lr=1e-2),
        TrainerConfig(batch_size=2, num_workers=2, max_steps=8),
        DeepSpeedConfig(zero_stage=3, precision="bf16", force_precision=True),  # also where bf16 is emulated
    )
    vit = engine.module.backbone.vit
    assert all(hasattr(p, "ds_id") for p in vit.parameters())  # really partitioned
    lives, losses = [], []
    for step in range(2):
        x = images(2, 10 * step + rank).to(torch.bfloat16)  # each rank its own images
        torch.manual_seed(100 * step + rank)
        out = engine({"views": [x]})
        engine.backward(out.loss)
        engine.step()
        engine.module.after_step(step)
        losses.append(float(out.loss.detach()))
        with deepspeed.zero.GatheredParameters(list(vit.parameters())):
            lives.append({n: p.detach().clone() for n, p in vit.named_parameters()})
    ema = {n: b.clone() for n, b in engine.module.ema.encoder.vit.named_buffers()}
    engine.save_checkpoint(str(Path(out_dir) / "ckpt"), tag="t")
    with torch.no_grad():
        for buffer in engine.module.ema.buffers():
            buffer.zero_()
    engine.load_checkpoint(str(Path(out_dir) / "ckpt"), tag="t")
    restored = {n: b.clone() for n, b in engine.module.ema.encoder.vit.named_buffers()}
    result = {"init": init, "lives": lives, "ema": ema, "restored": restored, "losses": losses}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow  # DeepSpeed may JIT-build its CPU shm op first (minutes on 2 cores)
def test_ema_under_zero3_bf16_on_two_ranks(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_zero3_worker, 2, str(tmp_path), timeout=900)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert all(math.isfinite(v) for v in r0["losses"] + r1["losses"])
    d0, d1 = 0.999, 0.9999  # steps 0 and 1: the ramp is 12.5% of 8 steps = 1 step
    for name, init in r0["init"].items():
        live0, live1 = (r0["lives"][k][name].float() for k in range(2))
        expected = d1 * (d0 * init + (1 - d0) * live0) + (1 - d1) * live1
        torch.testing.assert_close(r0["ema"][name], expected, atol=1e-6, rtol=0)
        assert r0["ema"][name].dtype == torch.float32  # bf16 training, fp32 EMA
        assert torch.equal(r0["ema"][name], r1["ema"][name])  # the ranks agree
        assert torch.equal(r0["restored"][name], r0["ema"][name])  # the checkpoint carries it
