"""Stage inputs against the model registry: what a stage is (its key), and which version it may use.

A stage's key hashes what decides its weights: the objective, model, optimizer and data
settings, the global batch and run length, the data's identity (manifest hash) and the
exact upstream versions. Every registered version carries it as the tag
`pretrain.stage_key`, so the same stage run again is found and reused, like a build
system. A version is *compatible* with a consumer when it is the right kind of artifact,
has the consumer's image size and patch size, was trained on the same data (the default
teacher is "this project's own stage on the same data"), and, for a tokenizer, was
distilled from the teacher the recipe asks for; other versions are skipped with a line
saying why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data.config import DataConfig
    from pretrain.config import PretrainConfig

log = logging.getLogger("pretrain.pipeline")

STAGE_KEY_TAG = "pretrain.stage_key"
DATA_KEY_TAG = "pretrain.data_key"  # data_key() of the data a version was trained on
RUN_DIR_TAG = "pretrain.run_dir"
PARENT_TAG = "mlflow.parentRunId"  # MLflow nests a run under its parent with this tag
BEST_ALIAS = "best"
# Data settings that change how shards are read, not what is learnt from them.
DATA_IO_KEYS = (
    "num_workers",
    "storage_options",
    "cache_dir",
    "io_retries",
    "io_retry_wait_s",
    "fast_decode",
    "eval_urls",
)


def data_key(data: DataConfig) -> str:
    """The training data's identity: its manifest hash, the embedded default's sizes, or the shard pattern."""
    if not data.urls:
        sizes = (data.default_train_samples, data.default_eval_samples, data.default_shard_size)
        return "embedded:{}-{}-{}".format(*sizes)
    if data.urls.endswith(".json"):
        from data.manifest import read_manifest

        return read_manifest(data.urls, data.storage_options).manifest_hash
    return f"shards:{data.urls}"


def stage_key(cfg: PretrainConfig) -> str:
    """16 hex digits naming what this run trains: same key, same recipe on the same data and upstream versions."""
    tree = asdict(cfg)
    trainer = cfg.trainer
    body = {
        "objective": tree["objective"],
        "model": tree["model"],
        "optim": tree["optim"],
        "precision": cfg.deepspeed.precision,
        "global_batch": trainer.batch_size * trainer.num_workers * trainer.grad_accum,
        "max_steps": trainer.max_steps,
        "deterministic": trainer.deterministic,
        "seed": cfg.seed,
        "data": {k: v for k, v in tree["data"].items() if k not in DATA_IO_KEYS},
        "data_key": data_key(cfg.data),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Want:
    """What a consumer needs from a registered version."""

    kind: str  # artifact kind: encoder | tokenizer | centroids
    img_size: int
    patch_size: int
    teacher: str = ""  # tokenizers: the teacher it must have been distilled from ("" = any)
    key: str = ""  # the producing stage's key ("" = not known yet)
    data: str = ""  # data_key() of the data the version must have been trained on ("" = any)
    exact: bool = False  # only a version with that key (the user sized the stage)


@dataclass
class Found:
    """A registered version a consumer may use, and why."""

    uri: str  # models:/<name>/<version>
    how: str  # "reused" (same stage key) | "registry" (compatible)
    why: str
    tags: dict[str, str]


def registry_client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def store_exists(tracking_uri: str) -> bool:
    """False for a sqlite store whose file does not exist yet (an empty registry, not created by asking)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).is_file()
    return bool(tracking_uri)


def _versions(client: Any, name: str) -> list[Any]:
    """Versions of registered model `name`, newest first ([] when it does not exist)."""
    versions = client.search_model_versions(f"name='{name}'")
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def _best_version(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, BEST_ALIAS).version)
    except MlflowException:
        return ""


def artifact_meta(uri: str, tracking_uri: str) -> dict[str, Any]:
    """The `pretrain.json` of a registered artifact (one small file, not the weights)."""
    import mlflow.artifacts

    from objectives.artifacts import META_FILE, using_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file drowns the plan

    with tempfile.TemporaryDirectory(prefix="meta-") as tmp, using_tracking_uri(tracking_uri):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{uri}/{META_FILE}", dst_path=tmp, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
        return json.loads(Path(local).read_text())


def incompatibility(meta: dict[str, Any], want: Want) -> str:
    """Why an artifact with metadata `meta` cannot serve `want` ("" = it can)."""
    if meta.get("kind") != want.kind:
        return f"it is a {meta.get('kind', 'unknown kind')}, this input needs {want.kind}s"
    kwargs = meta.get("arch_kwargs") or {}
    have = (kwargs.get("img_size"), kwargs.get("patch_size"))
    if have != (want.img_size, want.patch_size):
        return (
            f"image size {have[0]} with {have[1]} px patches, this run needs {want.img_size} with "
            f"{want.patch_size} px patches"
        )
    if want.teacher and meta.get("teacher") != want.teacher:
        return f"distilled from teacher {meta.get('teacher') or 'unknown'}, the recipe asks for {want.teacher}"
    return ""


def find_version(tracking_uri: str, name: str, want: Want) -> Found | None:
    """The version of `name` to use: one built by the same stage (newest), else `best`, else the newest compatible.

    Incompatible and unloadable versions are skipped with a log line naming them and why.
    """
    if not store_exists(tracking_uri):
        return None
    client = registry_client(tracking_uri)
    versions = _versions(client, name)
    if not versions:
        return None
    best = _best_version(client, name)
    same = [v for v in versions if want.key and v.tags.get(STAGE_KEY_TAG) == want.key]
    others = (
        []
        if want.exact
        else sorted((v for v in versions if v not in same), key=lambda v: (str(v.version) != best, -int(v.version)))
    )
    for version in [*same, *others]:
        uri = f"models:/{name}/{version.version}"
        trained_on = version.tags.get(DATA_KEY_TAG)
        if want.data and trained_on != want.data:
            why = (
                f"trained on other data ({trained_on})" if trained_on else "the data it was trained on is not recorded"
            )
            log.warning("skipping %s: %s, this stage reads %s", uri, why, want.data)
            continue
        try:
            meta = artifact_meta(uri, tracking_uri)
        except Exception as exc:  # noqa: BLE001 - any failure to read it makes the version unusable
            from objectives.artifacts import first_line

            log.warning("skipping %s: cannot read its pretrain.json (%s)", uri, first_line(exc))
            continue
        problem = incompatibility(meta, want)
        if problem:
            log.warning("skipping %s: %s", uri, problem)
            continue
        if version in same:
            return Found(uri, "reused", "built by this stage with the same settings, data and upstream", version.tags)
        label = "the `best` alias" if str(version.version) == best else "the newest compatible version"
        return Found(uri, "registry", label, version.tags)
    return None


def unfinished_run(tracking_uri: str, experiment: str, key: str) -> Any | None:
    """The newest run of the stage with `key` that did not finish (FAILED, KILLED or still RUNNING), or None."""
    if not store_exists(tracking_uri):
        return None
    client = registry_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{STAGE_KEY_TAG}` = '{key}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs or runs[0].info.status == "FINISHED":
        return None
    return runs[0]
