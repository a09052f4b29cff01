"""Frozen-feature probes: weighted kNN and the logistic-regression linear probe, against independent expectations."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.probe import (
    accuracy,
    confusion_matrix,
    fit_logistic_regression,
    knn_predict,
    knn_votes,
    linear_probe_predict,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def knn_scores(*args, **options) -> torch.Tensor:
    """Vote shares (M, C): each row of `knn_votes` divided by its sum (DINO's weighted kNN)."""
    votes = knn_votes(*args, **options)
    return votes / votes.sum(dim=1, keepdim=True)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_clusters(
    per_class: int, num_classes: int, dim: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Points at 3 * e_c + spread * noise: well apart in angle (cosine) and linearly separable."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (N,)
    feats = spread * torch.randn(labels.numel(), dim, generator=gen(seed))  # (N, D)
    feats[torch.arange(labels.numel()), labels] += 3.0
    return feats, labels


# ---------------------------------------------------------------------------------------------
# kNN
# ---------------------------------------------------------------------------------------------


def brute_force_knn(fit, fit_labels, queries, num_classes, k, temperature):
    """One query at a time in float64 numpy: sort cosine similarities, take k, add exp(sim / T) per label."""
    fit = fit.double().numpy()
    queries = queries.double().numpy()
    scores, preds = [], []
    for q in queries:
        sims = [float(q @ f / (np.linalg.norm(q) * np.linalg.norm(f))) for f in fit]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in order:
            votes[int(fit_labels[j])] += math.exp(sims[j] / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
        scores.append([v / sum(votes) for v in votes])
    return torch.tensor(preds), torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 5, 20, 37, 100])
def test_knn_equals_brute_force_loop(k: int, device: str) -> None:
    g = gen(k)
    fit, queries = torch.randn(37, 6, generator=g), torch.randn(23, 6, generator=g)
    fit_labels = torch.randint(0, 4, (37,), generator=g)
    for temperature in (0.07, 0.5):
        want_preds, want_scores = brute_force_knn(fit, fit_labels, queries, 4, k, temperature)
        for chunk_size in (1, 7, 4096):
            args = (fit.to(device), fit_labels.to(device), queries.to(device), 4)
            kw = dict(k=k, temperature=temperature, chunk_size=chunk_size)
            preds = knn_predict(*args, **kw)
            assert preds.dtype == torch.int64 and preds.device.type == device
            assert torch.equal(preds.cpu(), want_preds), (k, temperature, chunk_size)
            torch.testing.assert_close(knn_scores(*args, **kw).cpu().double(), want_scores, rtol=1e-4, atol=1e-5)


def test_knn_hand_computed_temperature_weighting_overrules_the_majority() -> None:
    # Query (1, 0). Cosine similarities: A = 1.0 (class 0), B, C = 0.8 (class 1), D = 0.0, E = -1.0 (class 2).
    # k = 3 takes A, B, C: unweighted majority says class 1 (2 votes to 1), but with T = 0.07
    # class 0 gets exp(1/0.07) = e^14.29 and class 1 gets 2 exp(0.8/0.07) = 2 e^11.43, i.e. e^2.86 / 2
    # = 8.7x less -> class 0. With T = 10 the weights are nearly flat: e^0.1 = 1.11 < 2 e^0.08 = 2.17 -> class 1.
    fit = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [0.0, 1.0], [-1.0, 0.0]])
    fit_labels = torch.tensor([0, 1, 1, 2, 2])
    query = torch.tensor([[2.0, 0.0]])  # norm 2: only the direction matters
    assert knn_predict(fit, fit_labels, query, 3, k=3, temperature=0.07).tolist() == [0]
    assert knn_predict(fit, fit_labels, query, 3, k=3, temperature=10.0).tolist() == [1]
    # Vote shares at T = 0.07, k = 3: class 0 gets 1 / (1 + 2 e^{-0.2/0.07}) = 0.8970.
    share0 = 1.0 / (1.0 + 2.0 * math.exp(-0.2 / 0.07))
    torch.testing.assert_close(
        knn_scores(fit, fit_labels, query, 3, k=3), torch.tensor([[share0, 1 - share0, 0.0]]), rtol=1e-5, atol=1e-6
    )
    # k = 5 (all five) adds e^0 + e^{-1/0.07} to class 2: still class 0.
    assert knn_predict(fit, fit_labels, query, 3, k=5).tolist() == [0]


def test_knn_vote_tie_goes_to_the_lowest_class_id() -> None:
    # (0.6, 0.8) and (0.6, -0.8) have the same similarity 0.6 to (1, 0): equal votes for classes 2 and 1.
    fit = torch.tensor([[0.6, 0.8], [0.6, -0.8]])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(fit, torch.tensor([2, 1]), query, 3, k=2).tolist() == [1]
    assert knn_predict(fit, torch.tensor([1, 2]), query, 3, k=2).tolist() == [1]


def test_knn_computes_in_float32_whatever_the_input_dtype() -> None:
    g = gen(3)
    fit, queries = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    fit_labels = torch.randint(0, 5, (50,), generator=g)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low_fit, low_q = fit.to(dtype), queries.to(dtype)
        # Same numbers, cast to float32 beforehand: identical votes.
        want = knn_scores(low_fit.float(), fit_labels, low_q.float(), 5)
        got = knn_scores(low_fit, fit_labels, low_q, 5)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(knn_predict(low_fit, fit_labels, low_q, 5), want.argmax(dim=1))


def test_knn_accuracy_is_one_on_tiny_clusters_and_one_minus_p_with_misplaced_queries() -> None:
    fit, fit_labels = tiny_clusters(per_class=30, num_classes=4, dim=4, spread=0.01, seed=0)
    queries, query_labels = tiny_clusters(per_class=10, num_classes=4, dim=4, spread=0.01, seed=1)
    assert accuracy(knn_predict(fit, fit_labels, queries, 4), query_labels) == 1.0
    # Move exactly p = 10/40 of the queries into the next class's cluster, keeping their true label:
    # all k = 20 neighbours (< 30 per cluster) of each come from the wrong cluster -> accuracy exactly 0.75.
    moved = torch.arange(0, 40, 4)  # 10 queries, spread over all classes
    queries[moved] = queries[moved].roll(1, dims=1)  # 3 e_c -> 3 e_{c+1}
    preds = knn_predict(fit, fit_labels, queries, 4)
    assert accuracy(preds, query_labels) == 1.0 - 10 / 40
    assert torch.equal(preds[moved], (query_labels[moved] + 1) % 4)


def test_knn_predictions_follow_a_permutation_of_class_ids() -> None:
    g = gen(5)
    fit, queries = torch.randn(60, 5, generator=g), torch.randn(40, 5, generator=g)
    fit_labels = torch.randint(0, 3, (60,), generator=g)
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(knn_predict(fit, perm[fit_labels], queries, 3), perm[knn_predict(fit, fit_labels, queries, 3)])


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


def test_logistic_regression_matches_sklearn() -> None:
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    g = gen(0)
    n, d, c, wd = 120, 5, 3, 1e-2
    labels = torch.randint(0, c, (n,), generator=g)
    feats = torch.randn(n, d, generator=g) + 0.8 * F.one_hot(labels, d).float()  # overlapping: a finite optimum
    weight, bias = fit_logistic_regression(feats, labels, c, weight_decay=wd)
    # sklearn minimises C sum_i CE_i + ||W||^2 / 2 (intercept not penalised) = ours x (2 C n) with C = 1 / (2 n wd).
    ref = sklearn_lm.LogisticRegression(C=1 / (2 * n * wd), tol=1e-10, max_iter=10_000)
    ref.fit(feats.double().numpy(), labels.numpy())
    np.testing.assert_allclose(weight.numpy(), ref.coef_.T, atol=2e-4)
    # Softmax is blind to a common shift of the (undecayed) biases: compare them centred.
    np.testing.assert_allclose(bias.numpy() - bias.numpy().mean(), ref.intercept_ - ref.intercept_.mean(), atol=2e-4)


def test_linear_probe_is_standardisation_then_logistic_regression_on_the_whole_fit_set() -> None:
    g = gen(1)
    labels = torch.randint(0, 3, (90,), generator=g)
    feats = torch.randn(90, 4, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0]) + 0.7 * F.one_hot(labels, 4).float()
    queries = torch.randn(200, 4, generator=g) * 3.0
    result = linear_probe_predict(feats, labels, queries, 3, weight_decays=(1e-3,))
    assert result.weight_decay == 1e-3 and result.val_accuracy is None  # one candidate: no selection
    # By hand: BatchNorm-style statistics (biased variance, eps 1e-6), then the plain fit.
    x = feats.double().numpy()
    mean, scale = x.mean(axis=0), 1.0 / np.sqrt(x.var(axis=0) + 1e-6)
    weight, bias = fit_logistic_regression(torch.from_numpy((x - mean) * scale).float(), labels, 3, weight_decay=1e-3)
    want = (torch.from_numpy((queries.double().numpy() - mean) * scale).float() @ weight + bias).argmax(dim=1)
    assert torch.equal(result.predictions, want)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_probe_accuracy_is_one_on_tiny_clusters(device: str) -> None:
    fit, fit_labels = tiny_clusters(per_class=20, num_classes=5, dim=8, spread=0.01, seed=0)
    queries, query_labels = tiny_clusters(per_class=10, num_classes=5, dim=8, spread=0.01, seed=1)
    result = linear_probe_predict(fit.to(device), fit_labels.to(device), queries.to(device), 5)
    assert result.predictions.dtype == torch.int64 and result.predictions.device.type == device
    assert accuracy(result.predictions, query_labels.to(device)) == 1.0
    assert result.val_accuracy == 1.0


def xor_data(per_cluster: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 tight clusters at (+-1, +-1); label = XOR of the coordinate signs."""
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    feats = centres.repeat_interleave(per_cluster, dim=0) + 0.05 * torch.randn(4 * per_cluster, 2, generator=gen(seed))
    labels = ((feats[:, 0] > 0) ^ (feats[:, 1] > 0)).long()
    return feats, labels


def test_xor_knn_solves_it_and_the_linear_probe_cannot() -> None:
    fit, fit_labels = xor_data(per_cluster=25, seed=0)
    queries, query_labels = xor_data(per_cluster=10, seed=1)
    assert accuracy(knn_predict(fit, fit_labels, queries, 2), query_labels) == 1.0
    # At the four exact centres a linear classifier (sign of an affine function) gets at most 3 of 4
    # right, since XOR is not linearly separable: accuracy in {0, 1/4, 1/2, 3/4}.
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    centre_labels = torch.tensor([0, 1, 0, 1])
    assert accuracy(knn_predict(fit, fit_labels, centres, 2), centre_labels) == 1.0
    assert accuracy(linear_probe_predict(fit, fit_labels, centres, 2).predictions, centre_labels) <= 0.75


def test_linear_probe_standardises_mis_scaled_features() -> None:
    def sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = gen(seed)
        labels = torch.randint(0, 2, (n,), generator=g)
        signal = (2.0 * labels - 1.0) * (1.0 + torch.rand(n, generator=g))  # |x| in [1, 2]: margin 1 around 0
        return torch.stack(
            [1000.0 * torch.randn(n, generator=g), 1e-3 * signal, torch.randn(n, generator=g)], 1
        ), labels

    fit, fit_labels = sample(200, 0)
    queries, query_labels = sample(200, 1)
    result = linear_probe_predict(fit, fit_labels, queries, 2)
    assert accuracy(result.predictions, query_labels) == 1.0
    # Standardisation makes the probe blind to a per-dimension affine rescale of the features.
    scale, shift = torch.tensor([1e-3, 1e3, 1.0]), torch.tensor([5.0, -1.0, 0.0])
    rescaled = linear_probe_predict(fit * scale + shift, fit_labels, queries * scale + shift, 2)
    assert torch.equal(rescaled.predictions, result.predictions) and rescaled.weight_decay == result.weight_decay
    # Contrast: the same decay on the raw features (no standardisation) cannot afford the 1e3-sized
    # weight the 1e-3-scaled signal needs, and misses.
    weight, bias = fit_logistic_regression(fit, fit_labels, 2, weight_decay=1e-2)
    assert accuracy((queries @ weight + bias).argmax(dim=1), query_labels) < 0.9


def test_linear_probe_predictions_follow_a_permutation_of_class_ids() -> None:
    fit, fit_labels = tiny_clusters(per_class=30, num_classes=3, dim=3, spread=1.2, seed=2)  # overlapping
    queries, _ = tiny_clusters(per_class=30, num_classes=3, dim=3, spread=1.2, seed=3)
    perm = torch.tensor([2, 0, 1])
    base = linear_probe_predict(fit, fit_labels, queries, 3)
    permuted = linear_probe_predict(fit, perm[fit_labels], queries, 3)
    assert torch.equal(permuted.predictions, perm[base.predictions])
    assert permuted.weight_decay == base.weight_decay and permuted.val_accuracy == base.val_accuracy
    assert len(set(base.predictions.tolist())) == 3


def test_linear_probe_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    fit, fit_labels = tiny_clusters(per_class=30, num_classes=3, dim=6, spread=1.5, seed=4)
    queries, _ = tiny_clusters(per_class=20, num_classes=3, dim=6, spread=1.5, seed=5)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = linear_probe_predict(fit, fit_labels, queries, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    torch.manual_seed(999)  # a different global state must not matter
    second = linear_probe_predict(fit, fit_labels, queries, 3, seed=7)
    assert torch.equal(first.predictions, second.predictions)
    assert (first.weight_decay, first.val_accuracy) == (second.weight_decay, second.val_accuracy)


def test_weight_decay_selection_small_when_clean_large_when_features_are_noise() -> None:
    candidates = (1e-6, 1.0)
    # Clean, separable clusters: every decay is right on the validation split; the tie goes to
    # the lower validation cross-entropy, i.e. the more confident, less decayed fit.
    fit, fit_labels = tiny_clusters(per_class=60, num_classes=3, dim=8, spread=0.1, seed=0)
    clean = linear_probe_predict(fit, fit_labels, fit[:3], 3, weight_decays=candidates)
    assert clean.weight_decay == 1e-6 and clean.val_accuracy == 1.0
    # Tiny, noisy fit set: 100 samples of 200-d noise, labels independent of it (~75% class 0).
    # The weak decay interpolates the noise; the strong one shrinks to the class prior and wins.
    g = gen(0)
    noise_labels = (torch.rand(100, generator=g) < 0.25).long()
    noise = torch.randn(100, 200, generator=g)
    noisy = linear_probe_predict(noise, noise_labels, noise[:3], 2, weight_decays=candidates)
    assert noisy.weight_decay == 1.0


def test_weight_decay_selection_skipped_without_a_usable_split() -> None:
    fit, fit_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    # 2 samples: a 20% split has no validation sample -> the largest candidate, no accuracy.
    result = linear_probe_predict(fit, fit_labels, fit, 2, weight_decays=(1e-4, 1e-2))
    assert result.weight_decay == 1e-2 and result.val_accuracy is None
    assert result.predictions.tolist() == [0, 1]


def test_linear_probe_works_under_no_grad_and_inference_mode() -> None:
    fit, fit_labels = tiny_clusters(per_class=20, num_classes=3, dim=4, spread=1.0, seed=6)
    queries, _ = tiny_clusters(per_class=10, num_classes=3, dim=4, spread=1.0, seed=7)
    want = linear_probe_predict(fit, fit_labels, queries, 3).predictions
    with torch.no_grad():
        assert torch.equal(linear_probe_predict(fit, fit_labels, queries, 3).predictions, want)
    with torch.inference_mode():
        inf_fit, inf_queries = fit.clone(), queries.clone()  # inference tensors, as an eval loop makes them
        assert torch.equal(linear_probe_predict(inf_fit, fit_labels, inf_queries, 3).predictions, want)


# ---------------------------------------------------------------------------------------------
# Metrics and errors
# ---------------------------------------------------------------------------------------------


def test_confusion_matrix_hand_example_and_accuracy_is_its_trace_over_total() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    preds = torch.tensor([0, 1, 1, 1, 0, 2, 1, 0])
    want = torch.tensor(
        [
            [2, 1, 0],  # true 0: predicted 0, 1, 0
            [1, 2, 0],  # true 1: predicted 1, 1, 0
            [0, 1, 1],  # true 2: predicted 2, 1
        ]
    )
    cm = confusion_matrix(labels, preds, 3)
    assert cm.dtype == torch.int64 and torch.equal(cm, want)
    assert accuracy(preds, labels) == 5 / 8
    g = gen(8)
    labels, preds = torch.randint(0, 6, (500,), generator=g), torch.randint(0, 6, (500,), generator=g)
    cm = confusion_matrix(labels, preds, 6)
    assert int(cm.sum()) == 500 and torch.equal(cm.sum(dim=1), torch.bincount(labels, minlength=6))
    assert accuracy(preds, labels) == int(cm.trace()) / 500


def test_bad_inputs_raise_messages_naming_the_value() -> None:
    fit, queries = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"num_classes=2"):
        knn_predict(fit, torch.tensor([0, 1, 2, 1]), queries, 2)
    with pytest.raises(ValueError, match=r"same D"):
        linear_probe_predict(fit, torch.tensor([0, 1, 0, 1]), torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match=r"k must be >= 1, got 0"):
        knn_predict(fit, torch.tensor([0, 1, 0, 1]), queries, 2, k=0)
    with pytest.raises(ValueError, match=r"same non-empty shape"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0, 1, 1]))
