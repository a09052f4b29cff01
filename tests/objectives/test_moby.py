"""MoBY: the queue loss against a loop, the circular queue, the target copy without drop path, the
momentum schedule, and training on a small Swin."""

from __future__ import annotations

import math

import pytest
import torch

from objectives.base import DataNeeds, RunContext
from objectives.components.contrastive import queue_contrast
from objectives.configs import MoBYConfig, ViewAugmentConfig
from objectives.moby import MoBY
from objectives.registry import get_objective_class
from pretrain.backbone import build_backbone
from pretrain.config import ModelConfig

SWIN = ModelConfig(
    arch="swin_tiny_patch4_window7_224",
    img_size=32,
    patch_size=4,
    embed_dim=16,
    drop_path_rate=0.2,
    kwargs={"window_size": 4, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
)
OFF = ViewAugmentConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def make(**overrides: object) -> MoBY:
    torch.manual_seed(0)
    cfg = MoBYConfig(**{"dim": 8, "mlp_dim": 32, "queue_size": 12, "total_steps": 20, **overrides})
    return MoBY(cfg, build_backbone(SWIN), RunContext())


def views(batch: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(batch, 3, 32, 32, generator=gen)
    return [first, first + 0.5 * torch.randn(first.shape, generator=gen)]


def test_queue_contrast_by_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    queue = torch.nn.functional.normalize(torch.randn(4, 5, generator=gen), dim=0)
    out = queue_contrast(q, k, queue, 0.2)

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist(), strict=True):
        qi, ki = unit(qi), unit(ki)
        logits = [sum(a * b for a, b in zip(qi, ki, strict=True)) / 0.2]
        logits += [sum(a * queue[d, j].item() for d, a in enumerate(qi)) / 0.2 for j in range(5)]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    assert float(out.loss) == pytest.approx(total / 3, rel=1e-5)


def test_queues_take_the_keys_first_in_first_out() -> None:
    model = make()
    before1 = model.queue1.clone()
    k1, k2 = torch.eye(8)[:5], -torch.eye(8)[:5]
    model.enqueue(k1, k2)  # slots 0-4
    torch.testing.assert_close(model.queue1[:, :5], k1.t())
    torch.testing.assert_close(model.queue2[:, :5], k2.t())
    torch.testing.assert_close(model.queue1[:, 5:], before1[:, 5:])
    assert int(model.queue_ptr) == 5
    model.enqueue(k1, k2)  # slots 5-9
    model.enqueue(k1, k2)  # slots 10, 11, then 0, 1, 2 (wraps around)
    assert int(model.queue_ptr) == 3
    torch.testing.assert_close(model.queue1[:, [10, 11, 0, 1, 2]], k1.t())


def test_target_is_a_buffer_copy_without_drop_path_and_follows_the_schedule() -> None:
    model = make()
    target = model.target
    assert not list(target.parameters())  # buffers: never optimised, never partitioned
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in target.modules())
    assert any(getattr(m, "drop_prob", 0.0) > 0 for m in model.backbone.modules())  # the online one keeps it
    online = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert all(torch.equal(target["backbone"].state_dict()[k], v) for k, v in online.items())
    # m(t) = 1 - (1 - 0.99) (cos(pi t / T) + 1) / 2 (models/moby.py _momentum_update_key_encoder).
    for step in (0, 9, 19):
        t = step + 1
        assert model.momentum(step) == pytest.approx(1 - 0.01 * (math.cos(math.pi * t / 20) + 1) / 2)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    model.after_step(0)
    m = model.momentum(0)
    name, param = next(iter(model.backbone.named_parameters()))
    expected = m * online[name] + (1 - m) * param.detach()
    torch.testing.assert_close(target["backbone"].state_dict()[name], expected)


def test_forward_is_the_symmetric_queue_loss_and_training_lowers_it(train_on_batch) -> None:
    model = make(view1=OFF, view2=OFF).train()
    batch = {"views": views(6, 1)}
    q1, q2 = model.queue1.clone(), model.queue2.clone()
    torch.manual_seed(3)
    out = model(batch)
    # By hand, on the queues as they were (the forward enqueues its keys after the loss).
    torch.manual_seed(3)
    x1, x2 = model.augment1(batch["views"][0]), model.augment2(batch["views"][1])
    with torch.no_grad():
        p1, p2, k1, k2 = model.predict(x1), model.predict(x2), model.keys(x1), model.keys(x2)
    expected = queue_contrast(p1, k2, q2, 0.2).loss + queue_contrast(p2, k1, q1, 0.2).loss
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    assert int(model.queue_ptr) == 6
    losses, out = train_on_batch(model, batch, 15, lr=3e-3)
    assert train_on_batch.falls(losses), losses


def test_registry_data_needs_and_config_problems() -> None:
    assert get_objective_class("moby") is MoBY
    cfg = MoBYConfig()
    assert (cfg.temperature, cfg.queue_size, cfg.dim, cfg.mlp_dim, cfg.momentum) == (0.2, 4096, 256, 4096, 0.99)
    assert MoBYConfig.families == ("any",) and cfg.problems() == []
    assert MoBY.data_needs(cfg) == DataNeeds(views=2)
    bad = MoBYConfig(temperature=0, queue_size=0, momentum=1.0, total_steps=-1)
    assert {k for k, _ in bad.problems()} == {
        "objective.temperature",
        "objective.queue_size",
        "objective.momentum",
        "objective.total_steps",
    }
    # The MoBY MLP: Linear -> BN -> ReLU -> Linear with a bias (MoBYMLP), no BN at the output.
    kinds = [type(m).__name__ for m in make().projector]
    assert kinds == ["Linear", "SyncBatchNorm1d", "ReLU", "Linear"]
    assert make().projector[3].bias is not None and make().projector[0].bias is None
