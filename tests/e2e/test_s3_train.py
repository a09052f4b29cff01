"""Shards written to S3 with the writer CLI, then trained on by `pretrain.run` (real Ray, DeepSpeed, MLflow, moto)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pretrain.run import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


# s3_endpoint before ray_local: Ray workers see the AWS_* variables only by inheriting them
# from the process that started Ray (pretrain.launch.worker_env does not forward them).
def test_train_on_shards_written_to_s3(s3_endpoint: Any, ray_local: None, runs, tmp_path: Path) -> None:
    out = f"s3://{s3_endpoint.bucket}/e2e-demo"
    # As a user would: the exported AWS_* variables, no --storage-options.
    written = subprocess.run(
        [sys.executable, "-m", "data.write", "synthetic:256", out, "--shard-size", "32"],
        cwd=REPO,
        env={**os.environ, **s3_endpoint.env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert written.returncode == 0, written.stderr
    manifest = f"{out}/train.manifest.json"
    assert f"manifest {manifest} " in written.stdout

    import ray

    @ray.remote(num_cpus=0)
    def worker_endpoint() -> str | None:
        return os.environ.get("AWS_ENDPOINT_URL")

    assert ray.get(worker_endpoint.remote()) == s3_endpoint.endpoint_url, (
        "Ray was started before the S3 endpoint's AWS_* variables were set, so its workers cannot reach it"
    )
    rc = main(
        [
            *runs.tiny,
            f"data.urls={manifest}",
            "trainer.max_steps=3",
            "trainer.checkpoint_every=3",
            f"trainer.storage_path={tmp_path}",
            "name=s3",
        ]
    )
    assert rc == 0
    record = runs.record(tmp_path, "s3")
    losses = runs.history(record, "loss")
    assert [s for s, _ in losses] == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for _, v in losses)
    assert runs.history(record, "data/skipped") == [(1, 0.0), (2, 0.0), (3, 0.0)]
    # 2 workers x batch 8 per step, all read from the S3 shards.
    assert runs.history(record, "data/samples") == [(1, 16.0), (2, 32.0), (3, 48.0)]

    from mlflow.tracking import MlflowClient

    run = MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.urls"] == manifest
