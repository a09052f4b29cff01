"""The artifact store: one on-disk layout for what stages hand each other, and one way to find it.

Encoders (and teachers, which are encoders), VQ-KD tokenizers and CCViT centroids are all
written as one directory:

    model.safetensors   the tensors in float32 (an encoder's: timm's state-dict key names)
    pretrain.json       {"format": 2, "kind": "encoder" | "tokenizer" | "centroids",
                         "arch": <timm name>, "arch_kwargs": {...}, "mean": [3] | null,
                         "std": [3] | null, ...fields of the kind}
    config.json         encoders only: timm's own config (`timm.models.save_config_for_hf`),
                        so `timm.create_model("local-dir:<dir>", pretrained=True)` loads it too

A source is a local directory (or the weights file in it), an fsspec directory URL
(`s3://...`), or an MLflow model URI (`runs:/<run_id>/<name>`, `models:/<name>/<version>`,
`models:/<name>/latest`, `models:/<name>@<alias>`). Directories of the first layout
(format 1: teacher.*, tokenizer.* or centroids.* safetensors + json) still load, so
registry versions logged before this layout keep working. Tensors are only ever read from
safetensors; nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

KINDS = ("encoder", "tokenizer", "centroids")
WEIGHTS_FILE = "model.safetensors"
META_FILE = "pretrain.json"
TIMM_CONFIG_FILE = "config.json"
LAYOUT_FORMAT = 2
MODEL_URI_SCHEMES = ("models:/", "runs:/")
# Format 1: one file stem and one "kind" value per artifact kind.
LEGACY_STEMS = {"encoder": "teacher", "tokenizer": "tokenizer", "centroids": "centroids"}
LEGACY_KINDS = {"encoder": None, "tokenizer": "vqkd", "centroids": "ccvit-centroids"}


class ArtifactError(ValueError):
    """An artifact that cannot be used: `<source>: <what is wrong>; <what to do>` in one line."""


class ArtifactNotFound(ArtifactError, FileNotFoundError):
    """No artifact at the source."""


@dataclass
class Artifact:
    """What `read_artifact` returns: the kind, pretrain.json's fields and the tensors."""

    kind: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with `prefix`, with the prefix removed."""
        return {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}


def model_type(kind: str) -> str:
    """The MLflow logged-model type of an artifact kind ("pretrain.encoder", ...)."""
    return f"pretrain.{kind}"


def first_line(err: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, for one-line errors that wrap a library's exception."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:limit]}"


# --- writing ---------------------------------------------------------------------------


def plain(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy safetensors accepts: contiguous, owning its storage, floating point widened to float32."""
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).contiguous().clone()


def _stats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def save_artifact(path: str | Path, kind: str, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `tensors` and `meta` as the layout above into directory `path`; returns it."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; valid choices: {', '.join(KINDS)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: plain(v) for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
    record = {**meta, "format": LAYOUT_FORMAT, "kind": kind}
    (out / META_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return out


def save_encoder(
    model: nn.Module,
    path: str | Path,
    arch: str,
    arch_kwargs: dict[str, Any] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    img_size: int = 0,
    features: str = "",
) -> Path:
    """A timm model as an encoder artifact (also loadable with timm's `local-dir:`); returns the directory.

    mean/std: the input normalisation the model was trained with (None: the data's, unknown here).
    img_size: the image size it was trained on (0: unknown; a ViT's arch_kwargs carry it anyway).
    features: how a ViT's representation is read, "cls" or "mean" of the patch tokens ("": unsaid).
    """
    meta = {"arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "mean": _stats(mean), "std": _stats(std)}
    if img_size:
        meta["img_size"] = int(img_size)
    if features:
        meta["features"] = features
    out = save_artifact(path, "encoder", model.state_dict(), meta)
    if getattr(model, "pretrained_cfg", None) is not None:  # a model timm created
        from timm.models._hub import save_config_for_hf

        data = (
            {"mean": tuple(meta["mean"]), "std": tuple(meta["std"])} if mean is not None and std is not None else None
        )
        save_config_for_hf(model, str(out / TIMM_CONFIG_FILE), model_args=meta["arch_kwargs"], data_config=data)
    return out


# --- finding ---------------------------------------------------------------------------


@contextlib.contextmanager
def using_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point the process-wide MLflow tracking URI at `uri` meanwhile.

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


def download_dir(url: str, dst: Path, storage_options: dict[str, Any] | None = None) -> Path:
    """Copy the files of directory `url` (a local path or fsspec URL) into `dst`; returns `dst`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.isdir(path):
        raise ArtifactNotFound(f"{url}: no such directory")
    dst.mkdir(parents=True, exist_ok=True)
    for remote in fs.find(path):
        local = dst / remote[len(path.rstrip("/")) + 1 :]
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(local))
    return dst


def upload_dir(local: Path, dest: str, storage_options: dict[str, Any] | None = None) -> None:
    """Replace `dest` (a local path or fsspec URL) by a copy of directory `local`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(dest, **(storage_options or {}))
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    for file in sorted(local.rglob("*")):
        if file.is_file():
            target = f"{path}/{file.relative_to(local).as_posix()}"
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(file), target)


def fetch(
    source: str, dst: str | Path, *, tracking_uri: str | None = None, storage_options: dict[str, Any] | None = None
) -> Path:
    """The local directory or file behind `source`; remote files are downloaded under `dst`.

    A download logs its progress (data.progress.LINE_EVERY_S apart) and its size and time.
    """
    if source.startswith(MODEL_URI_SCHEMES):
        import mlflow.artifacts

        with using_tracking_uri(tracking_uri), DownloadLines(source, Path(dst)):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=source,
                dst_path=str(dst),
                tracking_uri=tracking_uri or None,
                registry_uri=tracking_uri or None,
            )
        return Path(local)
    if "://" in source and not source.startswith("file://"):
        with DownloadLines(source, Path(dst)):
            return download_dir(source, Path(dst), storage_options)
    return Path(source.removeprefix("file://")).expanduser()


class DownloadLines:
    """Log lines while files land under a folder: MB so far every LINE_EVERY_S, then size and time.

    Downloads of teachers and tokenizers run in Ray workers, whose logs have no progress bars.
    """

    def __init__(self, source: str, folder: Path, every_s: float | None = None) -> None:
        from data.progress import LINE_EVERY_S

        self.source, self.folder = source, folder
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="download-lines", daemon=True)

    def size_mb(self) -> float:
        return sum(f.stat().st_size for f in self.folder.rglob("*") if f.is_file()) / 1e6

    def _watch(self) -> None:
        while not self._done.wait(self.every_s):
            seconds = time.monotonic() - self._started
            size = self.size_mb()
            log.info("downloading %s: %.1f MB so far (%.1f MB/s)", self.source, size, size / seconds)

    def __enter__(self) -> DownloadLines:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        if exc_type is None:
            seconds = time.monotonic() - self._started
            log.info("downloaded %s: %.1f MB in %.1f s", self.source, self.size_mb(), seconds)


def holds_artifact(directory: Path, kind: str) -> bool:
    """Whether `directory` has the metadata file of an artifact of `kind` (either layout)."""
    return (directory / META_FILE).is_file() or (directory / f"{LEGACY_STEMS[kind]}.json").is_file()


def _layout_files(path: Path, kind: str) -> tuple[Path, Path, int]:
    """(weights, meta, format) of the directory (or weights file) `path`; the files may not exist."""
    stem = LEGACY_STEMS[kind]
    if path.is_file():
        path = path.parent
    if (path / META_FILE).is_file() or not (path / f"{stem}.json").is_file():
        return path / WEIGHTS_FILE, path / META_FILE, LAYOUT_FORMAT
    return path / f"{stem}.safetensors", path / f"{stem}.json", 1


def read_local(path: Path, kind: str, *, label: str = "", hint: str = "") -> Artifact:
    """The artifact of `kind` in local directory `path` (either layout)."""
    from safetensors.torch import load_file

    label = label or str(path)
    suffix = f"; {hint}" if hint else ""
    weights, meta_path, layout = _layout_files(path, kind)
    if not (weights.is_file() and meta_path.is_file()):
        raise ArtifactNotFound(f"{label}: no {kind} there (no {WEIGHTS_FILE} + {META_FILE}){suffix}")
    meta = json.loads(meta_path.read_text())
    expected = kind if layout == LAYOUT_FORMAT else LEGACY_KINDS[kind]
    if meta.get("kind") != expected or meta.get("format") != layout:
        raise ArtifactError(
            f"{label}: holds kind {meta.get('kind')!r} format {meta.get('format')!r}, expected a {kind}{suffix}"
        )
    meta = {**meta, "format": layout, "kind": kind}
    return Artifact(kind=kind, meta=meta, tensors=load_file(str(weights), device="cpu"), source=label)


def read_artifact(
    source: str,
    kind: str,
    *,
    tracking_uri: str | None = None,
    storage_options: dict[str, Any] | None = None,
    hint: str = "",
) -> Artifact:
    """The artifact of `kind` at `source` (local path, fsspec URL, runs:/ or models:/); one-line errors."""
    if not source:
        raise ArtifactNotFound(f"no {kind} given" + (f"; {hint}" if hint else ""))
    with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
        try:
            local = fetch(source, tmp, tracking_uri=tracking_uri, storage_options=storage_options)
        except ArtifactError:
            raise
        except Exception as err:  # MlflowException, OSError, botocore...: one line with the way out
            where = (
                f" in the MLflow store {tracking_uri or '(default)'}" if source.startswith(MODEL_URI_SCHEMES) else ""
            )
            raise ArtifactNotFound(f"{source}: not found{where} ({first_line(err)}); {hint}".rstrip("; ")) from None
        return read_local(local, kind, label=source, hint=hint)


# --- names -----------------------------------------------------------------------------


def registry_name(text: str) -> str:
    """A registered-model name from free text: [A-Za-z0-9._-], no leading/trailing separators."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return name[:200] or "model"


def run_name(run_id: str, tracking_uri: str | None) -> str:
    """The MLflow run's name, else "run-<first 8 characters of the id>"."""
    if tracking_uri:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            return MlflowClient(tracking_uri).get_run(run_id).info.run_name or f"run-{run_id[:8]}"
        except MlflowException:
            pass
    return f"run-{run_id[:8]}"


def source_name(source: str, tracking_uri: str | None = None) -> str:
    """A short name for where an artifact came from (a registered name, a run's name, a timm name, a folder)."""
    if source.startswith("runs:/"):  # runs:/<run_id>/encoder -> that run's name
        return run_name(source.removeprefix("runs:/").split("/")[0], tracking_uri)
    if source.startswith("models:/"):  # models:/<name>@<alias> or /<version> -> <name>
        return source.removeprefix("models:/").split("@")[0].split("/")[0]
    # timm:<name> -> <name>; <run dir>/export/encoder -> <run name>; other paths -> the last part
    parts = Path(source.removeprefix("timm:").rstrip("/")).parts or ("teacher",)
    return parts[-3] if len(parts) >= 3 and parts[-2] == "export" else parts[-1]
