"""`python -m pretrain.run objective=maskdistill` on an empty store runs the chain: MAE teacher -> MaskDistill
(ZeRO-1, bf16), each stage a run nested under a pipeline run. A failing stage stops the pipeline naming the
stage; the same command again reuses the registered teacher and resumes the failed stage from its last
checkpoint, in the same MLflow run. (The BEiT v2 chain through `ray job submit`: tests/e2e/test_cluster_job.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pretrain.run import main
from pretrain.trainer.faults import FAULT_ENV

pytestmark = pytest.mark.slow


def test_maskdistill_chain_fails_then_resumes_and_reuses_its_teacher(
    ray_local: None, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    storage = tmp_path / "runs"
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    common = [a for a in runs.tiny if not a.startswith("objective.")]
    command = [
        *common,
        "objective=maskdistill",
        f"trainer.storage_path={storage}",
        "trainer.max_steps=4",
        "trainer.checkpoint_every=2",
        # The teacher stage: MAE with a tiny decoder, 2 steps.
        "stages.mae.trainer.max_steps=2",
        "stages.mae.objective.decoder_embed_dim=16",
        "stages.mae.objective.decoder_depth=1",
        "stages.mae.objective.decoder_num_heads=2",
        # The stage asked for: one worker, ZeRO-1, bf16.
        "stages.maskdistill.trainer.num_workers=1",
        "stages.maskdistill.deepspeed.zero_stage=1",
        "stages.maskdistill.deepspeed.precision=bf16",
        "stages.maskdistill.deepspeed.force_precision=true",  # also where bf16 is only emulated
        "name=distill",
    ]
    # Every worker raises after step 3: MAE (2 steps) finishes, MaskDistill fails after its step-2 checkpoint.
    monkeypatch.setenv(FAULT_ENV, "3")
    assert main(command) == 1
    out = capsys.readouterr().out
    assert out.startswith("== pretrain plan: maskdistill, 2 stage(s) ==\n1. mae          train  2 steps")
    assert "stage:mae: the CPU preset (pretrain/conf/preset/maskdistill_cpu.yaml)" in out
    assert (
        "error: stage 2/2 maskdistill failed (run distill); run the same command again to continue it from its "
        "last checkpoint" in out
    )
    client = MlflowClient(uri, uri)
    (teacher,) = client.search_model_versions("name='mae-vit_nano'")
    assert not client.search_model_versions("name='maskdistill-vit_nano'")

    monkeypatch.delenv(FAULT_ENV)
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "1. mae          reuse  models:/mae-vit_nano/1 (built by this stage with the same settings" in out
    assert "\nreused stages: mae; " in out
    record = runs.record(storage, "distill")
    run = client.get_run(record["mlflow_run_id"])
    # One MLflow run for the stage, resumed: steps 1-2 from the first attempt, 3-4 after the checkpoint.
    assert run.info.status == "FINISHED"
    losses = runs.history(record, "loss")
    assert sorted({step for step, _ in losses}) == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in losses)
    assert [s for s, _ in runs.history(record, "data/samples")][-1] == 4
    # Lineage: the encoder pinned to the teacher version, both carrying their stage keys.
    (encoder,) = client.search_model_versions("name='maskdistill-vit_nano'")
    assert encoder.run_id == run.info.run_id
    assert encoder.tags["pretrain.teacher"] == "models:/mae-vit_nano/1"
    assert encoder.tags["pretrain.stage_key"] == run.data.tags["pretrain.stage_key"]
    assert teacher.tags["pretrain.stage_key"] == client.get_run(teacher.run_id).data.tags["pretrain.stage_key"]
    card = (storage / "distill" / "export" / "encoder" / "README.md").read_text()
    assert "## Lineage" in card and "models:/mae-vit_nano/1" in card.split("## Lineage")[1]
    # Each stage nested under the pipeline run of the invocation that trained (or finished) it.
    parents = {
        r.info.run_name: r.info.run_id
        for r in client.search_runs([run.info.experiment_id], "tags.`pretrain.pipeline` = 'maskdistill'")
    }
    assert len(parents) == 2
    assert run.data.tags["mlflow.parentRunId"] in parents.values()
    assert client.get_run(teacher.run_id).data.tags["mlflow.parentRunId"] in parents.values()
    assert run.data.tags["mlflow.parentRunId"] != client.get_run(teacher.run_id).data.tags["mlflow.parentRunId"]
