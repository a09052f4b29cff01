"""Objective unit tests run tiny tensors: one intra-op thread is faster than two, and much
faster while anything else uses the cores (a training step of a tiny ViT: ~20 ms vs ~400 ms)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BatchTrainer:
    """`train_on_batch(model, batch, steps, lr=..., metric=None, seed_steps=False) -> (values, last output)`:
    AdamW on the model's trainable parameters for `steps` steps of one fixed batch, `after_step` after
    each; the per-step loss (or `metric`, from the step's metrics). seed_steps: torch.manual_seed(step)
    before each forward (objectives that draw noise in forward). `train_on_batch.falls(values)`: the
    mean of the last 3 values is below 0.8 x the mean of the first 3."""

    def __call__(
        self,
        model: torch.nn.Module,
        batch: dict,
        steps: int,
        *,
        lr: float,
        metric: str | None = None,
        seed_steps: bool = False,
    ) -> tuple[list[float], object]:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        values, out = [], None
        for step in range(steps):
            if seed_steps:
                torch.manual_seed(step)
            out = model(batch)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            model.after_step(step)
            values.append(float((out.loss if metric is None else out.metrics[metric]).detach()))
        return values, out

    @staticmethod
    def falls(values: list[float], window: int = 3, factor: float = 0.8) -> bool:
        return sum(values[-window:]) / window < factor * sum(values[:window]) / window


@pytest.fixture
def train_on_batch() -> BatchTrainer:
    return BatchTrainer()
