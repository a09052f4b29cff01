"""Contrastive pieces: InfoNCE / NT-Xent by hand, gathers and synchronised BN on 2 ranks, momentum, augmentations."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchvision.transforms.v2.functional as TF
from torch import nn

from objectives.components.augment import (
    ViewAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    rgb_to_grayscale,
    solarize,
)
from objectives.components.contrastive import (
    SyncBatchNorm1d,
    gather_with_grad,
    info_nce,
    nt_xent,
    projection_mlp,
)
from objectives.components.ema import buffer_copy, momentum_at, momentum_update
from objectives.configs import ViewAugmentConfig

# --- losses against loops ----------------------------------------------------------------------


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


Q = [[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0]]
K = [[0.5, 1.5], [-2.0, -0.3], [1.0, -1.0]]


def test_info_nce_equals_a_loop() -> None:
    t = 0.5
    q, k = [_unit(v) for v in Q], [_unit(v) for v in K]
    total, hits = 0.0, 0
    for i in range(3):
        logits = [_dot(q[i], k[j]) / t for j in range(3)]
        total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
        hits += max(range(3), key=lambda j, row=logits: row[j]) == i
    expected = total / 3 * 2 * t
    out = info_nce(torch.tensor(Q), torch.tensor(K), t)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert float(out.accuracy) == pytest.approx(hits / 3)
    # No gradient through the keys (they come from the momentum encoder in MoCo v3).
    k_leaf = torch.tensor(K, requires_grad=True)
    assert not info_nce(torch.tensor(Q), k_leaf, t).loss.requires_grad


def test_nt_xent_equals_a_loop_over_2n_anchors() -> None:
    t = 0.5
    z = [_unit(v) for v in Q + K]  # rows 0..2: view 1 of images 0..2; rows 3..5: view 2
    n = 3
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        logits = {j: _dot(z[i], z[j]) / t for j in range(2 * n) if j != i}
        total += -logits[positive] + math.log(sum(math.exp(x) for x in logits.values()))
    expected = total / (2 * n)
    out = nt_xent(torch.tensor(Q), torch.tensor(K), t)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    # The gradient reaches both views.
    z1, z2 = torch.tensor(Q, requires_grad=True), torch.tensor(K, requires_grad=True)
    nt_xent(z1, z2, t).loss.backward()
    assert float(z1.grad.abs().sum()) > 0 and float(z2.grad.abs().sum()) > 0


def test_nt_xent_is_low_for_matching_views_and_ignores_self_similarity() -> None:
    z = torch.eye(4) * 3
    assert float(nt_xent(z, z, 0.1).accuracy) == 1.0
    assert float(nt_xent(z, z, 0.1).loss) < 1e-3  # each view's only similar candidate is its positive


# --- momentum ----------------------------------------------------------------------------------


def test_momentum_schedule_by_the_formula() -> None:
    base, total = 0.99, 1000
    assert momentum_at(0, total, base) == pytest.approx(0.99)
    assert momentum_at(500, total, base) == pytest.approx(0.995)  # cos(pi/2) = 0: halfway to 1
    assert momentum_at(250, total, base) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * 0.01)
    assert momentum_at(1000, total, base) == pytest.approx(1.0)
    assert momentum_at(1200, total, base) == pytest.approx(1.0)
    values = [momentum_at(s, total, base) for s in range(0, 1001, 50)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="total_steps"):
        momentum_at(0, 0, base)


def test_buffer_copy_and_momentum_update_by_hand() -> None:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    target = buffer_copy(online)
    assert list(target.parameters()) == []
    names = {n for n, _ in online.named_parameters()}
    assert names <= set(dict(target.named_buffers()))
    assert target[2].bias is None
    old = {n: target.get_buffer(n).clone() for n in names}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online[1].running_mean.fill_(5.0)  # running statistics are not averaged
    momentum_update(online, target, 0.9)
    for n, p in online.named_parameters():
        torch.testing.assert_close(target.get_buffer(n), 0.9 * old[n] + 0.1 * p.detach())
    assert float(target[1].running_mean.abs().max()) == 0.0
    # Chunked gathering (here: no ZeRO, every chunk one tensor) gives the same result.
    again = buffer_copy(online)
    momentum_update(online, again, 0.5, max_numel=1)
    for n, p in online.named_parameters():
        torch.testing.assert_close(again.get_buffer(n), p.detach())


def test_projection_mlp_layout() -> None:
    mlp = projection_mlp(3, 8, 16, 4)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "SyncBatchNorm1d", "ReLU"] * 2 + ["Linear", "SyncBatchNorm1d"]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    assert not mlp[-1].affine and mlp[1].affine
    assert [type(m).__name__ for m in projection_mlp(2, 4, 8, 4, last_bn=False)][-1] == "Linear"


def test_sync_batchnorm_is_batchnorm_in_one_process() -> None:
    torch.manual_seed(1)
    x = torch.randn(6, 5)
    for affine in (True, False):
        sync, plain = SyncBatchNorm1d(5, affine=affine), nn.BatchNorm1d(5, affine=affine)
        if affine:
            with torch.no_grad():
                plain.weight.uniform_(0.5, 2)
                plain.bias.normal_()
            sync.load_state_dict(plain.state_dict())
        x1 = x.clone().requires_grad_(True)
        x2 = x.clone().requires_grad_(True)
        for _ in range(2):
            torch.testing.assert_close(sync(x1), plain(x2))
        torch.testing.assert_close(sync.running_mean, plain.running_mean)
        torch.testing.assert_close(sync.running_var, plain.running_var)
        assert int(sync.num_batches_tracked) == 2
        (sync(x1) ** 3).sum().backward()
        (plain(x2) ** 3).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        sync.eval(), plain.eval()
        torch.testing.assert_close(sync(x), plain(x))
    # bf16 input and affine parameters with float32 running statistics (DeepSpeed bf16): computed in float32.
    mixed = SyncBatchNorm1d(5)
    mixed.weight.data, mixed.bias.data = mixed.weight.data.bfloat16(), mixed.bias.data.bfloat16()
    out = mixed(x.bfloat16())
    assert out.dtype == torch.bfloat16 and mixed.running_mean.dtype == torch.float32


# --- two ranks (gloo) --------------------------------------------------------------------------

N, DIN, DOUT = 3, 4, 5


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The concatenated batch of both ranks: view-1 inputs (2N, DIN), view-2 inputs (2N, DIN), keys (2N, DOUT)."""
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(2 * N, d, generator=gen) for d in (DIN, DIN, DOUT))  # type: ignore[return-value]


def _model() -> nn.Module:
    torch.manual_seed(4)  # the same weights on every rank, as DeepSpeed broadcasts them
    return nn.Sequential(nn.Linear(DIN, DOUT), SyncBatchNorm1d(DOUT))


def _losses(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor, keys: torch.Tensor) -> dict[str, torch.Tensor]:
    z1, z2 = model(x1), model(x2)
    return {"nt_xent": nt_xent(z1, z2, 0.3).loss, "info_nce": info_nce(z1, keys, 0.2).loss}


def _run(x1: torch.Tensor, x2: torch.Tensor, keys: torch.Tensor, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """Loss, input gradients and model gradients of each loss; model gradients averaged over ranks (DeepSpeed)."""
    results = {}
    for name in ("nt_xent", "info_nce"):
        model = _model().train()
        a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        loss = _losses(model, a, b, keys)[name]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        if world > 1:
            dist.all_reduce(grads)
            grads /= world
        results[name] = {
            "loss": loss.detach(),
            "grad_x1": a.grad,
            "grad_x2": b.grad,
            "grad_params": grads,
            "running_mean": model[1].running_mean.clone(),
            "running_var": model[1].running_var.clone(),
        }
    return results


def _worker(rank: int, out_dir: str) -> None:
    x1, x2, keys = (t[rank * N : (rank + 1) * N] for t in _inputs())
    gathered = gather_with_grad(x1)
    results = _run(x1, x2, keys, world=2)
    torch.save({"results": results, "gathered": gathered}, Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_worker, 2, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x1, x2, keys = _inputs()
    torch.testing.assert_close(ranks[0]["gathered"], x1)
    one = _run(x1, x2, keys, world=1)
    for name, full in one.items():
        r0, r1 = ranks[0]["results"][name], ranks[1]["results"][name]
        # The rank losses are means over local anchors: their mean is the loss of the whole batch.
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, full["loss"])
        # Averaged (as DeepSpeed does) parameter gradients equal the one-process gradients ...
        torch.testing.assert_close(r0["grad_params"], full["grad_params"])
        torch.testing.assert_close(r1["grad_params"], full["grad_params"])
        # ... because each rank's inputs receive the sum over both ranks' losses (= 2 x the mean's).
        for key in ("grad_x1", "grad_x2") if name == "nt_xent" else ("grad_x1",):  # info_nce: x2 unused
            local = torch.cat([r0[key], r1[key]]) / 2
            torch.testing.assert_close(local, full[key])
            assert float(full[key].abs().sum()) > 0
        # Synchronised BN: statistics of the global batch.
        torch.testing.assert_close(r0["running_mean"], full["running_mean"])
        torch.testing.assert_close(r1["running_var"], full["running_var"])


# --- augmentations against torchvision ---------------------------------------------------------


def _image(seed: int, size: int = 6) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.6, 1.4]),
        (adjust_contrast, TF.adjust_contrast, [0.6, 1.4]),
        (adjust_saturation, TF.adjust_saturation, [0.2, 1.8]),
        (adjust_hue, TF.adjust_hue, [-0.1, 0.35]),
    ],
)
def test_colour_ops_match_torchvision_per_image(ours: Callable, theirs: Callable, factors: list[float]) -> None:
    images = torch.stack([_image(0), _image(1)])
    out = ours(images, torch.tensor(factors))
    for i, f in enumerate(factors):
        torch.testing.assert_close(out[i], theirs(images[i], f), atol=1e-5, rtol=0)


def test_hue_handles_grays_and_primary_colours() -> None:
    img = torch.tensor([[[0.5, 1.0, 0.0]], [[0.5, 0.0, 1.0]], [[0.5, 0.0, 0.0]]])  # gray, red, green pixels
    img = img.expand(3, 3, 3).contiguous()
    for shift in (-0.5, -0.25, 1 / 3, 0.5):
        torch.testing.assert_close(
            adjust_hue(img[None], torch.tensor([shift]))[0], TF.adjust_hue(img, shift), atol=1e-6, rtol=0
        )


def test_grayscale_blur_solarize_match_torchvision() -> None:
    images = torch.stack([_image(2, 9), _image(3, 9)])
    torch.testing.assert_close(
        rgb_to_grayscale(images)[1], TF.rgb_to_grayscale(images[1], num_output_channels=1), atol=1e-6, rtol=0
    )
    sigma = torch.tensor([0.4, 1.7])
    out = gaussian_blur(images, sigma, 5)
    for i in range(2):
        expected = TF.gaussian_blur(images[i], kernel_size=[5, 5], sigma=[float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(solarize(images), TF.solarize(images, 0.5))
    assert blur_kernel_size(224, 2.0) == 13 and blur_kernel_size(32, 2.0 * 32 / 224) == 3
    assert blur_kernel_size(8, 10.0) == 7  # never wider than the image allows


def test_view_augment_composes_ops_per_sample_and_renormalises() -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    raw = torch.stack([_image(s, 8) for s in range(6)])  # (6, 3, 8, 8) in [0, 1]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    normalised = (raw - m) / s
    cfg = ViewAugmentConfig(solarize_prob=0.5, blur_prob=0.5)
    aug = ViewAugment(cfg, mean, std)
    torch.manual_seed(7)
    params = aug.draw(6)
    torch.manual_seed(7)
    out = aug(normalised)
    # The same draws, applied by hand image by image with torchvision's ops in the drawn order.
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        img = raw[i]
        if params["jitter"][i]:
            for op_index in params["order"][i].tolist():
                img = ops[op_index](img, float(params["factors"][i, op_index]))
        if params["gray"][i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params["blur"][i]:
            sigma = float(params["sigma"][i]) * 8 / 224
            img = TF.gaussian_blur(img, kernel_size=[3, 3], sigma=[sigma, sigma])
        if params["solarize"][i]:
            img = TF.solarize(img, 0.5)
        torch.testing.assert_close(out[i], (img - m[0]) / s[0], atol=2e-5, rtol=0)
    # Draws come from torch's global generator: the same seed gives the same views.
    torch.manual_seed(7)
    assert torch.equal(aug(normalised), out)
    # All-zero probabilities: the identity (up to float rounding of un-/re-normalising).
    off = ViewAugment(ViewAugmentConfig(jitter_prob=0, grayscale_prob=0, blur_prob=0), mean, std)
    torch.testing.assert_close(off(normalised), normalised)
    # dtype and device follow the input.
    assert aug(normalised.bfloat16()).dtype == torch.bfloat16


def test_view_augment_config_problems() -> None:
    assert ViewAugmentConfig().problems("objective.view1") == []
    bad = ViewAugmentConfig(jitter_prob=1.5, hue=0.7, brightness=-1, blur_sigma=[2.0, 1.0])
    assert {k for k, _ in bad.problems("objective.view1")} == {
        "objective.view1.jitter_prob",
        "objective.view1.hue",
        "objective.view1.brightness",
        "objective.view1.blur_sigma",
    }
    with pytest.raises(ValueError, match="augment.hue"):
        ViewAugment(ViewAugmentConfig(hue=0.7), (0.5,) * 3, (0.5,) * 3)


# --- SyncBatchNorm2d (a CNN backbone's BN over the global batch) --------------------------------


def test_sync_batchnorm2d_is_batchnorm2d_in_one_process() -> None:
    from objectives.components.contrastive import SyncBatchNorm2d

    torch.manual_seed(2)
    x = torch.randn(4, 5, 3, 3)
    plain = nn.BatchNorm2d(5)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.normal_()
    sync = SyncBatchNorm2d(5)
    sync.load_state_dict(plain.state_dict())
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.testing.assert_close(sync(x1), plain(x2))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    (sync(x1) ** 3).sum().backward()
    (plain(x2) ** 3).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    sync.eval(), plain.eval()
    torch.testing.assert_close(sync(x), plain(x))


def test_global_batchnorm_swaps_every_batchnorm2d_keeping_state_and_names() -> None:
    from objectives.components.contrastive import SyncBatchNorm2d, global_batchnorm

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)))
    net[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    global_batchnorm(net)
    assert [type(m).__name__ for m in (net[1], net[2][1])] == ["SyncBatchNorm2d"] * 2
    assert isinstance(net[1], SyncBatchNorm2d) and isinstance(net[1], nn.BatchNorm2d)
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _bn2d_worker(rank: int, out_dir: str) -> None:
    from objectives.components.contrastive import SyncBatchNorm2d

    x = torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(7))[rank * 2 : (rank + 1) * 2]
    bn = SyncBatchNorm2d(5)
    out = bn(x)
    torch.save({"out": out.detach(), "mean": bn.running_mean, "var": bn.running_var}, Path(out_dir) / f"bn{rank}.pt")


def test_sync_batchnorm2d_on_two_ranks_is_batchnorm2d_of_the_whole_batch(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_bn2d_worker, 2, str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(2)]
    x = torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(7))
    plain = nn.BatchNorm2d(5)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), plain(x).detach())
    for r in ranks:
        torch.testing.assert_close(r["mean"], plain.running_mean)
        torch.testing.assert_close(r["var"], plain.running_var)
