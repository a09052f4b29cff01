"""A ZeRO 1-3 checkpoint of 2 workers resumed on 1: real DeepSpeed engines on forked gloo ranks.

The independent expectation: the resumed single worker holds the same full fp32 weights, Adam
moments and learning rate that the two writers held, and its next step on the union of their
batches ends where the uninterrupted 2-worker run ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.config import DeepSpeedConfig, OptimConfig, TrainerConfig

OPTIM = OptimConfig(base_lr=None, lr=0.05, weight_decay=0.05, warmup_fraction=0.0)
BATCH, SAVED_AT, MAX_STEPS = 6, 2, 5  # 2 steps on 2 workers, a checkpoint, 3 steps on 1 worker


class Regressor(nn.Module):
    """Odd parameter counts (45, 5, 5, 7 ...): ZeRO pads their flat partitions across 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 7)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.head(self.norm(self.proj(x))) - y) ** 2).mean()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 8, generator=g), torch.randn(BATCH, 7, generator=g)


def _engine(stage: int, world: int) -> object:
    from pretrain.engine import build_engine

    torch.manual_seed(0)
    # The same global batch on both sides: 2 x 6 before, 1 x 12 after (so the same lr).
    trainer = TrainerConfig(num_workers=world, batch_size=BATCH * 2 // world, max_steps=MAX_STEPS)
    return build_engine(Regressor(), OPTIM, trainer, DeepSpeedConfig(zero_stage=stage))


def _full_weights(engine) -> dict[str, torch.Tensor]:
    """Whole fp32 master weights per parameter, gathered from this engine's partitions."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).clone() for name, p in engine.module.named_parameters()}


def _union(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both writers' batches of `step` as one (the mean over 12 samples = the mean of the two ranks' means)."""
    x, y = zip(*(_batch(rank, step) for rank in range(2)), strict=True)
    return torch.cat(x), torch.cat(y)


def _writers(rank: int, world: int, stage: int, out_dir: str) -> None:
    from pretrain.trainer.checkpoint import save

    engine = _engine(stage, world)
    for step in range(SAVED_AT):
        engine.backward(engine(*_batch(rank, step)))
        engine.step()
    save(engine, Path(out_dir) / "ckpt", rank=rank, step=SAVED_AT, data_state={"rank": rank})


def _reader(rank: int, world: int, stage: int, out_dir: str) -> None:
    from pretrain.trainer.checkpoint import restore

    engine = _engine(stage, world)
    step, data_states = restore(engine, Path(out_dir) / "ckpt", rank=rank, world_size=world)
    result = {"step": step, "data": data_states, "restored": _full_weights(engine), "lrs": []}
    for later in range(SAVED_AT, MAX_STEPS):
        result["lrs"].append(engine.get_lr()[0])
        engine.backward(engine(*_union(later)))
        engine.step()
    result["end"] = _full_weights(engine)
    torch.save(result, Path(out_dir) / "reader.pt")


def _plain_torch() -> tuple[dict[str, torch.Tensor], list[float], dict[str, torch.Tensor]]:
    """The uninterrupted run in plain torch: weights at the checkpoint, later lrs, weights at the end."""
    from pretrain.engine import lr_schedule, param_groups, peak_lr

    torch.manual_seed(0)
    model = Regressor()
    trainer = TrainerConfig(num_workers=2, batch_size=BATCH, max_steps=MAX_STEPS)
    optimizer = torch.optim.AdamW(
        param_groups(model, OPTIM.weight_decay), lr=peak_lr(OPTIM, trainer), betas=OPTIM.betas, eps=OPTIM.eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(OPTIM, trainer))
    lrs = []
    for step in range(MAX_STEPS):
        if step == SAVED_AT:
            at_checkpoint = {n: p.detach().clone() for n, p in model.named_parameters()}
        if step >= SAVED_AT:
            lrs.append(schedule.get_last_lr()[0])
        model(*_union(step)).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return at_checkpoint, lrs, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_checkpoint_of_two_workers_resumes_on_one(stage: int, tmp_path: Path, gloo_ranks) -> None:
    gloo_ranks(_writers, 2, 2, stage, str(tmp_path))
    gloo_ranks(_reader, 1, 1, stage, str(tmp_path))
    reader = torch.load(tmp_path / "reader.pt", weights_only=True)
    at_checkpoint, lrs, end = _plain_torch()

    assert reader["step"] == SAVED_AT
    assert reader["data"] == [{"rank": 0}, {"rank": 1}]  # both writers' data positions, for the loader
    torch.testing.assert_close(reader["restored"], at_checkpoint)
    assert reader["lrs"] == pytest.approx(lrs, rel=1e-12)  # the lr schedule carried over
    # Three more steps end where plain torch ends: AdamW's moments and step count came back too
    # (restarted moments would make the first step about lr * sign(gradient) and miss by far more).
    torch.testing.assert_close(reader["end"], end, rtol=1e-5, atol=1e-6)
