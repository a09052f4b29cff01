"""The points where the trainer calls out to hooks (tests and drills install them; production runs none)."""

from __future__ import annotations


class TrainerHook:
    """No-op base: a hook overrides the points it acts at. Steps are 1-based (the step just computed)."""

    def on_start(self, step: int) -> None:
        """The loop starts after `step` steps (0, or the step a checkpoint restored)."""

    def inject_nan(self, step: int) -> bool:
        """Whether step `step`'s loss becomes NaN (asked before the step is computed)."""
        return False

    def after_step(self, step: int) -> None:
        """Step `step` was computed, before anything of it is logged, saved or reported."""

    def in_checkpoint(self, step: int) -> None:
        """This rank wrote its part of checkpoint `step`; Ray Train has not been told yet."""

    def after_report(self, step: int) -> None:
        """Step `step`, a log or checkpoint step, was logged, saved and reported."""
