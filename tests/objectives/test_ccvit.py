"""CCViT objective: centroid tokens, centroid replacement, the two losses, the centroid build and export."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.masks import block_patch_mask
from objectives.base import MaskSpec, RunContext
from objectives.ccvit import CCViT, random_unmasked
from objectives.components.kmeans import kmeans, load_centroids, random_init
from objectives.configs import CCViTConfig
from objectives.registry import get_objective_class
from pretrain.backbone import arch_kwargs, build_backbone
from pretrain.config import ModelConfig

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
MODEL = ModelConfig(arch=ARCH, **TINY)
GRID, PATCH, N = 4, 8, 16
DIM = PATCH * PATCH * 3
K = 12
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CONTEXT = RunContext(input_mean=MEAN, input_std=STD, arch=ARCH, arch_kwargs=arch_kwargs(MODEL))
MASK_RATIO, REPLACE_RATIO = 0.375, 0.25  # 6 masked and 4 replaced of 16 patches


def config(**overrides: object) -> CCViTConfig:
    values = {"num_centroids": K, "kmeans_samples": 64, "mask_ratio": MASK_RATIO, "replace_ratio": REPLACE_RATIO}
    return CCViTConfig(**{**values, **overrides})  # type: ignore[arg-type]


def pixels(batch: int, seed: int) -> torch.Tensor:
    """Images in [0, 1] whose patches are noisy copies of a few flat colours (so centroids mean something)."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(6, 3, 1, 1, generator=gen)
    pick = torch.randint(0, 6, (batch, GRID, GRID), generator=gen)
    flat = colours[pick].squeeze(-1).squeeze(-1).permute(0, 3, 1, 2)  # (B, 3, GRID, GRID)
    big = flat.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    return (big + 0.05 * torch.rand(batch, 3, 32, 32, generator=gen)).clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([(x[:, c] - MEAN[c]) / STD[c] for c in range(3)], dim=1)


def block_masks(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([block_patch_mask((GRID, GRID), gen, ratio=MASK_RATIO) for _ in range(batch)])


def random_centroids(seed: int = 0) -> torch.Tensor:
    return torch.rand(K, DIM, generator=torch.Generator().manual_seed(seed))


def make(centroids: torch.Tensor | None = None, **overrides: object) -> CCViT:
    torch.manual_seed(1)
    return CCViT(config(**overrides), build_backbone(MODEL), replace(CONTEXT, inputs={"centroids": centroids}))


def patch_of(images: torch.Tensor, b: int, i: int) -> torch.Tensor:
    """Pixels of patch i (row-major) of image b, flattened (row, column, channel)."""
    row, col = divmod(i, GRID)
    return images[b, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH].permute(1, 2, 0).flatten()


def test_registered_with_the_papers_masks() -> None:
    assert get_objective_class("ccvit") is CCViT
    needs = CCViT.data_needs(CCViTConfig())
    assert needs.views == 1 and needs.mask == MaskSpec("block", 0.3827)
    cfg = CCViTConfig()
    assert round(196 * cfg.mask_ratio) == 75 and round(196 * cfg.replace_ratio) == 20  # 75 + 20 of 196
    assert (cfg.num_centroids, cfg.kmeans_iters, cfg.kmeans_samples) == (8192, 20, 50 * 1000 * 196)


def test_random_unmasked_draws_the_count_among_unmasked_positions() -> None:
    mask = block_masks(64, 1)
    torch.manual_seed(0)
    replaced = random_unmasked(mask, 4)
    assert replaced.sum(1).tolist() == [4] * 64
    assert not (replaced & mask).any()
    # Every unmasked position gets picked sometimes (uniform among the 10 unmasked per row).
    assert bool((replaced | mask).any(0).all())
    torch.manual_seed(0)
    assert torch.equal(random_unmasked(mask, 4), replaced)  # torch's global RNG: resumable
    assert not random_unmasked(mask, 0).any()
    with pytest.raises(ValueError, match="only 10 unmasked"):
        random_unmasked(mask, 11)


def test_replaced_patches_carry_their_centroids_pixels_and_codes_are_brute_force_nearest() -> None:
    centroids = random_centroids()
    model = make(centroids)
    x = pixels(3, 2)
    images, mask = normalise(x), block_masks(3, 3)
    c = model.corrupt(images, mask)
    out = c.images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    for b in range(3):
        assert int(c.replaced[b].sum()) == 4 and not (c.replaced[b] & mask[b]).any()
        for i in range(N):
            original = patch_of(x, b, i)
            nearest = min(range(K), key=lambda k, p=original: float(((p - centroids[k]) ** 2).sum()))
            assert int(c.codes[b, i]) == nearest
            torch.testing.assert_close(c.patches[b, i], original)
            if c.replaced[b, i]:
                torch.testing.assert_close(patch_of(out, b, i), centroids[nearest])
            else:  # untouched pixels pass through bit-identical
                assert torch.equal(patch_of(c.images, b, i), patch_of(images, b, i))


def test_loss_is_ce_on_original_ids_at_masked_and_replaced_positions_plus_pixel_mse() -> None:
    model = make(random_centroids())
    x = pixels(4, 4)
    images, mask = normalise(x), block_masks(4, 5)
    torch.manual_seed(7)
    out = model({"views": [images], "mask": mask})
    torch.manual_seed(7)  # the same replaced positions
    c = model.corrupt(images, mask)
    positions = [(b, i) for b in range(4) for i in range(N) if mask[b, i] or c.replaced[b, i]]
    assert len(positions) == 4 * (6 + 4)
    labels = torch.tensor([int(c.codes[b, i]) for b, i in positions])
    final, pixel_tokens = model.encode(c.images, mask)
    logits = torch.stack([model.lm_head(final[b, i]) for b, i in positions])
    ce = F.cross_entropy(logits, labels)
    errors = []
    for b, i in positions:
        target = patch_of(x, b, i)  # the original pixels, also where the input carried a centroid
        target = (target - target.mean()) / (target.var() + 1e-6) ** 0.5  # per-patch normalised pixels
        errors.append(((model.pixel_head(pixel_tokens[b, i]) - target) ** 2).mean())
    pix = torch.stack(errors).mean()
    torch.testing.assert_close(out.loss, ce + pix)
    torch.testing.assert_close(out.metrics["ccvit/ce_loss"], ce)
    torch.testing.assert_close(out.metrics["ccvit/pix_loss"], pix)
    assert out.metrics["ccvit/centroid_usage"].item() == pytest.approx(len(set(labels.tolist())) / K)


def test_pixel_branch_by_hand() -> None:
    """Final CLS (pre-norm) + block `early_layers` patch tokens -> 2 blocks -> its own norm (not the encoder's)."""
    model = make(random_centroids())
    assert model.early_layers == 1  # max(1, depth 2 - 3)
    vit = model.backbone.vit
    x, mask = normalise(pixels(2, 6)), block_masks(2, 7)
    with torch.no_grad():
        model.pixel_norm.weight.mul_(2.0)  # differs from vit.norm
    tokens = vit.patch_embed(x)
    w = mask.unsqueeze(-1).float()
    h = torch.cat([vit.cls_token.expand(2, -1, -1), tokens * (1 - w) + model.mask_token * w], 1) + vit.pos_embed
    states = []
    for block in vit.blocks:
        h = block(h)
        states.append(h)
    agg = torch.cat([states[-1][:, :1], states[0][:, 1:]], 1)
    for block in model.aggregation_blocks:
        agg = block(agg)
    final, pixel_tokens = model.encode(x, mask)
    torch.testing.assert_close(final, vit.norm(states[-1])[:, 1:])
    torch.testing.assert_close(pixel_tokens, model.pixel_norm(agg)[:, 1:])


def test_prepare_builds_the_centroids_by_kmeans_and_is_skipped_once_built() -> None:
    model = make(kmeans_samples=40)
    assert not bool(model.centroids_ready)
    with pytest.raises(RuntimeError, match="prepare"):
        model.corrupt(normalise(pixels(1, 0)), block_masks(1, 0))
    batches = [{"views": [normalise(pixels(2, s))], "mask": block_masks(2, s)} for s in range(5)]
    model.prepare(iter(batches))
    assert bool(model.centroids_ready)
    # The same as k-means by hand on the first 40 patches of the stream (2.5 batches of 16-patch images).
    x = torch.cat([pixels(2, s) for s in range(3)])
    patches = torch.stack([patch_of(x, b, i) for b in range(6) for i in range(N)])[:40]
    expected = kmeans(patches, K, 20, init="random", seed=1)
    torch.testing.assert_close(model.centroids, expected.centroids)
    assert torch.equal(model.centroid_counts, expected.counts)
    assert model.kmeans_stats[1].item() == pytest.approx(expected.usage)
    # A resumed run: the state dict carries the centroids, and prepare draws nothing.
    fresh = make(kmeans_samples=40)
    fresh.load_state_dict(model.state_dict())
    consumed = []
    fresh.prepare(consumed.append(b) or b for b in batches)  # type: ignore[func-returns-value]
    assert consumed == [] and torch.equal(fresh.centroids, model.centroids)


def test_loss_falls_on_a_fixed_batch() -> None:
    model = make(kmeans_samples=64)
    batch = {"views": [normalise(pixels(8, 11))], "mask": block_masks(8, 12)}
    model.prepare(iter([batch]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(0)  # the loop seeds each step; a fixed seed keeps the replaced patches fixed
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert float(out.metrics["ccvit/acc"]) > 0.5


def test_export_and_reuse_the_centroids(tmp_path: Path) -> None:
    model = make(random_centroids(3))
    model.kmeans_stats.copy_(torch.tensor([1.5, 0.75, 0.01]))
    items = {item.name: item for item in model.export(tmp_path)}
    assert set(items) == {"encoder", "centroids"}
    assert items["centroids"].registered_name == f"ccvit-centroids-{K}x{PATCH}"
    meta = json.loads((items["centroids"].path / "pretrain.json").read_text())
    assert meta["num_centroids"] == K and meta["patch_size"] == PATCH and meta["usage"] == 0.75
    # objective.tokenizer=<dir> reuses them: same centroids, same vocabulary, the build's statistics.
    reused = CCViT(config(tokenizer=str(items["centroids"].path), num_centroids=99), build_backbone(MODEL), CONTEXT)
    assert torch.equal(reused.centroids, model.centroids) and reused.lm_head.out_features == K
    assert bool(reused.centroids_ready) and reused.kmeans_stats.tolist() == pytest.approx([1.5, 0.75, 0.01])
    assert torch.equal(load_centroids(str(items["centroids"].path)).centroids, model.centroids)
    named = make(random_centroids(3), registered_name="my-centroids").export(tmp_path / "other")
    assert [i.registered_name for i in named if i.name == "centroids"] == ["my-centroids"]
    # Centroids of other patches than the encoder's: one clear error.
    with pytest.raises(ValueError, match="model.patch_size"):
        CCViT(
            config(),
            build_backbone(ModelConfig(arch=ARCH, **{**TINY, "patch_size": 4})),
            RunContext(inputs={"centroids": model.centroids}),
        )


def test_config_problems() -> None:
    assert CCViTConfig().problems() == []
    assert config(tokenizer="models:/ccvit-centroids-12x8/latest", kmeans_samples=1).problems() == []
    bad = CCViTConfig(
        tokenizer="s3://b/c",
        num_centroids=1,
        kmeans_iters=0,
        kmeans_init="kmeans||",
        mask_ratio=1.0,
        replace_ratio=-0.1,
        early_layers=0,
        head_layers=-1,
        pixel_weight=-1.0,
    )
    assert {key for key, _ in bad.problems()} == {
        "objective.tokenizer",
        "objective.num_centroids",
        "objective.kmeans_iters",
        "objective.kmeans_init",
        "objective.mask_ratio",
        "objective.replace_ratio",
        "objective.early_layers",
        "objective.head_layers",
        "objective.pixel_weight",
    }
    assert [k for k, _ in CCViTConfig(mask_ratio=0.6, replace_ratio=0.4).problems()] == ["objective.replace_ratio"]
    assert [k for k, _ in CCViTConfig(num_centroids=100, kmeans_samples=99).problems()] == ["objective.kmeans_samples"]


# --- two ranks (gloo): the centroid build --------------------------------------------


def _rank_batches(rank: int) -> list[dict[str, object]]:
    return [{"views": [normalise(pixels(2, 10 * rank + s))], "mask": block_masks(2, s)} for s in range(4)]


def _rank_patches(rank: int, count: int) -> torch.Tensor:
    x = torch.cat([b["views"][0] for b in _rank_batches(rank)])  # type: ignore[index]
    x = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    return torch.stack([patch_of(x, b, i) for b in range(x.shape[0]) for i in range(N)])[:count]


def _prepare_worker(rank: int, out_dir: str) -> None:
    model = make(kmeans_samples=75)  # ceil(75 / 2) = 38 patches per rank
    model.prepare(iter(_rank_batches(rank)))
    torch.save({"centroids": model.centroids, "counts": model.centroid_counts}, Path(out_dir) / f"r{rank}.pt")


def test_two_ranks_build_the_same_centroids_as_one_process_on_both_samples(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_prepare_worker, 2, str(tmp_path), timeout=120)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["centroids"], r1["centroids"]) and torch.equal(r0["counts"], r1["counts"])
    x0, x1 = _rank_patches(0, 38), _rank_patches(1, 38)
    single = kmeans(torch.cat([x0, x1]), K, 20, init=random_init(x0, K, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(r0["centroids"], single.centroids)
    assert torch.equal(r0["counts"], single.counts) and int(single.counts.sum()) == 76


@pytest.mark.slow  # a real MLflow store (sqlite) and its model registry
def test_centroids_from_the_mlflow_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_store
) -> None:
    from mlflow import MlflowClient

    from pretrain.model_registry import log_model_dir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model = make(random_centroids(5))
    (item,) = [i for i in model.export(tmp_path / "export") if i.name == "centroids"]
    uri = empty_mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("ccvit", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    logged = log_model_dir(
        item.path,
        run_id=run_id,
        tracking_uri=uri,
        name=item.name,
        model_type=item.model_type,
        registered_name=item.registered_name,
    )
    assert logged == f"models:/ccvit-centroids-{K}x{PATCH}/1"
    for source in (f"models:/ccvit-centroids-{K}x{PATCH}/latest", f"runs:/{run_id}/centroids"):
        reused = CCViT(config(tokenizer=source), build_backbone(MODEL), RunContext(tracking_uri=uri))
        assert torch.equal(reused.centroids, model.centroids)
    with pytest.raises(FileNotFoundError, match="objective.tokenizer empty"):
        load_centroids("models:/no-such-centroids/latest", tracking_uri=uri)
