"""Evaluation during training: the encoder's weights handed to the background evaluator every N steps."""

from __future__ import annotations

from typing import Any


class PeriodicEval:
    """All ranks: every `every_steps` steps but the last, a copy of the encoder goes to the evaluator actor.

    The end of training is evaluated by the driver (pretrain.publish), hence not the last step.
    """

    def __init__(
        self,
        evaluator: Any,
        engine: Any,
        *,
        every_steps: int,
        max_steps: int,
        rank: int,
        arch_kwargs: dict[str, Any],
    ) -> None:
        self.evaluator = evaluator  # a BackgroundEvaluator actor handle, or None
        self.engine = engine
        self.every_steps, self.max_steps = every_steps, max_steps
        self.rank = rank
        self.arch_kwargs = arch_kwargs

    def due(self, step: int) -> bool:
        """Whether the encoder after step `step` is evaluated."""
        return self.evaluator is not None and step % self.every_steps == 0 and step < self.max_steps

    def maybe_submit(self, step: int) -> None:
        """Submit the encoder after step `step` when due (a collective under ZeRO-3: every rank calls it)."""
        if not self.due(step):
            return
        from pretrain.export import encoder_state

        state = encoder_state(self.engine, rank=self.rank)
        if state is not None:  # fire and forget: the actor starts a task, training goes on
            self.evaluator.submit.remote(state, self.arch_kwargs, step)
