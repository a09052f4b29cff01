"""VQ-KD codebook (NormEMAQuantizer) against hand-computed and brute-force expectations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from objectives.components.quantizer import NormEMAQuantizer, cosine_kmeans


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _quantizer_with(codebook: list[list[float]], **kwargs: object) -> NormEMAQuantizer:
    q = NormEMAQuantizer(num_codes=len(codebook), dim=len(codebook[0]), kmeans_init=False, **kwargs)
    q.codebook.copy_(torch.tensor(codebook))
    return q


def test_ema_update_matches_formula_by_hand() -> None:
    decay = 0.9
    codebook = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    # Assignments by cosine: (3, 1), (2, -1) -> code 0; (1, 4), (-1, 3), (1, 2) -> code 1; code 2 unused.
    vectors = [[3.0, 1.0], [2.0, -1.0], [1.0, 4.0], [-1.0, 3.0], [1.0, 2.0]]
    q = _quantizer_with(codebook, decay=decay).train()
    out = q(torch.tensor([vectors]))
    assert out.codes.tolist() == [[0, 0, 1, 1, 1]]

    def expected(code: list[float], members: list[list[float]]) -> list[float]:
        units = [_unit(v) for v in members]
        mean = _unit([sum(u[i] for u in units) / len(units) for i in range(2)])
        return _unit([decay * code[i] + (1 - decay) * mean[i] for i in range(2)])

    want = [expected(codebook[0], vectors[:2]), expected(codebook[1], vectors[2:]), codebook[2]]
    torch.testing.assert_close(q.codebook, torch.tensor(want))
    assert q.steps_unused.tolist() == [0, 0, 1]


def test_eval_mode_leaves_codebook_unchanged() -> None:
    q = _quantizer_with([[1.0, 0.0], [0.0, 1.0]]).eval()
    before = q.state_dict()
    q(torch.randn(2, 3, 2))
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_straight_through_gradient_and_commit_loss_by_hand() -> None:
    q = _quantizer_with([[0.6, 0.8], [-0.6, 0.8]]).eval()
    x = torch.tensor([[[2.0, 0.0], [-1.0, 1.0]]], requires_grad=True)
    w = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])
    out = q(x)
    assert out.codes.tolist() == [[0, 1]]
    # z = [(1, 0), (-1, 1)/sqrt2]; z_q = [(0.6, 0.8), (-0.6, 0.8)]
    s = 1 / math.sqrt(2)
    sq = [(1 - 0.6) ** 2, 0.8**2, (-s + 0.6) ** 2, (s - 0.8) ** 2]
    assert out.commit_loss.item() == pytest.approx(sum(sq) / 4)
    torch.testing.assert_close(out.z_q.detach(), torch.tensor([[[0.6, 0.8], [-0.6, 0.8]]]))
    # Straight-through: the gradient reaching x is that of the same loss on z instead of z_q.
    (grad_st,) = torch.autograd.grad((w * out.z_q).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (grad_z,) = torch.autograd.grad((w * F.normalize(x2, dim=-1)).sum(), x2)
    torch.testing.assert_close(grad_st, grad_z)
    assert grad_st.abs().sum() > 0


def test_nearest_code_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    q = NormEMAQuantizer(num_codes=37, dim=8, kmeans_init=False).eval()
    z = torch.randn(3, 50, 8, generator=gen)
    codes = q(z).codes
    zn = F.normalize(z.reshape(-1, 8), dim=1)
    brute = [min(range(37), key=lambda k, v=v: float(((v - q.codebook[k]) ** 2).sum())) for v in zn]
    assert codes.flatten().tolist() == brute


def _clusters(n_clusters: int, dim: int, per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=gen), dim=1)
    labels = torch.arange(n_clusters).repeat_interleave(per)
    x = F.normalize(centres[labels] + 0.01 * torch.randn(len(labels), dim, generator=gen), dim=1)
    return x, labels


def test_kmeans_init_gives_normalised_centroids_one_code_per_cluster() -> None:
    x, labels = _clusters(3, 3, 20, seed=0)
    q = NormEMAQuantizer(num_codes=3, dim=3, kmeans_init=True, kmeans_iters=10).train()
    assert not bool(q.initted)
    codes = q(x[None]).codes[0]
    assert bool(q.initted)
    assert len(set(codes.tolist())) == 3
    for c in range(3):
        members = x[labels == c]
        assert len(set(codes[labels == c].tolist())) == 1
        # converged k-means: the code is the l2-normalised mean, and the EMA step keeps it there
        torch.testing.assert_close(q.codebook[codes[labels == c][0]], F.normalize(members.mean(0), dim=0))
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(3))


def test_cosine_kmeans_separates_clusters_and_handles_few_points() -> None:
    for seed in range(5):
        x, labels = _clusters(8, 16, 10, seed=seed)
        means = cosine_kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(seed))
        assign = (x @ means.t()).argmax(1)
        # one code per cluster: the map label -> code is a bijection
        pairs = set(zip(labels.tolist(), assign.tolist(), strict=True))
        assert len(pairs) == 8 and len({c for _, c in pairs}) == 8
    x = F.normalize(torch.randn(4, 5), dim=1)
    means = cosine_kmeans(x, 10, iters=3)  # more codes than points: duplicates, all unit rows
    assert means.shape == (10, 5)
    torch.testing.assert_close(means.norm(dim=1), torch.ones(10))
    assert torch.cdist(means, x).min(1).values.max() < 1e-5


def test_usage_stats_by_hand() -> None:
    q = NormEMAQuantizer(num_codes=4, dim=2, kmeans_init=False)
    stats = q.usage_stats(torch.tensor([[0, 0], [1, 1]]))
    assert stats["codebook_usage"].item() == pytest.approx(0.5)
    assert stats["perplexity"].item() == pytest.approx(2.0)
    assert stats["dead_codes"].item() == 0
    stats = q.usage_stats(torch.tensor([0, 1, 2, 3, 3, 3]))
    p = [1 / 6, 1 / 6, 1 / 6, 1 / 2]
    assert stats["codebook_usage"].item() == pytest.approx(1.0)
    assert stats["perplexity"].item() == pytest.approx(math.exp(-sum(pi * math.log(pi) for pi in p)))


def test_dead_codes_window_and_restart() -> None:
    codebook = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
    z = torch.tensor([[[1.0, 0.1], [1.0, -0.2]]])  # all assigned to code 0
    q = _quantizer_with(codebook, dead_code_window=2).train()
    q(z)
    assert q.usage_stats(torch.zeros(1, dtype=torch.long))["dead_codes"].item() == 0
    q(z)
    assert q.usage_stats(torch.zeros(1, dtype=torch.long))["dead_codes"].item() == 3
    # restart: after the window the 3 unused codes are re-seeded from the batch's (normalised) vectors
    q = _quantizer_with(codebook, dead_code_window=2, restart_dead_codes=True).train()
    q(z)
    torch.testing.assert_close(q.codebook[1:], torch.tensor(codebook[1:]))
    q(z)
    zn = F.normalize(z[0], dim=1)
    assert torch.cdist(q.codebook[1:], zn).min(1).values.max() < 1e-6
    assert q.steps_unused.tolist() == [0, 0, 0, 0]


def test_state_dict_round_trip_keeps_codebook_and_init_flag() -> None:
    x, _ = _clusters(4, 6, 5, seed=1)
    q = NormEMAQuantizer(num_codes=4, dim=6, kmeans_init=True).train()
    q(x[None])
    q2 = NormEMAQuantizer(num_codes=4, dim=6, kmeans_init=True)
    assert not bool(q2.initted)
    q2.load_state_dict(q.state_dict())
    assert bool(q2.initted)
    torch.testing.assert_close(q2.codebook, q.codebook)
    assert torch.equal(q2.steps_unused, q.steps_unused)
    # initted: a training forward updates the loaded codebook by EMA instead of re-running k-means
    q.train()(x[None])
    q2.train()(x[None])
    torch.testing.assert_close(q2.codebook, q.codebook)


# --- two ranks (gloo) ------------------------------------------------------------------------


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    ema_z = torch.randn(2 + rank, 5, 4, generator=gen)  # ranks hold different batch sizes
    x, _ = _clusters(3, 4, 6, seed=7)
    return ema_z, x[rank * 9 : (rank + 1) * 9][None]  # each rank sees half of the clustered points


def _build(seed: int, **kwargs: object) -> NormEMAQuantizer:
    torch.manual_seed(seed)  # the same initial codebook on every rank
    return NormEMAQuantizer(dim=4, **kwargs).train()


def _worker(rank: int, out_dir: str) -> None:
    torch.manual_seed(1000 + rank)  # rank-local RNG differs; results must not depend on it
    ema_z, km_x = _rank_data(rank)
    q = _build(0, num_codes=6, kmeans_init=False, decay=0.8)
    codes = q(ema_z).codes
    stats = q.usage_stats(codes, sync=True)
    km = _build(0, num_codes=3, kmeans_init=True)
    km(km_x)
    dead = _build(0, num_codes=32, kmeans_init=False, restart_dead_codes=True, dead_code_window=1)
    dead(ema_z)
    torch.save(
        {"ema": q.codebook, "stats": stats, "kmeans": km.codebook, "restart": dead.codebook},
        Path(out_dir) / f"rank{rank}.pt",
    )


def test_two_ranks_agree_and_equal_one_process_on_concatenated_data(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_worker, 2, str(tmp_path), timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in ("ema", "kmeans", "restart"):
        assert torch.equal(r0[key], r1[key]), key
    # one process, concatenated data: the same EMA update and the same global usage stats
    (z0, _), (z1, _) = _rank_data(0), _rank_data(1)
    q = _build(0, num_codes=6, kmeans_init=False, decay=0.8)
    codes = q(torch.cat([z0.reshape(1, -1, 4), z1.reshape(1, -1, 4)], dim=1)).codes
    torch.testing.assert_close(r0["ema"], q.codebook)
    for k, v in q.usage_stats(codes).items():
        torch.testing.assert_close(r0["stats"][k], v)
    assert r0["stats"]["codebook_usage"] > 0
