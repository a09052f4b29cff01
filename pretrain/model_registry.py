"""MLflow 3 logged models made of plain files (an artifact directory, `objectives.artifacts`), and the registry.

A model here is a directory of files, never a pickle: `log_model_dir` logs it as an
MLflow 3 `LoggedModel` of a run (so `runs:/<run_id>/<name>` and `models:/<model_id>`
resolve to it) and optionally registers a version; `objectives.artifacts.fetch` gets the
files back from any of those URIs. MLflow reserves the alias `latest`:
`models:/<name>/latest` already means the newest version.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objectives.artifacts import model_type, save_encoder, using_tracking_uri

if TYPE_CHECKING:
    from torch import nn


def log_model_dir(
    local_dir: str | Path,
    *,
    run_id: str,
    tracking_uri: str | None,
    name: str,
    model_type: str,
    params: dict[str, str] | None = None,
    registered_name: str = "",
    tags: dict[str, str] | None = None,
) -> str:
    """Log the files of `local_dir` as logged model `name` of run `run_id`; returns its URI.

    With `registered_name` a new registry version is created, tagged with `tags`, and
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
    with using_tracking_uri(tracking_uri):
        version = client.create_model_version(
            registered_name, source=f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id
        )
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version.version, key, value)
    return f"models:/{registered_name}/{version.version}"


def log_teacher(
    model: nn.Module,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    run_id: str,
    tracking_uri: str | None = None,
    name: str = "teacher",
    registered_name: str = "",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> str:
    """Log a timm model as an encoder artifact of run `run_id` (a teacher for later stages); returns its URI.

    No MLmodel flavor and no pickle: the model's files are just the artifact layout.
    """
    params = {"arch": arch, **{f"arch_kwargs.{k}": str(v) for k, v in (arch_kwargs or {}).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        save_encoder(model, tmp, arch, arch_kwargs, mean=mean, std=std)
        return log_model_dir(
            tmp,
            run_id=run_id,
            tracking_uri=tracking_uri,
            name=name,
            model_type=model_type("encoder"),
            params=params,
            registered_name=registered_name,
        )


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Set string tags on a run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
