"""Background evaluation during training: when the encoder is handed over, and what is handed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from pretrain.trainer.evaluation import PeriodicEval


class Objective(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(2, 3).to(torch.bfloat16)
        self.head = nn.Linear(3, 1)

    def encoder(self) -> nn.Module:
        return self.enc


class Evaluator:
    def __init__(self) -> None:
        self.submitted: list[tuple[dict[str, torch.Tensor], dict[str, Any], int]] = []
        self.submit = SimpleNamespace(remote=lambda *args: self.submitted.append(args))


def test_due_every_n_steps_but_not_the_last() -> None:
    periodic = PeriodicEval(Evaluator(), None, every_steps=2, max_steps=6, rank=0, arch_kwargs={})
    assert [s for s in range(1, 7) if periodic.due(s)] == [2, 4]
    off = PeriodicEval(None, None, every_steps=2, max_steps=6, rank=0, arch_kwargs={})
    assert not any(off.due(s) for s in range(1, 7))


def test_rank0_submits_an_fp32_copy_of_the_encoder() -> None:
    engine = SimpleNamespace(module=Objective())
    evaluator = Evaluator()
    for rank in (0, 1):
        periodic = PeriodicEval(evaluator, engine, every_steps=2, max_steps=6, rank=rank, arch_kwargs={"d": 3})
        for step in (1, 2, 3):
            periodic.maybe_submit(step)
    ((state, kwargs, step),) = evaluator.submitted  # rank 0 at step 2 only
    assert (kwargs, step) == ({"d": 3}, 2) and sorted(state) == ["bias", "weight"]
    assert state["weight"].dtype == torch.float32 and torch.equal(state["weight"], engine.module.enc.weight.float())
    assert state["weight"].data_ptr() != engine.module.enc.weight.data_ptr()
