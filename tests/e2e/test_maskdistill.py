"""MaskDistill end to end on 1 worker, ZeRO-1, bf16, its teacher fetched by a `runs:/` URI from the
run's own MLflow store. (VQ-KD -> BEiT v2 through the registry: tests/e2e/test_cluster_job.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from pretrain.model_registry import log_teacher
from pretrain.run import main

pytestmark = pytest.mark.slow

ARCH = "vit_tiny_patch16_224"


def test_maskdistill_bf16_zero1_teacher_from_mlflow(ray_local: None, runs, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    storage = tmp_path / "runs"
    storage.mkdir()
    # The default store of runs in `storage` (sqlite beside them): the teacher is logged there first.
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri)
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2, "num_classes": 0}
    teacher_run = client.create_run(client.create_experiment("teachers")).info.run_id
    source = log_teacher(
        timm.create_model(ARCH, **kwargs), ARCH, kwargs, run_id=teacher_run, tracking_uri=uri, name="teacher"
    )
    client.set_terminated(teacher_run)
    assert source == f"runs:/{teacher_run}/teacher"

    common = [a for a in runs.tiny if not a.startswith("objective.") and a != "trainer.num_workers=2"]
    rc = main(
        [
            *common,
            "trainer.num_workers=1",
            "objective=maskdistill",
            f"objective.teacher.source={source}",
            "deepspeed.zero_stage=1",
            "deepspeed.precision=bf16",
            "trainer.max_steps=3",
            "trainer.checkpoint_every=3",
            f"trainer.storage_path={storage}",
            "name=distill",
        ]
    )
    assert rc == 0
    record = runs.record(storage, "distill")
    assert record["tracking_uri"] == uri
    for key in ("loss", "maskdistill/cosine"):
        values = [v for _, v in runs.history(record, key)]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), key
    tags = client.get_run(record["mlflow_run_id"]).data.tags
    assert tags["pretrain.export.encoder"] == "models:/maskdistill-vit_nano/1"
