"""The two BEiT v2 stages end to end: `objective=vqkd` registers a tokenizer in MLflow, then
`objective=beitv2 objective.tokenizer=models:/.../latest` trains on it under ZeRO-3 (2 CPU workers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from objectives.configs import TeacherConfig
from objectives.teacher import load_teacher, save_teacher
from pretrain.run import main

pytestmark = pytest.mark.slow

ARCH = "vit_tiny_patch16_224"


def test_vqkd_then_beitv2_through_the_registry(ray_local: None, runs, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    # A teacher on the tiny model's 8 x 8 grid (32 px images, 4 px patches), saved as a user would.
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2, "num_classes": 0}
    teacher_dir = save_teacher(timm.create_model(ARCH, **kwargs), tmp_path / "tiny-teacher", ARCH, kwargs)
    common = [a for a in runs.tiny if not a.startswith("objective.")]
    common += ["trainer.max_steps=3", "trainer.checkpoint_every=3", f"trainer.storage_path={tmp_path / 'runs'}"]

    rc = main(
        [
            *common,
            "objective=vqkd",
            f"objective.teacher.source={teacher_dir}",
            "objective.num_codes=32",
            "objective.decoder_embed_dim=16",
            "objective.decoder_num_heads=2",
            "name=tok",
        ]
    )
    assert rc == 0
    record = runs.record(tmp_path / "runs", "tok")
    client = MlflowClient(record["tracking_uri"], record["tracking_uri"])
    tags = client.get_run(record["mlflow_run_id"]).data.tags
    assert tags["pretrain.export.tokenizer"] == "models:/vqkd-tiny-teacher/1"
    (version,) = client.search_model_versions("name='vqkd-tiny-teacher'")
    assert version.run_id == record["mlflow_run_id"]
    usage = runs.history(record, "vqkd/codebook_usage")
    assert len(usage) == 3 and all(0 < v <= 1 for _, v in usage)
    assert (tmp_path / "runs" / "tok" / "export" / "tokenizer" / "tokenizer.safetensors").is_file()
    pictures = {a.path for a in client.list_artifacts(record["mlflow_run_id"], "pictures")}
    assert pictures == {"pictures/code_ids.png", "pictures/codebook_usage.png"}

    rc = main(
        [
            *common,
            "objective=beitv2",
            "objective.tokenizer=models:/vqkd-tiny-teacher/latest",
            "deepspeed.zero_stage=3",
            "name=mim",
        ]
    )
    assert rc == 0
    record = runs.record(tmp_path / "runs", "mim")
    assert record["tracking_uri"] == runs.record(tmp_path / "runs", "tok")["tracking_uri"]
    for key in ("loss", "beitv2/mim_loss", "beitv2/agg_loss"):
        values = [v for _, v in runs.history(record, key)]
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), key
    # Block masks of the paper's fraction: round(64 * 0.3827) = 24 of 64 patches.
    assert runs.history(record, "beitv2/mask_ratio")[-1][1] == pytest.approx(24 / 64)
    # The encoder export is gathered whole under ZeRO-3 and loads as a teacher of the next stage.
    encoder = load_teacher(TeacherConfig(source=str(tmp_path / "runs" / "mim" / "export" / "encoder")))
    assert sum(p.numel() for p in encoder.parameters()) > 10_000
    tags = MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"]).data.tags
    # Registered after its evaluation as <objective>-<model>, version 1, with the tokenizer pinned.
    assert tags["pretrain.export.encoder"] == "models:/beitv2-vit_nano/1"
    (version,) = client.search_model_versions("name='beitv2-vit_nano'")
    assert version.tags["pretrain.tokenizer"] == "models:/vqkd-tiny-teacher/1"
    assert 0.0 <= float(version.tags["eval.knn_top1"]) <= 1.0
    assert {a.path for a in client.list_artifacts(record["mlflow_run_id"], "pictures")} == {"pictures/token_ids.png"}

    # MaskDistill on 1 worker, ZeRO-2, bf16, with that encoder as teacher by its runs:/ URI.
    rc = main(
        [
            *[a for a in common if a != "trainer.num_workers=2"],
            "trainer.num_workers=1",
            "objective=maskdistill",
            f"objective.teacher.source=runs:/{record['mlflow_run_id']}/encoder",
            "deepspeed.zero_stage=2",
            "deepspeed.precision=bf16",
            "name=distill",
        ]
    )
    assert rc == 0
    record = runs.record(tmp_path / "runs", "distill")
    for key in ("loss", "maskdistill/cosine"):
        values = [v for _, v in runs.history(record, key)]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), key
