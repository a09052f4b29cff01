"""k-means centroids of pixel patches (CCViT's tokenizer) against hand-computed and brute-force expectations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from objectives.components.kmeans import (
    SPLIT_EPS,
    from_pixels,
    image_patches,
    kmeans,
    kmeans_pp_init,
    load_centroids,
    nearest_centroid,
    random_init,
    save_centroids,
    to_pixels,
)


def test_nearest_centroid_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    x, centroids = torch.rand(203, 12, generator=gen), torch.rand(37, 12, generator=gen)
    brute = [min(range(37), key=lambda k, v=v: float(((v - centroids[k]) ** 2).sum())) for v in x]
    assert nearest_centroid(x, centroids).tolist() == brute
    assert nearest_centroid(x, centroids, chunk_size=7).tolist() == brute  # chunks of 7 points


def test_one_lloyd_iteration_by_hand() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0], [0.0, 10.0]])
    init = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 9.0]])
    # Assignments: points 0, 1 -> centroid 0; 2, 3 -> centroid 1; 4 -> centroid 2. New centroids = means.
    result = kmeans(x, 3, iters=1, init=init)
    torch.testing.assert_close(result.centroids, torch.tensor([[0.5, 0.0], [10.5, 0.0], [0.0, 10.0]]))
    assert result.counts.tolist() == [2.0, 2.0, 1.0]
    # Squared errors under the new centroids: 4 x 0.25 + 0; mean over 5 points x 2 dims.
    assert result.mse == pytest.approx(1.0 / 10)
    assert result.splits == 0 and result.usage == 1.0
    assert torch.equal(init, torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 9.0]]))  # the caller's init is untouched


def test_empty_cluster_is_split_from_a_populated_one() -> None:
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    init = torch.tensor([[1.0, 0.0], [10.0, 10.0], [100.0, 100.0]])  # centroid 2 gets no point
    result = kmeans(x, 3, iters=1, init=init)
    # Only cluster 0 has two points, so it is split: +eps on even dims, -eps on odd dims (relative,
    # floored at eps for the zero coordinate), the reverse for cluster 0 itself.
    eps = SPLIT_EPS
    expected = torch.tensor([[1.0 - eps, eps * eps], [10.0, 10.0], [1.0 + eps, -eps * eps]])
    torch.testing.assert_close(result.centroids, expected)
    assert result.splits == 1
    # The final assignment: (0, 0) is nearer the lowered copy, (2, 0) the raised one.
    assert result.counts.tolist() == [1.0, 1.0, 1.0]
    # One more iteration separates the two halves completely.
    result = kmeans(x, 3, iters=2, init=init)
    torch.testing.assert_close(result.centroids, torch.tensor([[0.0, 0.0], [10.0, 10.0], [2.0, 0.0]]))
    assert result.mse == 0.0


def test_no_split_possible_when_every_cluster_has_one_point() -> None:
    x = torch.tensor([[0.0], [5.0]])
    result = kmeans(x, 3, iters=3, init=torch.tensor([[0.0], [5.0], [50.0]]))
    torch.testing.assert_close(result.centroids, torch.tensor([[0.0], [5.0], [50.0]]))
    assert result.splits == 0 and result.counts.tolist() == [1.0, 1.0, 0.0]
    assert result.usage == pytest.approx(2 / 3)


def _clusters(n: int, dim: int, per: int, seed: int, spread: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around n random centres in [0, 1]^dim (like pixel patches)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, dim, generator=gen)
    labels = torch.arange(n).repeat_interleave(per)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def test_inits_draw_points_and_kmeans_recovers_separated_clusters() -> None:
    x, labels = _clusters(6, 5, 20, seed=0)
    gen = torch.Generator().manual_seed(3)
    seeds = random_init(x, 6, gen)
    assert len({tuple(r) for r in seeds.tolist()}) == 6  # distinct rows of x
    assert all(any(torch.equal(s, p) for p in x) for s in seeds)
    pp = kmeans_pp_init(x, 6, torch.Generator().manual_seed(3))
    # k-means++ on far-apart tight clusters: one seed per cluster
    assert sorted(nearest_centroid(pp, x[::20]).tolist()) == list(range(6))
    for init in ("kmeans++", pp):
        result = kmeans(x, 6, iters=5, init=init)
        assign = nearest_centroid(x, result.centroids)
        pairs = set(zip(labels.tolist(), assign.tolist(), strict=True))
        assert len(pairs) == 6 and len({c for _, c in pairs}) == 6  # label -> centroid is a bijection
        for c in range(6):
            torch.testing.assert_close(result.centroids[assign[labels == c][0]], x[labels == c].mean(0))
    with pytest.raises(ValueError, match="kmeans_samples"):
        random_init(x[:3], 6, gen)
    with pytest.raises(ValueError, match="kmeans\\+\\+"):
        kmeans(x, 6, init="pp")


# --- patches --------------------------------------------------------------------------


def test_image_patches_match_an_explicit_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 8, 12, generator=gen)  # 2 x 3 grid of 4 x 4 patches
    patches = image_patches(pixels, 4)
    expected = []
    for b in range(2):
        for gr in range(2):
            for gc in range(3):
                expected.append(
                    [
                        float(pixels[b, ch, gr * 4 + r, gc * 4 + c])
                        for r in range(4)
                        for c in range(4)
                        for ch in range(3)
                    ]
                )
    assert patches.tolist() == expected


def test_pixels_round_trip_through_the_data_normalisation() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    normed = torch.stack([(pixels[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(from_pixels(pixels, mean, std), normed)
    torch.testing.assert_close(to_pixels(normed, mean, std), pixels)
    assert to_pixels(normed.bfloat16(), mean, std).dtype == torch.float32


# --- files ----------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    centroids = torch.rand(10, 4 * 4 * 3, generator=torch.Generator().manual_seed(4))
    counts = torch.arange(10.0)
    path = save_centroids(tmp_path / "c", centroids, patch_size=4, counts=counts, extra={"usage": 0.9})
    meta = json.loads((path / "pretrain.json").read_text())
    assert meta["kind"] == "centroids" and meta["num_centroids"] == 10 and meta["patch_size"] == 4
    for source in (str(path), str(path / "model.safetensors")):
        stored = load_centroids(source)
        assert torch.equal(stored.centroids, centroids) and torch.equal(stored.counts, counts)
        assert stored.meta["usage"] == 0.9
    with pytest.raises(ValueError, match="48 dims do not match 8x8x3"):
        save_centroids(tmp_path / "bad", centroids, patch_size=8)
    with pytest.raises(FileNotFoundError, match="objective.tokenizer"):
        load_centroids(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="models:/"):
        load_centroids("s3://bucket/centroids")


def test_official_faiss_npy_is_reordered_to_our_patch_layout(tmp_path: Path) -> None:
    """train_faiss_kmeans.py flattens patches channel-first: index c*p*p + row*p + col."""
    p = 4
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    official = np.zeros((4, 3 * p * p), dtype=np.float32)
    for n in range(4):
        gr, gc = divmod(n, 2)
        for c in range(3):
            for r in range(p):
                for q in range(p):
                    official[n, c * p * p + r * p + q] = image[c, gr * p + r, gc * p + q]
    np.save(tmp_path / "exp_centroids.npy", official)
    stored = load_centroids(str(tmp_path / "exp_centroids.npy"))
    assert stored.meta["patch_size"] == p
    assert torch.equal(stored.centroids, image_patches(image[None], p))


# --- two ranks (gloo) ----------------------------------------------------------------


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered points with a block of exact duplicates (black patches), so inits repeat and clusters split."""
    x, _ = _clusters(5, 6, 12, seed=7, spread=0.05)
    x = torch.cat([x, torch.zeros(40, 6)])[torch.randperm(100, generator=torch.Generator().manual_seed(8))]
    return x[:55], x[55:]  # the ranks hold different numbers of points


def _worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(1000 + rank)  # rank-local RNG differs; results must not depend on it
    x = _data()[rank]
    results = {init: kmeans(x, 8, iters=6, init=init, seed=3) for init in ("random", "kmeans++")}
    torch.save(
        {f"{k}.{f}": getattr(r, f) for k, r in results.items() for f in ("centroids", "counts")}
        | {f"{k}.scalars": torch.tensor([r.mse, r.splits]) for k, r in results.items()},
        Path(out_dir) / f"rank{rank}.pt",
    )


def test_two_ranks_agree_and_equal_one_process_on_concatenated_data(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_worker, 2, str(tmp_path), timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    # One process on the concatenated data, from the init rank 0 drew from its own points.
    x0, x1 = _data()
    for init, draw in (("random", random_init), ("kmeans++", kmeans_pp_init)):
        seeds = draw(x0, 8, torch.Generator().manual_seed(3))
        single = kmeans(torch.cat([x0, x1]), 8, iters=6, init=seeds, seed=3)
        torch.testing.assert_close(r0[f"{init}.centroids"], single.centroids)
        assert torch.equal(r0[f"{init}.counts"], single.counts)
        mse, splits = r0[f"{init}.scalars"].tolist()
        assert mse == pytest.approx(single.mse) and splits == single.splits
    assert r0["random.scalars"][1] > 0  # the duplicates made empty clusters, split the same way on both sides
