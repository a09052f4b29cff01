"""Fault injection for tests and drills (docs/reliability.md): hooks installed from environment variables.

Every worker reads the variables; with neither set, no hook is installed and no fault
code runs in the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping

from pretrain.trainer.hooks import TrainerHook

log = logging.getLogger("pretrain.worker")

# "<step>"             every worker raises right after the report of that step, once per
#                      run (not again after resuming past it);
# "<step>:kill:<rank>" that rank SIGKILLs itself right after computing that step, before
#                      reporting it, on the first attempt only (kill -9 of a worker mid-step);
# "<step>:kill-in-checkpoint:<rank>"  that rank SIGKILLs itself while the checkpoint of
#                      that step is being written (the other ranks upload their parts);
# "<step>:hold:<rank>" that rank waits (up to 10 min) right after the report of that step, on
#                      the first attempt only: the run stays mid-epoch with that step's
#                      checkpoint complete, for a drill to stop the driver or kill a node.
FAULT_ENV = "PRETRAIN_INJECT_FAULT_AT_STEP"
# Steps whose loss is replaced by NaN on every rank: "4" or "4,5" or "4-" (from 4 on).
NAN_ENV = "PRETRAIN_INJECT_NAN_AT_STEPS"
HOLD_S = 600.0


def parse_fault(spec: str) -> tuple[int, str, int]:
    """FAULT_ENV -> (step, "raise" | "kill" | "kill-in-checkpoint" | "hold", rank); (0, "", 0) when unset."""
    if not spec:
        return 0, "", 0
    step, _, rest = spec.partition(":")
    mode, _, rank = rest.partition(":")
    return int(step), mode or "raise", int(rank or 0)


def nan_steps(spec: str) -> tuple[set[int], int]:
    """NAN_ENV -> (the listed steps, first step of an open range or 0)."""
    listed, open_from = set(), 0
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part.endswith("-"):
            open_from = int(part[:-1])
        else:
            listed.add(int(part))
    return listed, open_from


def kill_self() -> None:
    """SIGKILL this process: no handler, no cleanup, as `kill -9` from outside."""
    os.kill(os.getpid(), signal.SIGKILL)


class FaultHook(TrainerHook):
    """FAULT_ENV: raise on every rank after a step's report, or SIGKILL one rank mid-step or mid-checkpoint."""

    def __init__(self, spec: str, *, rank: int) -> None:
        self.step, self.mode, self.rank = parse_fault(spec)
        self.this_rank = rank
        self.start_step = 0

    def on_start(self, step: int) -> None:
        self.start_step = step

    def _kills_here(self, mode: str, step: int) -> bool:
        """Kill modes fire on this rank, at that step, on a run's first attempt (started at step 0)."""
        return self.mode == mode and step == self.step and self.this_rank == self.rank and self.start_step == 0

    def after_step(self, step: int) -> None:
        if self._kills_here("kill", step):
            log.warning("rank %d: injected kill -9 at step %d (%s)", self.this_rank, step, FAULT_ENV)
            kill_self()

    def in_checkpoint(self, step: int) -> None:
        if self._kills_here("kill-in-checkpoint", step):
            # The other ranks upload their part of this checkpoint; it is never complete.
            log.warning("rank %d: injected kill -9 while writing checkpoint %d (%s)", self.this_rank, step, FAULT_ENV)
            kill_self()

    def after_report(self, step: int) -> None:
        # Not again once a resumed attempt has started past the step.
        if self.mode == "raise" and step == self.step and self.start_step < self.step:
            raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")
        if self._kills_here("hold", step):
            log.warning("rank %d: holding after step %d until stopped (%s)", self.this_rank, step, FAULT_ENV)
            time.sleep(HOLD_S)


class NanHook(TrainerHook):
    """NAN_ENV: the loss of the listed steps (or of every step from an open range's start on) becomes NaN."""

    def __init__(self, spec: str) -> None:
        self.listed, self.open_from = nan_steps(spec)

    def inject_nan(self, step: int) -> bool:
        return step in self.listed or 0 < self.open_from <= step


def fault_hooks(rank: int, environ: Mapping[str, str] | None = None) -> list[TrainerHook]:
    """The hooks FAULT_ENV and NAN_ENV ask for on this rank; [] when neither is set."""
    environ = os.environ if environ is None else environ
    hooks: list[TrainerHook] = []
    if environ.get(FAULT_ENV, ""):
        hooks.append(FaultHook(environ[FAULT_ENV], rank=rank))
    if environ.get(NAN_ENV, ""):
        hooks.append(NanHook(environ[NAN_ENV]))
    return hooks
