"""NaN losses under ZeRO-3 on 2 workers: one is skipped and counted; a streak stops the run with
one clear error, and the checkpoint before it stays complete and loadable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pretrain.run import main
from pretrain.trainer.checkpoint import safe_load
from pretrain.trainer.faults import NAN_ENV

pytestmark = pytest.mark.slow


def test_nan_step_skipped_then_streak_aborts_with_checkpoint_intact(
    ray_local: None, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Step 2 alone, then every step from 4 on: 2 is skipped, 4 and 5 make the streak that stops it.
    monkeypatch.setenv(NAN_ENV, "2,4-")
    rc = main(
        [
            *runs.tiny,
            "deepspeed.zero_stage=3",
            "trainer.max_steps=6",
            "trainer.checkpoint_every=3",
            "trainer.max_nonfinite_steps=2",
            "eval.enabled=false",
            f"trainer.storage_path={tmp_path}",
            "name=nan",
        ]
    )
    assert rc == 1
    error = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "loss NaN/inf for 2 steps in a row (steps 4-5" in error[0], error

    record = runs.record(tmp_path, "nan")
    losses = dict(runs.history(record, "loss"))
    # Logged every step: the skipped ones have no loss (NaN), the others train on.
    assert sorted(losses) == [1, 2, 3, 4]
    assert math.isfinite(losses[1]) and math.isfinite(losses[3]) and math.isnan(losses[2]) and math.isnan(losses[4])
    assert runs.history(record, "train/nonfinite_skipped") == [(1, 0.0), (2, 1.0), (3, 1.0), (4, 2.0)]

    from mlflow.tracking import MlflowClient

    assert MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"]).info.status == "FAILED"
    # The step-3 checkpoint (written after the skipped step) is whole: both ranks' state and DeepSpeed's.
    ckpt = tmp_path / "nan" / "checkpoint_00000003"
    for rank in (0, 1):
        assert safe_load(ckpt / f"rank_{rank}.pt")["step"] == 3
    assert len(list((ckpt / "state").glob("*optim_states.pt"))) == 2
    assert not (tmp_path / "nan" / "checkpoint_00000006").exists()
