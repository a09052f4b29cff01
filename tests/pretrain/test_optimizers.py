"""LARS and SGD: the LARS update by hand, parameter groups, a real DeepSpeed ZeRO-0 engine, the config rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.compose import ConfigError, expand_overrides, load_config
from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig, engine_problems
from pretrain.engine import build_optimizer, lr_schedule, peak_lr
from pretrain.lars import LARS


def lars_by_hand(w: list[float], g: list[float], v: list[float], *, lr, wd, m, eta, adapt) -> tuple[list, list]:
    """One step on one tensor in plain floats: (new weights, new momentum buffer)."""
    d = [gi + wd * wi for gi, wi in zip(g, w, strict=True)]
    if adapt:
        wn, dn = math.sqrt(sum(x * x for x in w)), math.sqrt(sum(x * x for x in d))
        ratio = eta * wn / dn if wn > 0 and dn > 0 else 1.0
        d = [x * ratio for x in d]
    v = [m * vi + di for vi, di in zip(v, d, strict=True)]
    return [wi - lr * vi for wi, vi in zip(w, v, strict=True)], v


def test_two_steps_equal_the_formula_per_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(3, 2, generator=gen))
    bias = nn.Parameter(torch.randn(3, generator=gen))
    zero = nn.Parameter(torch.zeros(2, 2))  # ||w|| = 0: the ratio is 1 (plain SGD step)
    opt = LARS(
        [{"params": [weight, zero], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0, "adapt": False}],
        lr=0.5,
        momentum=0.9,
        trust_coefficient=0.01,
    )
    expected = {
        "weight": (weight.detach().flatten().tolist(), [0.0] * 6, 0.1, True),
        "zero": ([0.0] * 4, [0.0] * 4, 0.1, True),
        "bias": (bias.detach().tolist(), [0.0] * 3, 0.0, False),
    }
    for step in range(2):
        grads = {
            name: torch.randn(p.shape, generator=gen)
            for name, p in (("weight", weight), ("zero", zero), ("bias", bias))
        }
        for name, p in (("weight", weight), ("zero", zero), ("bias", bias)):
            p.grad = grads[name].clone()
            w, v, wd, adapt = expected[name]
            expected[name] = (
                *lars_by_hand(w, grads[name].flatten().tolist(), v, lr=0.5, wd=wd, m=0.9, eta=0.01, adapt=adapt),
                wd,
                adapt,
            )
        opt.step()
        for name, p in (("weight", weight), ("zero", zero), ("bias", bias)):
            assert p.detach().flatten().tolist() == pytest.approx(expected[name][0], rel=1e-5, abs=1e-7), (step, name)
            buf = opt.state[p]["momentum_buffer"].flatten().tolist()
            assert buf == pytest.approx(expected[name][1], rel=1e-5, abs=1e-7), (step, name)
    # The trust ratio makes the step's size relative to the weight: scaling the gradient changes nothing.
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    a.grad, b.grad = torch.full((4,), 0.5), torch.full((4,), 50.0)
    LARS([a], lr=1.0, momentum=0.0).step()
    LARS([b], lr=1.0, momentum=0.0).step()
    torch.testing.assert_close(a, b)


def test_build_optimizer_lars_keeps_norms_and_biases_out_of_decay_and_adaptation() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    optim = OptimConfig(name="lars", base_lr=0.3, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001)
    trainer = TrainerConfig(num_workers=2, batch_size=128)
    opt = build_optimizer(model, optim, trainer)
    assert isinstance(opt, LARS)
    adapted, plain = opt.param_groups
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert (adapted["adapt"], adapted["weight_decay"]) == (True, 1e-6)
    assert (plain["adapt"], plain["weight_decay"], len(plain["params"])) == (False, 0.0, 4)  # BN scale/shift, 2 biases
    assert opt.defaults["lr"] == pytest.approx(0.3 * 256 / 256) and opt.defaults["momentum"] == 0.9
    assert not isinstance(build_optimizer(model, OptimConfig(), trainer), LARS)


def test_lars_needs_zero0_and_fp32_and_the_recipes_compose() -> None:
    lars = OptimConfig(name="lars", base_lr=0.3)
    assert engine_problems(DeepSpeedConfig(zero_stage=0), lars, False) == []
    for ds in (DeepSpeedConfig(zero_stage=2), DeepSpeedConfig(zero_stage=0, precision="bf16", force_precision=True)):
        ((key, message),) = engine_problems(ds, lars, False)
        assert key == "optim.name" and "lars needs deepspeed.zero_stage=0 and deepspeed.precision=fp32" in message
    keys = [
        k
        for k, _ in engine_problems(
            DeepSpeedConfig(), OptimConfig(name="rmsprop", momentum=1.0, trust_coefficient=0), False
        )
    ]
    assert keys == ["optim.name", "optim.momentum", "optim.trust_coefficient"]
    with pytest.raises(ConfigError, match="lars needs deepspeed.zero_stage=0"):
        load_config(expand_overrides(["recipe=simclr_resnet50", "deepspeed.zero_stage=3"]))
    for name, objective, temperature, layers in (
        ("simclr_resnet50", "simclr", 0.1, 3),
        ("mocov3_resnet50", "mocov3", 1.0, 2),
    ):
        cfg = load_config(expand_overrides([f"recipe={name}"]))
        assert (cfg.objective.name, cfg.model.arch, cfg.preset_name) == (objective, "resnet50", "none")
        assert (cfg.optim.name, cfg.deepspeed.zero_stage, cfg.objective.temperature) == ("lars", 0, temperature)
        assert cfg.objective.proj_layers == layers


# --- through a real DeepSpeed ZeRO-0 engine on 2 gloo ranks ---------------------------------------

OPTIM = OptimConfig(name="lars", base_lr=None, lr=0.5, weight_decay=1e-4, warmup_fraction=0.0, trust_coefficient=0.02)
STEPS, BATCH = 3, 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.norm(self.proj(x)) - y) ** 2).mean()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 4, generator=g)


def _rank(rank: int, world: int, out_dir: str) -> None:
    from pretrain.engine import build_engine

    torch.manual_seed(0)
    trainer = TrainerConfig(num_workers=world, batch_size=BATCH, max_steps=STEPS)
    engine = build_engine(Net(), OPTIM, trainer, DeepSpeedConfig(zero_stage=0))
    assert isinstance(engine.optimizer, LARS)  # DeepSpeed steps our LARS itself at ZeRO-0 fp32
    for step in range(STEPS):
        engine.backward(engine(*_batch(rank, step)))
        engine.step()
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    buffers = {n: engine.optimizer.state[p]["momentum_buffer"].clone() for n, p in engine.module.named_parameters()}
    torch.save({"params": params, "buffers": buffers}, Path(out_dir) / f"rank{rank}.pt")


def test_zero0_engine_equals_plain_lars_on_the_mean_gradient(tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_rank, 2, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    model = Net()
    trainer = TrainerConfig(num_workers=2, batch_size=BATCH, max_steps=STEPS)
    opt = build_optimizer(model, OPTIM, trainer)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(OPTIM, trainer))
    assert peak_lr(OPTIM, trainer) == 0.5
    for step in range(STEPS):
        (sum(model(*_batch(rank, step)) for rank in range(2)) / 2).backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    for result in results:
        torch.testing.assert_close(result["params"], dict(model.named_parameters()))
        torch.testing.assert_close(
            result["buffers"], {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
        )


def test_sgd_is_torchs_with_nesterov_momentum_on_the_two_groups() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optim = OptimConfig(name="sgd", base_lr=0.0133, weight_decay=5e-4, momentum=0.9, nesterov=True)
    opt = build_optimizer(model, optim, TrainerConfig(num_workers=2, batch_size=96))
    assert type(opt) is torch.optim.SGD
    decay, no_decay = opt.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"], len(decay["params"]), len(no_decay["params"])) == (
        5e-4,
        0.0,
        1,
        3,
    )
    assert (decay["momentum"], decay["nesterov"], decay["lr"]) == (0.9, True, pytest.approx(0.0133 * 192 / 256))
    ((key, message),) = engine_problems(
        DeepSpeedConfig(zero_stage=3), OptimConfig(name="sgd", nesterov=True, momentum=0.0), False
    )
    assert (key, message) == ("optim.nesterov", "needs optim.momentum > 0")
    assert engine_problems(DeepSpeedConfig(zero_stage=3), optim, False) == []  # elementwise: any ZeRO stage
