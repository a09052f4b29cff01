"""`pretrain.run` end to end on real Ray Train + DeepSpeed + MLflow, 2 CPU workers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.run import main
from pretrain.trainer.faults import FAULT_ENV

pytestmark = pytest.mark.slow

# 6 deterministic steps with a checkpoint every 3: the ZeRO-0 run is also the uninterrupted
# reference of the fault tests below (one run fewer than a reference of their own).
RUN = ["trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.deterministic=true"]


def encoder_files(*run_dirs: Path) -> list[Path]:
    """The exported encoder weights of each run (one safetensors file per export)."""
    found = []
    for run_dir in run_dirs:
        (weights,) = sorted((run_dir / "export" / "encoder").glob("*.safetensors"))
        found.append(weights)
    return found


@dataclass
class Finished:
    """A run that ended: its directory and its logged losses."""

    run_dir: Path
    record: dict
    losses: list[tuple[int, float]]


def run_zero0(runs, storage: Path) -> Finished:
    rc = main([*runs.tiny, *RUN, "deepspeed.zero_stage=0", f"trainer.storage_path={storage}", "name=zero0"])
    assert rc == 0
    record = runs.record(storage, "zero0")
    return Finished(storage / "zero0", record, runs.history(record, "loss"))


@pytest.fixture(scope="module")
def zero0(ray_local: None, runs, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    return run_zero0(runs, tmp_path_factory.mktemp("zero0"))


# ZeRO 1-3 run end to end with other objectives (test_pipeline.py: 1; test_more_objectives.py: 2
# and 3, with an evaluation task beside a ZeRO-3 run); that partitioning leaves the math alone
# (the same weights as plain torch at every stage) is tests/pretrain/test_world_size_change.py.
def test_two_workers_at_zero0_evaluated_and_checkpointed(zero0: Finished, runs) -> None:
    record, losses = zero0.record, zero0.losses
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    # Evaluated at the end of training, against the random-init baseline.
    for key in ("eval/knn_top1", "eval/baseline_linear_top1"):
        assert [s for s, _ in runs.history(record, key)] == [6], key
    assert all(math.isfinite(v) and v > 0 for _, v in losses)

    from mlflow.tracking import MlflowClient

    run = MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["deepspeed.zero_stage"] == "0"
    assert run.data.params["trainer.num_workers"] == "2"

    ckpt = zero0.run_dir / "checkpoint_00000006"
    assert (ckpt / "rank_0.pt").exists() and (ckpt / "rank_1.pt").exists()

    # Ray Train's actors of the runs so far on this Ray instance: no Ray Data actor (the runs pass
    # no Ray Datasets), no placement-group cleaner (this process started the instance, whose
    # placement groups end with it) and no autoscaling coordinator (a fixed-size run on an instance
    # with no nodes to add): pretrain.launch.torch_trainer_class leaves them out.
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # this worker's instance: the other xdist worker has one too
    actors = list_actors(address=gcs, limit=10_000, raise_on_missing_output=False, detail=True)
    started = {a.class_name for a in actors}
    assert {"TrainController", "RayTrainWorker", "SynchronizationActor"} <= started, started
    assert not {"DatasetManager", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor"} & started, started
    # No preemption watcher either, and none of Ray Train's actors has a runtime environment, which
    # would start it through Ray's shim (a second interpreter start, docs/benchmarks.md): the
    # controller gets its settings as arguments, the workers their variables from the train loop
    # (the fault tests below and in test_nonfinite.py need theirs to arrive that way).
    assert "PreemptionWatcher" not in started, started
    ray_train = ("TrainController", "RayTrainWorker", "SynchronizationActor")
    with_env = {(a.class_name, a.serialized_runtime_env) for a in actors if a.class_name in ray_train}
    assert {env for _, env in with_env} == {"{}"}, with_env


@pytest.fixture(scope="module")
def resume_args(runs) -> list[str]:
    # The reference run's settings; resume is about the training state: no end-of-run evaluation.
    return [*runs.tiny, *RUN, "eval.enabled=false"]


def test_worker_killed_mid_epoch_restarts_exactly(
    zero0: Finished,
    runs,
    resume_args: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kill -9 of rank 1 in step 5 (mid-epoch: 16 steps make one): Ray Train restarts the group
    from the step-3 checkpoint, in the same MLflow run, and ends with the uninterrupted run's weights.

    Step 5, not 4: a checkpoint counts once Ray Train's controller has collected every worker's
    report of it (every 0.5 s, see pretrain.launch); the step-4 report returning shows the step-3 one was taken.
    """
    monkeypatch.setenv(FAULT_ENV, "5:kill:1")
    rc = main([*resume_args, "trainer.max_failures=1", f"trainer.storage_path={tmp_path}", "name=retry"])
    assert rc == 0
    record = runs.record(tmp_path, "retry")
    losses = runs.history(record, "loss")
    # One MLflow run: step 4 logged by both attempts, 5 never before the kill; redone = 4, 5 (< 3 steps).
    assert [s for s, _ in losses] == [1, 2, 3, 4, 4, 5, 6]
    expected = dict(zero0.losses)
    assert [v for _, v in losses] == pytest.approx([expected[s] for s, _ in losses], rel=1e-6, abs=1e-7)
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"]).data.tags
    assert tags["pretrain.resumed_at_step"] == "3"
    # Deterministic mode: bit-identical final weights.
    killed, straight = (load_file(f) for f in encoder_files(tmp_path / "retry", zero0.run_dir))
    assert killed.keys() == straight.keys()
    assert all(torch.equal(killed[k], straight[k]) for k in killed)


def test_killed_in_checkpoint_write_resumes_from_the_last_complete_one_on_fewer_workers(
    runs, resume_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_local: None
) -> None:
    """2 workers at ZeRO-2 die while writing the step-6 checkpoint (no retries: the run fails);
    `resume=` on 1 worker with grad_accum=2 (same global batch) finishes it from step 3 in the same
    MLflow run.

    Exactly-once sample accounting across the changed layout is proven in tests/data/test_stream.py;
    here the whole path runs: DeepSpeed's ZeRO-2 state of 2 workers is re-partitioned for 1 through
    its universal checkpoint format (the optimizer state itself: tests/pretrain/test_world_size_change.py),
    the loader re-lays out both old ranks' positions, and the sample counter carries over.
    (Bit-exact continuation from a checkpoint: test_worker_killed_mid_epoch_restarts_exactly.)
    """
    # Rank 1 is killed while the step-6 checkpoint is written: rank 0's part reaches storage,
    # the checkpoint never completes, and the run (no retries) fails.
    monkeypatch.setenv(FAULT_ENV, "6:kill-in-checkpoint:1")
    # ZeRO-2: the optimizer state of 2 workers is re-partitioned for 1 (DeepSpeed's universal checkpoint).
    assert main([*resume_args, "deepspeed.zero_stage=2", f"trainer.storage_path={tmp_path}", "name=shrink"]) == 1
    monkeypatch.delenv(FAULT_ENV)
    before = runs.record(tmp_path, "shrink")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(before["tracking_uri"])
    assert client.get_run(before["mlflow_run_id"]).info.status == "FAILED"
    assert [s for s, _ in runs.history(before, "loss")] == [1, 2, 3, 4, 5, 6]
    partial = tmp_path / "shrink" / "checkpoint_00000006"
    assert not (partial / "rank_1.pt").exists()

    # Resume picks the latest complete checkpoint (step 3), on 1 worker.
    assert main([f"resume={tmp_path / 'shrink'}", "trainer.num_workers=1", "trainer.grad_accum=2"]) == 0
    record = runs.record(tmp_path, "shrink")
    assert record["mlflow_run_id"] == before["mlflow_run_id"]
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["pretrain.resumed_at_step"] == "3"
    assert [s for s, _ in runs.history(record, "loss")] == [1, 2, 3, 4, 4, 5, 5, 6, 6]  # 4-6 redone
    # 6 steps x global batch 16 (2 x 8 before, 1 x 8 x 2 micro-batches after): no sample lost or repeated.
    assert runs.history(record, "data/samples")[-1] == (6, 96.0)
