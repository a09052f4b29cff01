"""Fault injection hooks: the env var specs, and at which step, rank and attempt each fault fires."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.trainer import faults
from pretrain.trainer.faults import FAULT_ENV, NAN_ENV, FaultHook, NanHook, fault_hooks, nan_steps, parse_fault

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", (0, "", 0)),
        ("5", (5, "raise", 0)),
        ("5:kill:1", (5, "kill", 1)),
        ("6:kill-in-checkpoint:1", (6, "kill-in-checkpoint", 1)),
        ("7:kill", (7, "kill", 0)),
    ],
)
def test_parse_fault(spec: str, expected: tuple[int, str, int]) -> None:
    assert parse_fault(spec) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("", (set(), 0)), ("4", ({4}, 0)), ("4,5", ({4, 5}, 0)), ("4-", (set(), 4)), (" 2, 4- ,", ({2}, 4))],
)
def test_nan_steps(spec: str, expected: tuple[set[int], int]) -> None:
    assert nan_steps(spec) == expected


def test_no_env_var_installs_no_hook() -> None:
    assert fault_hooks(0, {}) == []
    assert fault_hooks(0, {FAULT_ENV: "", NAN_ENV: ""}) == []
    hooks = fault_hooks(1, {FAULT_ENV: "5:kill:1", NAN_ENV: "3"})
    assert [type(h) for h in hooks] == [FaultHook, NanHook]
    assert (hooks[0].step, hooks[0].mode, hooks[0].rank, hooks[0].this_rank) == (5, "kill", 1, 1)


def test_nan_hook_steps() -> None:
    hook = NanHook("2,4-")
    assert [step for step in range(1, 8) if hook.inject_nan(step)] == [2, 4, 5, 6, 7]
    assert [step for step in range(1, 8) if NanHook("3,5").inject_nan(step)] == [3, 5]


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records kill_self calls instead of SIGKILLing the test process."""
    calls: list[int] = []
    monkeypatch.setattr(faults, "kill_self", lambda: calls.append(1))
    return calls


def run_hook(hook: FaultHook, kills: list[int], start: int, stop: int) -> list[tuple[str, int]]:
    """Drive the hook like the trainer over steps start+1..stop: which point of which step raised or killed."""
    fired: list[tuple[str, int]] = []
    hook.on_start(start)
    for step in range(start + 1, stop + 1):
        for point in ("after_step", "in_checkpoint", "after_report"):
            killed = len(kills)
            try:
                getattr(hook, point)(step)
            except RuntimeError as exc:
                assert str(exc) == f"injected fault at step {step} ({FAULT_ENV})"
                fired.append((f"{point}:raise", step))
            if len(kills) > killed:
                fired.append((f"{point}:kill", step))
    return fired


def test_raise_fires_after_the_report_once_per_run(kills: list[int]) -> None:
    assert run_hook(FaultHook("3", rank=0), kills, 0, 6) == [("after_report:raise", 3)]
    # Resumed at or past the step: not again; resumed before it: on every rank.
    assert run_hook(FaultHook("3", rank=0), kills, 3, 6) == []
    assert run_hook(FaultHook("3", rank=1), kills, 2, 6) == [("after_report:raise", 3)]


@pytest.mark.parametrize(("mode", "point"), [("kill", "after_step"), ("kill-in-checkpoint", "in_checkpoint")])
def test_kill_fires_on_its_rank_step_and_first_attempt_only(kills: list[int], mode: str, point: str) -> None:
    assert run_hook(FaultHook(f"5:{mode}:1", rank=1), kills, 0, 8) == [(f"{point}:kill", 5)]
    assert run_hook(FaultHook(f"5:{mode}:1", rank=0), kills, 0, 8) == []  # another rank
    assert run_hook(FaultHook(f"5:{mode}:1", rank=1), kills, 3, 8) == []  # a restarted attempt


def test_kill_is_a_sigkill() -> None:
    code = "from pretrain.trainer.faults import FaultHook; h = FaultHook('2:kill:0', rank=0); h.on_start(0); h.after_step(2)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == -9, out.stderr
