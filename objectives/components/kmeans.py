"""k-means centroids of raw pixel patches: CCViT's non-parametric tokenizer.

Yan et al., "Centroid-centered Modeling for Efficient Vision Transformer Pre-training"
(2023). The official train_faiss_kmeans.py (Cakeyan/CCViT_Public) clusters the
16x16x3 patches, in [0, 1], of 50 images per ImageNet class with faiss k-means:
k = 8192, 20 iterations, seed 1, no subsampling (max_points_per_centroid = 1e7).
A patch's token is the index of its nearest centroid (L2).

Here k-means is plain torch on the device of the data and may be split over ranks:
each rank assigns its own points, the per-centroid sums and counts are all-reduced
(one all-reduce per iteration), and every rank ends with the same centroids. As in
faiss: init = k distinct random points (drawn on rank 0 and broadcast), Lloyd
iterations, empty clusters re-seeded by splitting a populated one.

Patches are flattened like `objectives.components.patches.patchify`: pixels (row, column,
channel) inside a patch. `save_centroids` / `load_centroids` write and read a "centroids"
artifact (`objectives.artifacts`): tensors centroids (K, p*p*3) and counts (K,); metadata
num_centroids, patch_size, the patch layout and the build statistics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from data.progress import Progress
from objectives.artifacts import MODEL_URI_SCHEMES, ArtifactError, ArtifactNotFound, read_artifact, save_artifact
from objectives.components.patches import patchify
from objectives.components.quantizer import nearest_code
from objectives.configs import KMEANS_INIT_CHOICES as KMEANS_INITS

log = logging.getLogger(__name__)

# faiss Clustering.cpp: the relative perturbation that splits a cluster in two.
SPLIT_EPS = 1 / 1024
# Points per chunk of the nearest-centroid search: bounds memory at CHUNK x K scores.
CHUNK_SIZE = 16384

LAYOUT = "patch pixels (row, column, channel) row-major, values in [0, 1] (objectives.components.patches.patchify)"


# --- pixels and patches -------------------------------------------------------------


def to_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the data pipeline's normalisation: (B, 3, H, W) -> float32 pixels in [0, 1] (up to rounding)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.float() * s + m


def from_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise [0, 1] pixels (B, 3, H, W) with the data pipeline's mean/std (float32)."""
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() - m) / s


def image_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) pixels -> (B * N, patch * patch * 3) patches, images and patches row-major."""
    flat = patchify(pixels, patch)  # (B, N, p*p*3)
    return flat.reshape(-1, flat.shape[-1])


# --- nearest centroid ---------------------------------------------------------------


def _extended(centroids: torch.Tensor) -> torch.Tensor:
    """(K, D) -> (K, D + 1): each centroid c followed by -|c|^2 / 2."""
    return torch.cat([centroids, -0.5 * (centroids * centroids).sum(1, keepdim=True)], dim=1)


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, D + 1): a 1 appended to each point (its count in the per-centroid sums)."""
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """Index of the nearest centroid (L2) of each row of x: (M, D), (K, D) -> (M,) long.

    argmin |x - c|^2 = argmax (x.c - |c|^2 / 2), a dot product of [x, 1] with
    [c, -|c|^2 / 2], so the chunked max-dot search of `nearest_code` does the work.
    """
    x, centroids = x.float(), centroids.float()
    ext = _extended(centroids)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        stop = start + chunk_size
        out[start:stop] = nearest_code(_with_ones(x[start:stop]), ext, chunk_size)
    return out


# --- k-means ------------------------------------------------------------------------


class KMeansResult(NamedTuple):
    """What `kmeans` returns; identical on every rank.

    centroids: (K, D) float32. counts: (K,) points per centroid under the final
    centroids, over all ranks. mse: mean squared distance of a point to its
    centroid. splits: empty clusters re-seeded over all iterations.
    """

    centroids: torch.Tensor
    counts: torch.Tensor
    mse: float
    splits: int

    @property
    def usage(self) -> float:
        """Fraction of centroids that own at least one sample point."""
        return float((self.counts > 0).float().mean())


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed; (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def random_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct rows of x, uniformly (faiss's default init): (k, D)."""
    if x.shape[0] < k:
        raise ValueError(
            f"k-means init draws k={k} distinct points from rank 0's {x.shape[0]}: raise objective.kmeans_samples "
            "(split over the ranks) or lower objective.num_centroids"
        )
    idx = torch.randperm(x.shape[0], generator=generator)[:k]
    return x[idx.to(x.device)].clone()


def kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) under the squared L2 distance: (k, D).

    Costs k passes over x. Once every point coincides with a seed, the rest are drawn
    uniformly (duplicates then become empty clusters, which the iterations split).
    """
    if x.shape[0] < 1:
        raise ValueError("k-means++ init needs at least one point")
    seeds = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    seeds[0] = x[int(torch.randint(0, x.shape[0], (1,), generator=generator))]
    min_d2 = ((x - seeds[0]) ** 2).sum(1)  # (M,)
    for i in range(1, k):
        weight = min_d2.double().cpu()
        if float(weight.sum()) <= 0:
            seeds[i:] = x[torch.randint(0, x.shape[0], (k - i,), generator=generator).to(x.device)]
            break
        seeds[i] = x[int(torch.multinomial(weight, 1, generator=generator))]
        min_d2 = torch.minimum(min_d2, ((x - seeds[i]) ** 2).sum(1))
    return seeds


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> int:
    """Re-seed every empty centroid by splitting a populated cluster in place; returns the number split.

    faiss's rule (Clustering.cpp split_clusters): the cluster to split is drawn with
    probability proportional to (count - 1); the empty centroid becomes a copy of it
    and the two move apart symmetrically by a relative 1/1024 (even dimensions up,
    odd down for one, the reverse for the other; floored at 1/1024 so a zero centroid,
    e.g. black patches, splits too); each keeps half the count. Deterministic given
    `counts` and `generator`: ranks with the same global counts agree.
    """
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    counts = counts.double().cpu().clone()
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1
    done = 0
    for ci in empty:
        weight = (counts - 1).clamp_min(0)
        if float(weight.sum()) <= 0:  # no cluster has two points left: nothing to split
            break
        cj = int(torch.multinomial(weight, 1, generator=generator))
        base = centroids[cj].clone()
        delta = SPLIT_EPS * sign * base.abs().clamp_min(SPLIT_EPS)
        centroids[ci] = base + delta
        centroids[cj] = base - delta
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
        done += 1
    return done


def _assign_stats(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-centroid sums with counts as a last column (K, D + 1), and the summed squared error (1,)."""
    ext = _extended(centroids)
    stats = torch.zeros(centroids.shape[0], centroids.shape[1] + 1, dtype=torch.float32, device=x.device)
    sse = torch.zeros(1, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        chunk = _with_ones(x[start : start + chunk_size].float())  # (m, D + 1)
        ids = nearest_code(chunk, ext, chunk_size)
        stats.index_add_(0, ids, chunk)
        sse += ((chunk[:, :-1] - centroids[ids]) ** 2).sum().double()
    return stats, sse


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 20,
    *,
    init: str | torch.Tensor = "random",
    seed: int = 1,
    chunk_size: int = CHUNK_SIZE,
) -> KMeansResult:
    """Lloyd's k-means (L2) of this rank's points x (M, D), jointly with the other ranks' points.

    Defaults from the official train_faiss_kmeans.py: 20 iterations, seed 1, random
    init. `init`: "random" | "kmeans++" (drawn on rank 0 from its points, broadcast) or
    a (k, D) tensor, the same on every rank. Each iteration: assign (chunked), all-reduce
    the per-centroid sums and counts once, move each centroid to its points' mean,
    split empty clusters. A last pass gives the counts and the error of the final
    centroids. Every rank must call it (collectives). Computes in float32.
    """
    rank, world = rank_and_world()
    x = x.float()
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"init centroids of shape {tuple(init.shape)}, expected {(k, x.shape[1])}")
        centroids = init.detach().to(device=x.device, dtype=torch.float32).clone()
    elif init not in KMEANS_INITS:
        raise ValueError(f"unknown k-means init {init!r}; valid choices: {', '.join(KMEANS_INITS)}")
    else:
        centroids = torch.empty(k, x.shape[1], dtype=torch.float32, device=x.device)
        if rank == 0:
            draw = random_init if init == "random" else kmeans_pp_init
            centroids.copy_(draw(x, k, torch.Generator().manual_seed(seed)))
        if world > 1:
            dist.broadcast(centroids, src=0)
    splits = 0
    progress = Progress(f"k-means, {k} centroids", total=iters, unit="iter", logger=log, enabled=rank == 0)
    for it in range(iters):
        stats, sse = _assign_stats(x, centroids, chunk_size)
        if world > 1:
            dist.all_reduce(stats)
        counts = stats[:, -1]
        used = counts > 0
        centroids[used] = stats[used, :-1] / counts[used, None]
        # Same counts and seed on every rank: the same splits.
        splits += split_empty_clusters(centroids, counts, torch.Generator().manual_seed(seed * 1_000_003 + it))
        log.debug("k-means iteration %d: summed squared error before the update %.6g", it, float(sse))
        progress.update()
    progress.close()
    stats, sse = _assign_stats(x, centroids, chunk_size)
    totals = torch.cat([stats[:, -1].double(), sse])  # (K + 1,): counts | summed squared error
    if world > 1:
        dist.all_reduce(totals)
    counts = totals[:-1].float()
    mse = float(totals[-1]) / max(1.0, float(counts.sum())) / x.shape[1]
    return KMeansResult(centroids, counts, mse, splits)


# --- files --------------------------------------------------------------------------


def save_centroids(
    path: str | Path,
    centroids: torch.Tensor,
    *,
    patch_size: int,
    counts: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the centroids artifact (see the module docstring) into directory `path`."""
    k, d = centroids.shape
    if d != patch_size * patch_size * 3:
        raise ValueError(f"centroids of {d} dims do not match {patch_size}x{patch_size}x3 patches")
    tensors = {"centroids": centroids, "counts": torch.zeros(k) if counts is None else counts}
    meta = {"num_centroids": int(k), "patch_size": int(patch_size), "layout": LAYOUT, **(extra or {})}
    return save_artifact(path, "centroids", tensors, meta)


def build_hint() -> str:
    """How to get centroids: what a missing-centroids error prints."""
    return (
        "leave objective.tokenizer empty to build them by k-means at the start of the run, or pass "
        "models:/ccvit-centroids-<k>x<patch>/latest, runs:/<run_id>/centroids or an export/centroids directory"
    )


class StoredCentroids(NamedTuple):
    """What `load_centroids` returns."""

    centroids: torch.Tensor  # (K, p*p*3) float32, pixels in [0, 1]
    counts: torch.Tensor  # (K,) sample points per centroid when they were built (zeros if unknown)
    meta: dict[str, Any]  # the artifact's metadata


def load_centroids(source: str, *, tracking_uri: str | None = None) -> StoredCentroids:
    """The centroids at a `models:/`/`runs:/` URI, a directory (`save_centroids`) or a .npy file.

    A .npy is the official train_faiss_kmeans.py output: (K, 3*p*p) with channel-first
    patches, reordered here to (row, column, channel).
    """
    if "://" in source and not source.startswith(MODEL_URI_SCHEMES):
        raise ArtifactError(f"objective.tokenizer={source}: use models:/..., runs:/<run_id>/centroids or a local path")
    if source.endswith(".npy"):
        return _from_faiss_npy(Path(source).expanduser(), source)
    artifact = read_artifact(source, "centroids", tracking_uri=tracking_uri, hint=build_hint())
    centroids = artifact.tensors["centroids"].float()
    counts = artifact.tensors.get("counts", torch.zeros(centroids.shape[0])).float()
    return StoredCentroids(centroids, counts, artifact.meta)


def _from_faiss_npy(path: Path, label: str) -> StoredCentroids:
    import numpy as np

    if not path.is_file():
        raise ArtifactNotFound(f"objective.tokenizer={label}: no such file; {build_hint()}")
    array = np.load(path, allow_pickle=False)
    patch = int(round(math.sqrt(array.shape[1] / 3))) if array.ndim == 2 else 0
    if array.ndim != 2 or 3 * patch * patch != array.shape[1]:
        raise ValueError(f"objective.tokenizer={label}: expected (K, 3*p*p) centroids, got shape {array.shape}")
    k = array.shape[0]
    # official layout: (channel, row, column) per patch -> ours: (row, column, channel)
    centroids = torch.from_numpy(array).float().view(k, 3, patch, patch).permute(0, 2, 3, 1).reshape(k, -1)
    meta = {"kind": "centroids", "num_centroids": k, "patch_size": patch, "source": "faiss .npy"}
    return StoredCentroids(centroids.contiguous(), torch.zeros(k), meta)
