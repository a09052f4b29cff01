"""VQ-KD codebook: an l2-normalised codebook updated by EMA, as in BEiT v2.

Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers",
2022; official code microsoft/unilm beit2/norm_ema_quantizer.py (NormEMAVectorQuantizer).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class QuantOutput(NamedTuple):
    """What `NormEMAQuantizer.forward` returns.

    z_q: (B, N, dim) quantised vectors with the straight-through gradient to z.
    codes: (B, N) long, index of the nearest code.
    commit_loss: MSE(z_q.detach(), z), unweighted (the caller applies the weight).
    A NamedTuple so that DeepSpeed ZeRO-3 sees the tensors in it.
    """

    z_q: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 16384) -> torch.Tensor:
    """Index of the code with the largest dot product (= cosine for unit vectors), in chunks.

    z: (M, D), codebook: (K, D) -> (M,) long. Chunking bounds memory at chunk_size x K.
    """
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], chunk_size):
        out[start : start + chunk_size] = (z[start : start + chunk_size] @ codebook.t()).argmax(dim=1)
    return out


def code_sums(z: torch.Tensor, codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Per-code sum of the assigned vectors with the count as a last column: (K, D + 1).

    One tensor so a single all-reduce syncs both across ranks.
    """
    z1 = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)  # (M, D + 1)
    return torch.zeros(num_codes, z1.shape[1], dtype=z.dtype, device=z.device).index_add_(0, codes, z1)


def _sample_rows(x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n rows of x: without replacement if x has enough rows, else with replacement."""
    if x.shape[0] >= n:
        idx = torch.randperm(x.shape[0], generator=generator, device="cpu")[:n]
    else:
        idx = torch.randint(0, x.shape[0], (n,), generator=generator, device="cpu")
    return x[idx.to(x.device)]


def kmeans_pp_seeds(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding under the cosine distance 1 - x.c; x: (M, D) unit rows -> (k, D).

    Once every point coincides with a seed (fewer distinct points than k), the rest
    are drawn uniformly, with replacement.
    """
    first = int(torch.randint(0, x.shape[0], (1,), generator=generator))
    seeds = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    seeds[0] = x[first]
    min_dist = (1 - x @ seeds[0]).clamp_min(0)  # (M,)
    for i in range(1, k):
        weight = (min_dist**2).cpu()
        if float(weight.sum()) <= 0:
            seeds[i:] = _sample_rows(x, k - i, generator)
            break
        seeds[i] = x[int(torch.multinomial(weight, 1, generator=generator))]
        min_dist = torch.minimum(min_dist, (1 - x @ seeds[i]).clamp_min(0))
    return seeds


def cosine_kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Spherical k-means on unit rows x: (M, D) -> (k, D) unit centroids.

    Assign by max cosine, centroid = l2-normalised mean; an empty cluster keeps its
    centroid (as beit2/norm_ema_quantizer.py `kmeans(use_cosine_sim=True)`). Seeds are
    k-means++ (the official code samples uniformly), which keeps far-apart clusters
    from sharing a code.
    """
    means = kmeans_pp_seeds(x, k, generator)
    for _ in range(iters):
        stats = code_sums(x, nearest_code(x, means), k)
        used = stats[:, -1] > 0
        means[used] = F.normalize(stats[used, :-1], dim=1, eps=eps)
    return means


class NormEMAQuantizer(nn.Module):
    """Nearest-code quantiser over an l2-normalised codebook, updated by EMA (no gradient).

    Defaults from BEiT v2 (paper Sec. 2.2; beit2/modeling_vqkd.py): 8192 codes x 32 dims,
    decay 0.99, k-means init with 10 cosine iterations.

    In training mode each forward updates the codebook: per code, m = normalize(mean
    of the assigned z); codebook = normalize(decay * codebook + (1 - decay) * m) for
    codes that got vectors; unused codes keep their value. Sums and counts are
    all-reduced when torch.distributed is initialised, so every rank holds the same
    codebook. Eval mode never changes state (a frozen tokenizer). Because of that
    side effect, do not put this module under activation checkpointing (a recomputed
    forward would update twice).

    All state is in buffers (`codebook`, `initted`, `steps_unused`), so module
    state_dicts and DeepSpeed checkpoints carry it; ZeRO-3 partitions parameters,
    not buffers, so the codebook stays whole on every rank. Updates are computed in
    float32 whatever the buffer's dtype.
    """

    codebook: torch.Tensor
    initted: torch.Tensor
    steps_unused: torch.Tensor

    def __init__(
        self,
        num_codes: int = 8192,
        dim: int = 32,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        eps: float = 1e-5,
        restart_dead_codes: bool = False,
        dead_code_window: int = 100,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1); the BEiT v2 recipe uses 0.99.")
        if num_codes < 1 or dim < 1 or dead_code_window < 1:
            raise ValueError(
                f"num_codes={num_codes}, dim={dim}, dead_code_window={dead_code_window}: all must be >= 1."
            )
        self.num_codes = num_codes
        self.dim = dim
        self.decay = decay
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.eps = eps  # floor of the l2 norm in every normalisation
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_window = dead_code_window  # training steps without any vector -> dead
        self.register_buffer("codebook", F.normalize(torch.randn(num_codes, dim), dim=1))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, kmeans_init={self.kmeans_init}"

    def forward(self, z: torch.Tensor) -> QuantOutput:
        """Quantise z: (B, N, dim); in training mode also init (once) and update the codebook."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected the last dim of z to be {self.dim}, got shape {tuple(z.shape)}")
        z = F.normalize(z, dim=-1, eps=self.eps)
        z_flat = z.reshape(-1, self.dim)
        with torch.no_grad():
            zf = z_flat.detach().float()  # (M, dim)
            if self.training and not bool(self.initted):
                self._init_codebook(zf)
            codebook = self.codebook.float()
            codes = nearest_code(zf, codebook)  # (M,)
            z_q = codebook[codes].to(z.dtype).view_as(z)  # looked up before the update, as the official code
            if self.training:
                self._ema_update(zf, codes)
        commit_loss = F.mse_loss(z_q, z)  # z_q carries no grad: MSE(sg[z_q], z)
        z_q = z + (z_q - z).detach()  # straight-through: d loss/d z = d loss/d z_q
        return QuantOutput(z_q, codes.view(z.shape[:-1]), commit_loss)

    @torch.no_grad()
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors for code indices: (...) long -> (..., dim)."""
        return self.codebook[codes]

    @torch.no_grad()
    def _init_codebook(self, zf: torch.Tensor) -> None:
        # Rank 0 runs k-means on its own batch and broadcasts: identical on all ranks
        # (the official code inits each rank on its own batch, leaving them different).
        if not _distributed() or dist.get_rank() == 0:
            log.info("k-means init of %d codes on %d vectors", self.num_codes, zf.shape[0])
            means = cosine_kmeans(zf, self.num_codes, self.kmeans_iters, eps=self.eps)
        else:
            means = torch.empty(self.num_codes, self.dim, dtype=zf.dtype, device=zf.device)
        if _distributed():
            dist.broadcast(means, src=0)
        self.codebook.copy_(means)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, zf: torch.Tensor, codes: torch.Tensor) -> None:
        stats = code_sums(zf, codes, self.num_codes)  # (K, dim + 1): sums | counts
        if _distributed():
            dist.all_reduce(stats)
        counts = stats[:, -1]
        used = counts > 0
        codebook = self.codebook.float()
        mean = F.normalize(stats[used, :-1] / counts[used, None], dim=1, eps=self.eps)
        codebook[used] = F.normalize(self.decay * codebook[used] + (1 - self.decay) * mean, dim=1, eps=self.eps)
        # Counts are global, so the window (and any restart) is the same on every rank.
        self.steps_unused.add_(1).masked_fill_(used, 0)
        if self.restart_dead_codes:
            self._restart_dead(zf, codebook)
        self.codebook.copy_(codebook)

    def _restart_dead(self, zf: torch.Tensor, codebook: torch.Tensor) -> None:
        dead = self.steps_unused >= self.dead_code_window
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # Re-seed from random vectors of rank 0's batch, broadcast so all ranks agree.
        if not _distributed() or dist.get_rank() == 0:
            seeds = _sample_rows(zf, n_dead)
        else:
            seeds = torch.empty(n_dead, self.dim, dtype=zf.dtype, device=zf.device)
        if _distributed():
            dist.broadcast(seeds, src=0)
        codebook[dead] = seeds
        self.steps_unused.masked_fill_(dead, 0)
        log.debug("restarted %d dead codes", n_dead)

    @torch.no_grad()
    def usage_stats(self, codes: torch.Tensor, sync: bool = False) -> dict[str, torch.Tensor]:
        """Codebook metrics: `codebook_usage`, `perplexity` over `codes`, and `dead_codes`.

        codebook_usage: fraction of codes that occur in `codes`; perplexity: exp of the
        entropy of their frequencies. Both are per-rank unless `sync=True`, which
        all-reduces the histogram (a collective: every rank must call it).
        dead_codes: codes unused by every rank for >= `dead_code_window` training steps
        (global: it comes from the all-reduced counts of the EMA update).
        """
        hist = torch.bincount(codes.flatten(), minlength=self.num_codes).float()
        if sync and _distributed():
            dist.all_reduce(hist)
        p = hist / hist.sum().clamp_min(1)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return {
            "codebook_usage": (hist > 0).float().mean(),
            "perplexity": entropy.exp(),
            "dead_codes": (self.steps_unused >= self.dead_code_window).sum().float(),
        }
