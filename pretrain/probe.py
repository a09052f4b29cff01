"""Frozen-feature evaluation protocols: weighted kNN and a linear (logistic-regression) probe.

Both take features already extracted from a frozen encoder (CLS or mean-pooled tokens) for a
labelled *fit* set and an unlabelled *query* set, and return class predictions for the queries.

- Weighted kNN (DINO: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
  Transformers", `eval_knn.py`; also solo-learn): l2-normalised features, cosine similarity,
  the k = 20 most similar fit samples each vote for their label with weight exp(sim / T),
  T = 0.07; the class with the largest summed vote wins.
- Linear probe: MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners") puts a
  BatchNorm without affine parameters before the linear head; on frozen features that is a
  per-dimension standardisation with the fit set's mean and variance. On top, a multinomial
  logistic regression fitted full batch with L-BFGS, its L2 weight decay picked by a sweep on a
  held-out split of the fit set, then refitted on the whole fit set - CLIP's linear-probe
  evaluation (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
  Supervision", appendix A.3).

Pure torch: every function works on CPU and CUDA tensors alike and computes in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

# BatchNorm's default eps: x_hat = (x - mean) / sqrt(var + eps).
STANDARDIZE_EPS = 1e-6


@dataclass(frozen=True)
class ProbeResult:
    """What `linear_probe_predict` returns."""

    predictions: Tensor  # (M,) int64, on query_feats' device
    weight_decay: float  # the decay of the final fit (chosen on the validation split, or the only/fallback one)
    val_accuracy: float | None  # accuracy of the chosen decay on the validation split; None = no selection ran


# ---------------------------------------------------------------------------------------------
# Weighted kNN
# ---------------------------------------------------------------------------------------------


def _check_labels(labels: Tensor, num_classes: int, name: str) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of class ids, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]; pass the right num_classes or remap the labels"
        )


def _check_fit_set(fit_feats: Tensor, fit_labels: Tensor, query_feats: Tensor, num_classes: int) -> None:
    if fit_feats.ndim != 2 or query_feats.ndim != 2 or fit_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(
            f"expected fit_feats (N, D) and query_feats (M, D) with the same D, got "
            f"{tuple(fit_feats.shape)} and {tuple(query_feats.shape)}"
        )
    if fit_labels.shape != (fit_feats.shape[0],):
        raise ValueError(
            f"fit_labels must be ({fit_feats.shape[0]},) to match fit_feats, got {tuple(fit_labels.shape)}"
        )
    if fit_feats.shape[0] == 0:
        raise ValueError("the fit set is empty: a probe needs at least one labelled sample")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    _check_labels(fit_labels, num_classes, "fit_labels")


def knn_votes(
    fit_feats: Tensor,
    fit_labels: Tensor,
    query_feats: Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 4096,
) -> Tensor:
    """Per-query class votes (M, C): sum_{j in top-k} exp((s_j - s_max) / T) [y_j = c], on fit_feats' device.

    s_j = cosine similarity of the query to fit sample j (DINO, Caron et al. 2021: k=20, T=0.07).
    Features are l2-normalised and compared in float32 whatever their dtype; queries go through
    `chunk_size` at a time, so memory is O(chunk_size * N), not O(M * N). k is capped at N.
    Subtracting the query's best similarity s_max scales its whole row by exp(-s_max / T) > 0:
    argmax and vote shares are unchanged, and exp never overflows float32 for small T.
    """
    _check_fit_set(fit_feats, fit_labels, query_feats, num_classes)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = fit_feats.device
    bank = F.normalize(fit_feats.detach().float(), dim=1)  # (N, D)
    bank_labels = fit_labels.detach().to(device=device, dtype=torch.int64)  # (N,)
    k = min(k, bank.shape[0])
    votes = torch.zeros(query_feats.shape[0], num_classes, device=device)  # (M, C)
    for start in range(0, query_feats.shape[0], chunk_size):
        queries = F.normalize(query_feats[start : start + chunk_size].detach().to(device).float(), dim=1)  # (m, D)
        sims, idx = (queries @ bank.T).topk(k, dim=1)  # (m, k), sorted descending
        weights = torch.exp((sims - sims[:, :1]) / temperature)  # (m, k)
        votes[start : start + chunk_size].scatter_add_(1, bank_labels[idx], weights)
    return votes


def knn_predict(fit_feats: Tensor, fit_labels: Tensor, query_feats: Tensor, num_classes: int, **options: Any) -> Tensor:
    """Weighted-kNN class predictions (M,) int64, on query_feats' device: argmax_c of `knn_votes`.

    Ties in the summed vote go to the lowest class id (torch.argmax returns the first maximum);
    which of several equally similar fit samples fill the last of the k places is unspecified.
    """
    return knn_votes(fit_feats, fit_labels, query_feats, num_classes, **options).argmax(dim=1).to(query_feats.device)


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


def _standardizer(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and 1 / sqrt(var + eps) of feats (N, D) - BatchNorm's statistics, biased variance."""
    mean = feats.mean(dim=0)  # (D,)
    var = feats.var(dim=0, unbiased=False)  # (D,)
    return mean, torch.rsqrt(var + STANDARDIZE_EPS)


def fit_logistic_regression(
    feats: Tensor, labels: Tensor, num_classes: int, *, weight_decay: float, max_iter: int = 200
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: weight (D, C), bias (C,), float32.

    Minimises mean_i CE(softmax(x_i W + b), y_i) + weight_decay * ||W||_F^2 (bias not decayed),
    from W = 0, b = 0, with torch.optim.LBFGS (strong-Wolfe line search) for up to `max_iter`
    iterations. Works under a caller's `torch.no_grad()` or `torch.inference_mode()`.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    with torch.inference_mode(False), torch.enable_grad():
        # clone(): a normal tensor autograd may save, even if feats were made under inference_mode.
        x = feats.detach().float().clone()  # (N, D)
        y = labels.detach().to(device=x.device, dtype=torch.int64).clone()  # (N,)
        weight = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)  # (D, C)
        bias = torch.zeros(num_classes, device=x.device, requires_grad=True)  # (C,)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _fit_and_score(
    train_x: Tensor, train_y: Tensor, eval_x: Tensor, num_classes: int, weight_decay: float, max_iter: int
) -> Tensor:
    """Standardise with train_x's statistics, fit the logistic regression, return eval_x's logits (M, C)."""
    mean, inv_std = _standardizer(train_x)
    weight, bias = fit_logistic_regression(
        (train_x - mean) * inv_std, train_y, num_classes, weight_decay=weight_decay, max_iter=max_iter
    )
    return ((eval_x - mean) * inv_std) @ weight + bias  # (M, C)


def _select_weight_decay(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    weight_decays: Sequence[float],
    val_fraction: float,
    max_iter: int,
    seed: int,
) -> tuple[float, float | None]:
    """(chosen decay, its validation accuracy) from a sweep on a seeded random split of the fit set.

    Highest validation accuracy wins; ties (common on small or easy validation sets) go to the
    lower validation cross-entropy. Without a split to use (fewer than 2 candidates, fewer than
    1 validation or 2 training samples) no selection runs: the only candidate, else the largest
    (the safest with that little data), with accuracy None.
    """
    n = x.shape[0]
    n_val = int(round(val_fraction * n))
    if len(weight_decays) < 2 or n_val < 1 or n - n_val < 2:
        chosen = float(max(weight_decays))
        if len(weight_decays) >= 2:
            logger.info("linear probe: %d fit samples are too few for a validation split; weight decay %g", n, chosen)
        return chosen, None
    generator = torch.Generator().manual_seed(seed)  # local: the global RNG is neither used nor moved
    perm = torch.randperm(n, generator=generator).to(x.device)  # (N,)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    best: tuple[float, float, float] | None = None  # (accuracy, cross-entropy, decay)
    for weight_decay in weight_decays:
        logits = _fit_and_score(x[train_idx], y[train_idx], x[val_idx], num_classes, weight_decay, max_iter)
        val_acc = accuracy(logits.argmax(dim=1), y[val_idx])
        val_ce = float(F.cross_entropy(logits, y[val_idx]))
        logger.debug("linear probe: weight decay %g -> val accuracy %.4f, val CE %.4f", weight_decay, val_acc, val_ce)
        if best is None or (val_acc, -val_ce) > (best[0], -best[1]):
            best = (val_acc, val_ce, float(weight_decay))
    assert best is not None
    return best[2], best[0]


def linear_probe_predict(
    fit_feats: Tensor,
    fit_labels: Tensor,
    query_feats: Tensor,
    num_classes: int,
    *,
    weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
) -> ProbeResult:
    """Standardised features + L-BFGS logistic regression, decay swept on a split of the fit set (MAE; CLIP A.3).

    x_hat = (x - mean_fit) / sqrt(var_fit + 1e-6) per dimension (BatchNorm without affine, as in
    MAE's linear probe), then `fit_logistic_regression`. The weight decay is picked on a random
    `val_fraction` of the fit set (see `_select_weight_decay`; the split depends only on `seed`
    and N, drawn from a local generator), then the probe is refitted on the whole fit set.
    Computed on fit_feats' device in float32; predictions are returned on query_feats' device.
    """
    _check_fit_set(fit_feats, fit_labels, query_feats, num_classes)
    if len(weight_decays) == 0:
        raise ValueError("weight_decays is empty: give at least one candidate, e.g. (1e-6, 1e-4, 1e-2)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    device = fit_feats.device
    x = fit_feats.detach().float()  # (N, D)
    y = fit_labels.detach().to(device=device, dtype=torch.int64)  # (N,)
    queries = query_feats.detach().to(device).float()  # (M, D)
    weight_decay, val_acc = _select_weight_decay(x, y, num_classes, weight_decays, val_fraction, max_iter, seed)
    logits = _fit_and_score(x, y, queries, num_classes, weight_decay, max_iter)  # (M, C)
    predictions = logits.argmax(dim=1).to(query_feats.device)
    return ProbeResult(predictions=predictions, weight_decay=weight_decay, val_accuracy=val_acc)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def accuracy(predictions: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy: the fraction of predictions equal to labels, in [0, 1]."""
    if predictions.shape != labels.shape or predictions.numel() == 0:
        raise ValueError(
            f"predictions and labels must have the same non-empty shape, got {tuple(predictions.shape)} "
            f"and {tuple(labels.shape)}"
        )
    correct = int((predictions == labels.to(predictions.device)).sum())  # exact count, not a float32 mean
    return correct / predictions.numel()


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts: entry [i, j] = number of samples of true class i predicted as class j."""
    if labels.shape != predictions.shape:
        raise ValueError(
            f"labels and predictions must have the same shape, got {tuple(labels.shape)} and {tuple(predictions.shape)}"
        )
    _check_labels(labels, num_classes, "labels")
    _check_labels(predictions, num_classes, "predictions")
    flat = labels.reshape(-1).long() * num_classes + predictions.reshape(-1).to(labels.device).long()  # (M,)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
