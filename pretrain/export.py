"""End of training: the objective's exports (encoder, tokenizer...) to the run directory and MLflow.

Every rank calls `export_models` after the last step; under ZeRO-3 the parameters are
gathered whole first (a collective), then rank 0 asks the objective to write its
files, copies each directory to `<run dir>/export/<name>/` (local or object storage),
and, when tracking is on, logs it as an MLflow logged model of the run and registers
it where the objective names a registry entry. The run gets a tag
`pretrain.export.<name>` with the URI to load it from. The encoder is the exception:
after training the driver evaluates, logs and registers it (pretrain.publish).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from objectives.artifacts import model_type, upload_dir
from objectives.components.zero import gathered

log = logging.getLogger(__name__)

EXPORT_TAG = "pretrain.export."
ENCODER_MODEL_TYPE = model_type("encoder")


def _gathered(engine: Any) -> contextlib.AbstractContextManager[Any]:
    """Every parameter of the objective whole (ZeRO-3 gathers them; other stages hold them whole)."""
    return gathered(engine.module.parameters())


def encoder_state(engine: Any, *, rank: int) -> dict[str, Any] | None:
    """An fp32 CPU copy of the encoder's weights (timm keys) on rank 0, None elsewhere; all ranks must call it."""
    with _gathered(engine):
        if rank != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.encoder().state_dict().items()}


def export_models(
    engine: Any,
    *,
    rank: int,
    run_dir: str,
    storage_options: dict[str, Any] | None,
    tracking_uri: str,
    run_id: str,
    tags: dict[str, str] | None = None,
) -> dict[str, str]:
    """Export on rank 0 (all ranks must call it); returns {name: URI or path} on rank 0, {} elsewhere.

    tags: set on every registry version created here (lineage: `pretrain.publish.lineage`).
    """
    objective = engine.module
    found: dict[str, str] = {}
    with _gathered(engine):
        if rank != 0:
            return found
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            for item in objective.export(Path(tmp)):
                dest = f"{run_dir.rstrip('/')}/export/{item.name}"
                upload_dir(item.path, dest, storage_options)
                found[item.name] = dest
                # The encoder is evaluated, logged and registered by the driver (pretrain.publish).
                if tracking_uri and run_id and item.model_type != ENCODER_MODEL_TYPE:
                    from pretrain.model_registry import log_model_dir

                    found[item.name] = log_model_dir(
                        item.path,
                        run_id=run_id,
                        tracking_uri=tracking_uri,
                        name=item.name,
                        model_type=item.model_type,
                        params=item.params,
                        registered_name=item.registered_name,
                        tags={**(tags or {}), "pretrain.kind": item.kind},
                    )
                log.info("exported %s: %s (files in %s)", item.name, found[item.name], dest)
    if tracking_uri and run_id and found:
        from pretrain.model_registry import set_run_tags

        set_run_tags(tracking_uri, run_id, {f"{EXPORT_TAG}{name}": uri for name, uri in found.items()})
    return found


def exports_of_run(tracking_uri: str, run_id: str) -> dict[str, str]:
    """{name: URI} from the run's `pretrain.export.<name>` tags."""
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags
    return {k.removeprefix(EXPORT_TAG): v for k, v in sorted(tags.items()) if k.startswith(EXPORT_TAG)}


def exports_in_dir(run_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """{name: path} of the folders under `<run_dir>/export/` (runs without tracking)."""
    import fsspec

    root = f"{run_dir.rstrip('/')}/export"
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    if not fs.isdir(path):
        return {}
    return {
        p.rstrip("/").rsplit("/", 1)[-1]: f"{root}/{p.rstrip('/').rsplit('/', 1)[-1]}"
        for p in sorted(fs.ls(path, detail=False))
    }
