"""One optimizer step: batches to the device, per-micro-step seeding, the non-finite skip, the grad norm."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("pretrain.worker")


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for trainer.max_nonfinite_steps optimizer steps in a row."""


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the objective's randomness (masks) for one micro-step on one rank.

    Seeding per step makes a resumed run draw the same masks as an uninterrupted one.
    """
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors (and lists of tensors, e.g. views) to the device; floating ones to the training dtype."""

    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        return t.to(dtype) if t.is_floating_point() else t

    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = move(value)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[key] = [move(v) for v in value]
        else:
            moved[key] = value
    return moved


def grad_norm(engine: Any) -> float | None:
    """Global gradient norm; DeepSpeed only computes it under ZeRO/mixed precision."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    local = torch.stack([g.detach().float().norm() for g in grads]).norm()
    return float(local)  # ZeRO-0 gradients are already all-reduced: same norm on every rank


def all_finite(loss: torch.Tensor, device: torch.device) -> bool:
    """Whether the loss is finite on every rank (one decision, so all ranks skip together)."""
    import torch.distributed as dist

    ok = torch.isfinite(loss.detach()).all().to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def train_step(
    engine: Any,
    batches: Any,
    *,
    step: int,
    seed: int,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    inject_nan: bool = False,
) -> dict[str, float] | None:
    """One optimizer step (all micro-steps of gradient accumulation); returns its metrics.

    None when the loss of the step's first micro-batch was NaN/inf on some rank: then no
    rank runs backward or the optimizer for that step (weights, optimizer state and
    DeepSpeed's counters stay as they were) and the step's batches are consumed.
    """
    accum = engine.gradient_accumulation_steps()
    losses: list[float] = []
    extra: dict[str, float] = {}
    norm = None
    for micro in range(accum):
        batch = to_device(next(batches), device, dtype)
        torch.manual_seed(step_seed(seed, step, micro, rank))
        out = engine(batch)
        loss = out.loss * float("nan") if inject_nan else out.loss
        if not all_finite(loss, device):
            if micro > 0:
                # Earlier micro-batches already added their gradients (and DeepSpeed counted
                # them): there is no clean way to take part of a step back.
                raise NonFiniteLossError(
                    f"loss is NaN/inf in micro-batch {micro + 1}/{accum} of step {step + 1}, after the "
                    "step's earlier micro-batches were accumulated; steps are skipped only when the "
                    "first micro-batch is non-finite"
                )
            for _ in range(1, accum):  # the rest of this step's data goes too
                next(batches)
            return None
        engine.backward(loss)
        losses.append(float(loss.detach()))
        for key, value in out.metrics.items():
            extra[key] = extra.get(key, 0.0) + float(value) / accum
        if micro == accum - 1:  # gradients are complete (and reduced) before the update
            norm = grad_norm(engine)
        engine.step()
    engine.module.after_step(step)
    metrics = {"loss": sum(losses) / accum, "lr": engine.get_lr()[0], **extra}
    if norm is not None:
        metrics["grad_norm"] = norm
    return metrics


class NonFiniteGuard:
    """Counts skipped (NaN/inf) steps; stops the run after `limit` in a row."""

    def __init__(self, limit: int, *, rank: int, where: str) -> None:
        self.limit = limit
        self.rank = rank
        self.where = where  # where the last checkpoint is, for the error message
        self.total = 0  # skipped in this attempt
        self.in_a_row = 0

    def update(self, step: int, *, skipped: bool) -> None:
        """After step `step` (1-based): a finite step ends a streak, a skipped one extends it or stops the run."""
        if not skipped:
            self.in_a_row = 0
            return
        # Skipped on every rank (the decision is collective); the weights did not move.
        self.total += 1
        self.in_a_row += 1
        if self.rank == 0:
            log.warning(
                "step %d: loss NaN/inf, step skipped (%d in a row, %d in this attempt)", step, self.in_a_row, self.total
            )
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"loss NaN/inf for {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}, "
                f"trainer.max_nonfinite_steps={self.limit}); stopped, the last checkpoint in "
                f"{self.where} holds the weights before them"
            )
