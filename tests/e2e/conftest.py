"""One real local Ray instance for the end-to-end tests (one per pytest-xdist worker: `make test`
runs two), and a tiny run configuration."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# A model, objective and dataset small enough for a few CPU steps in seconds.
TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "objective.decoder_embed_dim=16",
    "objective.decoder_depth=1",
    "objective.decoder_num_heads=2",
    "trainer.batch_size=8",
    "trainer.num_workers=2",
    "trainer.log_every=1",
    "data.num_workers=1",
    "data.default_train_samples=256",
    "data.default_eval_samples=64",
    "data.default_shard_size=32",
    # One linear-probe weight decay instead of the 5-value sweep: 1.9 s instead of 6.6 s per
    # end-of-run evaluation here (the sweep is tested in tests/pretrain/test_probe.py).
    "eval.probe_weight_decays=[1e-4]",
]


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A local Ray instance shared by the session's tests (what `pretrain.run` starts on its own)."""
    import ray

    from pretrain.launch import start_local_ray

    os.environ["PRETRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    start_local_ray(2)
    yield
    ray.shutdown()


class RunInspector:
    """Reads what a finished run left behind: its record and its MLflow metrics."""

    tiny = TINY

    @staticmethod
    def record(storage: Path, name: str) -> dict:
        return json.loads((storage / name / "pretrain_run.json").read_text())

    @staticmethod
    def history(record: dict, key: str) -> list[tuple[int, float]]:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=record["tracking_uri"])
        return sorted((m.step, m.value) for m in client.get_metric_history(record["mlflow_run_id"], key))


@pytest.fixture(scope="session")
def runs() -> type[RunInspector]:
    return RunInspector
