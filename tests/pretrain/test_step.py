"""One optimizer step on a stand-in engine: seeding, accumulation, the non-finite skip, and its bookkeeping."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from pretrain.trainer.step import NonFiniteGuard, NonFiniteLossError, step_seed, to_device, train_step

CPU = torch.device("cpu")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.after: list[int] = []

    def after_step(self, step: int) -> None:
        self.after.append(step)


class StandInEngine:
    """The slice of DeepSpeed's engine that train_step uses; loss = sum(w * x), plus one random draw per forward."""

    def __init__(self, accum: int, nan_micro: int | None = None) -> None:
        self.module = Toy()
        self.accum = accum
        self.nan_micro = nan_micro
        self.calls: list[str] = []
        self.micro = 0

    def gradient_accumulation_steps(self) -> int:
        return self.accum

    def __call__(self, batch: dict[str, Any]) -> SimpleNamespace:
        draw = torch.rand(())  # the objective's randomness (masks): seeded by train_step
        loss = (self.module.w * batch["x"]).sum()
        if self.micro == self.nan_micro:
            loss = loss * float("nan")
        self.micro += 1
        self.calls.append("forward")
        return SimpleNamespace(loss=loss, metrics={"draw": draw})

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append("backward")
        loss.backward()

    def step(self) -> None:
        self.calls.append("step")

    def get_global_grad_norm(self) -> None:
        return None  # ZeRO-0 fp32: train_step computes the norm itself

    def get_lr(self) -> list[float]:
        return [0.25]


def batches(n: int) -> list[dict[str, Any]]:
    return [{"x": torch.arange(3, dtype=torch.float64) + 10 * i, "key": f"s{i}"} for i in range(n)]


def test_step_seed_formula() -> None:
    # (1 * 1_000_003 + 2 * 7919 + 3 * 104_729 + 4 * 15_485_863) by hand
    assert step_seed(1, 2, 3, 4) == 63_273_480
    assert len({step_seed(0, s, m, r) for s in range(3) for m in range(2) for r in range(2)}) == 12


def test_to_device_casts_floating_tensors_only() -> None:
    batch = {
        "img": torch.ones(2, dtype=torch.float64),
        "views": [torch.zeros(1), torch.ones(1)],
        "idx": torch.ones(2, dtype=torch.long),
        "key": ["a"],
    }
    moved = to_device(batch, CPU, torch.bfloat16)
    assert moved["img"].dtype == torch.bfloat16 and [v.dtype for v in moved["views"]] == [torch.bfloat16] * 2
    assert moved["idx"].dtype == torch.long and moved["key"] == ["a"]


def test_step_accumulates_micro_batches_with_per_micro_seeds() -> None:
    engine = StandInEngine(accum=2)
    data = batches(3)
    metrics = train_step(engine, iter(data), step=4, seed=7, rank=1, device=CPU, dtype=torch.float32)
    assert metrics is not None
    x0, x1 = data[0]["x"].float(), data[1]["x"].float()
    draws = [torch.rand((), generator=torch.Generator().manual_seed(step_seed(7, 4, m, 1))) for m in range(2)]
    assert metrics["loss"] == pytest.approx(float((x0.sum() + x1.sum()) / 2))  # w = 1
    assert metrics["draw"] == pytest.approx(float(draws[0] + draws[1]) / 2)
    assert metrics["lr"] == 0.25
    # The norm after the last micro-batch: the gradient of both, d/dw sum(w * x) = x0 + x1.
    assert metrics["grad_norm"] == pytest.approx(float((x0 + x1).norm()))
    assert engine.calls == ["forward", "backward", "step"] * 2 and engine.module.after == [4]


def test_nonfinite_first_micro_batch_skips_the_step_and_consumes_its_data() -> None:
    engine = StandInEngine(accum=3)
    stream = iter(batches(4))
    assert train_step(engine, stream, step=0, seed=0, rank=0, device=CPU, dtype=torch.float32, inject_nan=True) is None
    assert engine.calls == ["forward"] and engine.module.after == [] and engine.module.w.grad is None
    assert next(stream)["key"] == "s3"  # the step's three batches are gone


def test_nonfinite_later_micro_batch_stops_the_run() -> None:
    engine = StandInEngine(accum=2, nan_micro=1)
    with pytest.raises(NonFiniteLossError, match="micro-batch 2/2 of step 3"):
        train_step(engine, iter(batches(2)), step=2, seed=0, rank=0, device=CPU, dtype=torch.float32)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def worker_lines() -> Any:
    handler = Lines()
    logger = logging.getLogger("pretrain.worker")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_guard_counts_streaks_and_totals(worker_lines: list[str]) -> None:
    guard = NonFiniteGuard(3, rank=0, where="s3://b/run")
    for step, skipped in enumerate([True, True, False, True, False], start=1):
        guard.update(step, skipped=skipped)
    assert (guard.total, guard.in_a_row) == (3, 0)
    assert worker_lines == [
        "step 1: loss NaN/inf, step skipped (1 in a row, 1 in this attempt)",
        "step 2: loss NaN/inf, step skipped (2 in a row, 2 in this attempt)",
        "step 4: loss NaN/inf, step skipped (1 in a row, 3 in this attempt)",
    ]


def test_guard_stops_after_the_limit_in_a_row(worker_lines: list[str]) -> None:
    guard = NonFiniteGuard(2, rank=1, where="the storage path")
    guard.update(3, skipped=False)
    guard.update(4, skipped=True)
    with pytest.raises(NonFiniteLossError) as info:
        guard.update(5, skipped=True)
    assert str(info.value) == (
        "loss NaN/inf for 2 steps in a row (steps 4-5, trainer.max_nonfinite_steps=2); stopped, the last "
        "checkpoint in the storage path holds the weights before them"
    )
    assert worker_lines == []  # only rank 0 writes the warning
    assert guard.total == 2
