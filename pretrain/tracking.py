"""MLflow tracking: the driver opens (or re-opens) the run, rank 0 logs into it.

Default store: sqlite under the local runs directory, so tracking and the model
registry work without a server. `tracking.uri` points at a server instead.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Config keys whose values are never logged (credentials in storage options etc.).
SECRET_KEY = re.compile(r"(secret|password|passwd|token|credential|key_id|access_key|session|auth)", re.I)
# Whole key names that are credentials too: s3fs's `key` (the access key id), adlfs's account key.
SECRET_NAMES = frozenset({"key", "account_key", "connection_string"})
REDACTED = "***"


def is_secret(name: Any) -> bool:
    """Whether a config key's value is a credential (never logged)."""
    return bool(SECRET_KEY.search(str(name))) or str(name).lower() in SECRET_NAMES


def default_tracking_uri(local_root: Path) -> str:
    """sqlite store beside the local runs directory."""
    local_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(local_root / 'mlflow.db').resolve()}"


def redact(tree: Any) -> Any:
    """Copy of a nested dict/list with the values of secret-looking keys replaced."""
    if isinstance(tree, dict):
        return {k: (REDACTED if is_secret(k) else redact(v)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v) for v in tree]
    return tree


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    run_id: str = "",
    artifact_root: str = "",
    tags: dict[str, str] | None = None,
) -> str:
    """Driver: create the run (or re-open `run_id` on resume) with `tags` set; returns the run id."""
    client = _client(uri)
    if run_id:
        run = client.get_run(run_id)  # raises a clear MlflowException when it does not exist
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        log.info("MLflow: resuming run %s", run_id)
        return run_id
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(experiment, artifact_location=artifact_root or None)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags={"pretrain.ray_run_name": run_name, **(tags or {})})
    return run.info.run_id


def close_run(uri: str, run_id: str, *, failed: bool) -> None:
    """Driver: mark the run FINISHED or FAILED."""
    _client(uri).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def run_url(uri: str, run_id: str) -> str:
    """Where a user finds the run."""
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/runs/{run_id}"
    return f"{run_id} (mlflow ui --backend-store-uri {uri})"


class RunLogger:
    """Rank 0: params, the resolved config, and batched step metrics."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = _client(uri)
        self.run_id = run_id
        self._pending: list[Any] = []

    def log_config(self, config: dict[str, Any]) -> None:
        """Flattened config as params and the resolved YAML as an artifact (secrets redacted)."""
        from mlflow.entities import Param
        from omegaconf import OmegaConf

        safe = redact(config)
        yaml_text = OmegaConf.to_yaml(OmegaConf.create(safe))
        params = [Param(k, v[:6000]) for k, v in flatten(safe).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_text(self.run_id, yaml_text, "config/resolved.yaml")

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._pending) >= 200:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
        self._pending = []
