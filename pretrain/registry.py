"""MLflow 3 logged models made of plain files (safetensors + json), and the registry.

A model here is a directory of files, never a pickle: `log_model_dir` logs it as an
MLflow 3 `LoggedModel` of a run (so `runs:/<run_id>/<name>` and `models:/<model_id>`
resolve to it) and optionally registers a version with the alias `latest`;
`download_model_dir` fetches the files behind any of those URIs. MLflow reserves the
alias `latest`: `models:/<name>/latest` already means the newest version.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_URI_SCHEMES = ("models:/", "runs:/")


def registry_name(text: str) -> str:
    """A registered-model name from free text: [A-Za-z0-9._-], no leading/trailing separators."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return name[:200] or "model"


def log_model_dir(
    local_dir: str | Path,
    *,
    run_id: str,
    tracking_uri: str | None,
    name: str,
    model_type: str,
    params: dict[str, str] | None = None,
    registered_name: str = "",
) -> str:
    """Log the files of `local_dir` as logged model `name` of run `run_id`; returns its URI.

    With `registered_name` a new registry version is created and
    `models:/<registered_name>/<version>` returned; else `runs:/<run_id>/<name>`.
    """
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        model_type=model_type,
        params={k: str(v)[:6000] for k, v in (params or {}).items()},
    )
    client.log_model_artifacts(logged.model_id, str(local_dir))
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    if not registered_name:
        return f"runs:/{run_id}/{name}"
    try:
        client.create_registered_model(registered_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with _default_tracking_uri(tracking_uri):
        version = client.create_model_version(
            registered_name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id
        )
    return f"models:/{registered_name}/{version.version}"


@contextlib.contextmanager
def _default_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point the process-wide tracking URI at `uri` meanwhile.

    MLflow 3 resolves a version's `models:/<model_id>` source (when registering and when
    downloading) with a default `MlflowClient()`, whatever store the caller named.
    """
    if not uri:
        yield
        return
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def download_model_dir(uri: str, dst: str | Path, *, tracking_uri: str | None) -> Path:
    """The files of a `models:/...` or `runs:/...` URI, downloaded under `dst`."""
    import mlflow.artifacts

    with _default_tracking_uri(tracking_uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri or None, registry_uri=tracking_uri or None
        )
    return Path(local)


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
