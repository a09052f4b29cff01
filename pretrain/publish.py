"""End of a run: evaluate the exported encoder, write its model card, log it to MLflow and register it.

Runs after training (pretrain.launch: in the driver on one node, else in a Ray task), on the files rank 0 exported to
`<run dir>/export/encoder/` (timm key names, fp32 safetensors; ZeRO-3 gathered):

1. load them into `timm.create_model(arch, **arch_kwargs)` with a strict load;
2. kNN / linear probe for it and a random-init baseline (pretrain.evaluate), logged
   to the run as `eval/*` metrics, `eval/results.json` and a confusion-matrix picture;
3. log the encoder as an MLflow model of the run, loadable with
   `mlflow.pytorch.load_model` (torch.export `pt2`, input example and signature), with
   the encoder artifact's files (model.safetensors, pretrain.json, timm's config.json),
   README.md (the model card) and eval.json beside it, so `runs:/<run_id>/encoder` also
   loads as a teacher, and with timm's `local-dir:`;
4. register a version under `<objective>-<model>` (or tracking.registered_model) with
   lineage tags; `models:/<name>/latest` is the newest (MLflow reserves the alias
   `latest`), and the alias `best` moves only when eval.select_metric beats both its
   holder and the version's own random-init baseline.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pretrain.config import PretrainConfig
    from pretrain.evaluate import EvalResult
    from pretrain.features import Encoder

log = logging.getLogger("pretrain.publish")

BEST_ALIAS = "best"
CARD_FILE = "README.md"
EVAL_FILE = "eval.json"
UPSTREAM_ROLES = ("teacher", "tokenizer")  # lineage tags `pretrain.<role>`: the upstream version used
VERSION_URI = re.compile(r"models:/([^/@]+)/(\d+)")  # a pinned registry version, the only kind followed


def registered_name(cfg: PretrainConfig) -> str:
    """tracking.registered_model, else <objective>-<model.name or arch>."""
    from objectives.artifacts import registry_name

    return registry_name(cfg.tracking.registered_model or f"{cfg.objective.name}-{cfg.model.name or cfg.model.arch}")


def resolve_model_uri(uri: str, tracking_uri: str) -> str:
    """A `models:/name/latest` or `models:/name@alias` as the concrete `models:/name/<version>`; others unchanged."""
    if not uri.startswith("models:/") or not tracking_uri:
        return uri
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    rest = uri.removeprefix("models:/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return f"models:/{name}/{client.get_model_version_by_alias(name, alias).version}"
        name, _, version = rest.partition("/")
        if version == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            return f"models:/{name}/{max(int(v.version) for v in versions)}" if versions else uri
    except MlflowException:
        return uri
    return uri


def data_identity(cfg: PretrainConfig) -> str:
    """The training data's manifest hash (or the hash of its shard names for a brace pattern)."""
    from data.default import ensure_default_dataset
    from data.manifest import read_manifest
    from data.stream import resolve_urls, shards_id

    url = cfg.data.urls or ensure_default_dataset(cfg.data).train_url
    if url.endswith(".json"):
        return read_manifest(url, cfg.data.storage_options).manifest_hash
    return f"shards:{shards_id(resolve_urls(url))}"


def lineage(cfg: PretrainConfig, *, run_id: str, run_name: str, steps: int, tracking_uri: str) -> dict[str, str]:
    """Tags of a registered version: where the encoder came from."""
    from pretrain.engine import global_batch
    from pretrain.resolve import DATA_KEY_TAG, data_key, stage_key

    tags = {
        "pretrain.run_id": run_id,
        "pretrain.run_name": run_name,
        "pretrain.objective": cfg.objective.name,
        "pretrain.arch": cfg.model.arch,
        "pretrain.model": cfg.model.name or cfg.model.arch,
        "pretrain.steps": str(steps),
        "pretrain.global_batch": str(global_batch(cfg.trainer)),
        "pretrain.data": cfg.data.urls or "embedded default",
        "pretrain.data_manifest_hash": data_identity(cfg),
        # What a pipeline matches to reuse this stage (pretrain.resolve.stage_key).
        "pretrain.stage_key": stage_key(cfg),
        DATA_KEY_TAG: data_key(cfg.data),
    }
    # Upstream stages (tokenizer, teacher), pinned to the version this run used.
    for role, uri in cfg.objective.upstream().items():
        tags[f"pretrain.{role}"] = resolve_model_uri(uri, tracking_uri)
    return tags


def pooled_name(encoder: Encoder) -> str:
    """What the encoder's pooled output is, for the model card."""
    if getattr(encoder.vit, "num_prefix_tokens", None) is None:
        return "pooled"
    return "mean patch-token" if encoder.features_for("auto") == "mean" else "CLS"


def model_card(
    cfg: PretrainConfig,
    encoder: Encoder,
    result: EvalResult | None,
    tags: dict[str, str],
    *,
    name: str,
    version: str,
    chain: list[dict[str, str]] | None = None,
) -> str:
    """The markdown model card: architecture, objective, data, lineage, eval metrics, how to load, config."""
    from omegaconf import OmegaConf

    from pretrain.evaluate import result_table
    from pretrain.tracking import redact

    params = sum(p.numel() for p in encoder.vit.parameters())
    title = f"{name} v{version}" if version else name
    rows = [
        ("architecture", f"timm `{encoder.arch}` {json.dumps(encoder.arch_kwargs, sort_keys=True)}"),
        ("parameters", f"{params / 1e6:.2f} M"),
        (
            "input",
            f"3 x {encoder.img_size} x {encoder.img_size}, normalised with mean {encoder.mean}, std {encoder.std}",
        ),
        ("objective", f"`{cfg.objective.name}`"),
        ("steps", f"{tags.get('pretrain.steps', '?')} at global batch {tags.get('pretrain.global_batch', '?')}"),
        ("data", f"{tags.get('pretrain.data')} (manifest {tags.get('pretrain.data_manifest_hash')})"),
        ("tokenizer", tags.get("pretrain.tokenizer", "-")),
        ("teacher", tags.get("pretrain.teacher", "-")),
        ("MLflow run", f"{tags.get('pretrain.run_name')} (`{tags.get('pretrain.run_id')}`)"),
    ]
    lines = [f"# {title}", "", f"A `{cfg.objective.name}` self-supervised ViT encoder trained with `pretrain`.", ""]
    lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    if chain:
        this = {
            "role": "this encoder",
            "uri": f"models:/{name}/{version}" if version else f"{name} (not registered)",
            "objective": cfg.objective.name,
            "steps": tags.get("pretrain.steps", ""),
            "eval": eval_text(tags),
        }
        lines += lineage_table([*chain, this])
    lines += ["## Evaluation (frozen features)", ""]
    if result is None:
        lines += ["Not evaluated (eval.enabled=false).", ""]
    else:
        lines += ["```", *result_table(result), "```", ""]
        lines += [
            f"kNN: k={cfg.eval.k}, T={cfg.eval.temperature}; linear probe weight decay "
            f"{result.linear_weight_decay}. Random init: same architecture, timm's init.",
            "",
        ]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in sorted(encoder.arch_kwargs.items()))
    lines += [
        "## Load it",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:<this folder>", pretrained=True)',
        "# or, with the weights file alone:",
        "import safetensors.torch",
        f"model = timm.create_model({encoder.arch!r}, {kwargs})",
        'model.load_state_dict(safetensors.torch.load_file("model.safetensors"), strict=True)',
        "```",
        "",
        f"or `mlflow.pytorch.load_model('models:/{name}/{version or 'latest'}')` (a torch.export program: "
        f"images (B, 3, H, W) -> {pooled_name(encoder)} features (B, D)), or as a teacher of a later stage: "
        f"`objective.teacher.source=models:/{name}/{version or 'latest'}`.",
        "",
        "## Config",
        "",
        "```yaml",
        OmegaConf.to_yaml(
            OmegaConf.create(
                redact({k: asdict(cfg)[k] for k in ("objective", "model", "optim", "deepspeed", "trainer")})
            )
        ).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow would otherwise infer them by loading the model in a subprocess.
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"timm=={version('timm')}", f"safetensors=={version('safetensors')}"]


def log_encoder(
    encoder: Encoder, files: Path, *, run_id: str, tracking_uri: str, name: str = "encoder"
) -> tuple[str, str]:
    """Log the encoder as an MLflow pytorch (pt2) model of the run, plus `files`; returns (model_id, runs:/ URI)."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from objectives.artifacts import model_type, using_tracking_uri

    vit = encoder.vit.float().cpu().eval()
    if encoder.features_for("auto") == "mean" and getattr(vit, "num_prefix_tokens", None) is not None:
        vit.reset_classifier(0, global_pool="avg")  # the logged program returns what the evaluation reads
    example = np.zeros((2, 3, encoder.img_size, encoder.img_size), dtype=np.float32)
    with torch.inference_mode():
        output = vit(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)  # batch dimension -1: exported as dynamic
    client = MlflowClient(tracking_uri=tracking_uri)
    # Created here, in the run's experiment: without an active run log_model would put it in
    # the default experiment, where `runs:/<run_id>/<name>` does not look.
    logged = client.create_logged_model(
        client.get_run(run_id).info.experiment_id,
        name=name,
        source_run_id=run_id,
        model_type=model_type("encoder"),
        params={"arch": encoder.arch, **{f"arch_kwargs.{k}": str(v) for k, v in encoder.arch_kwargs.items()}},
    )
    with using_tracking_uri(tracking_uri):
        mlflow.pytorch.log_model(
            vit,
            name=name,
            model_id=logged.model_id,
            run_id=run_id,
            input_example=example,
            signature=signature,
            pip_requirements=_pip_requirements(),
            # MLflow would load the program back and run the example through pyfunc (1.5-3 s at the
            # end of every run on a 2-core VM); tests/pretrain/test_publish.py does that check.
            validate_serving_input=False,
        )
    client.log_model_artifacts(logged.model_id, str(files))
    return logged.model_id, f"runs:/{run_id}/{name}"


def register(*, name: str, model_id: str, run_id: str, tracking_uri: str, tags: dict[str, str]) -> str:
    """A new version of registered model `name` for logged model `model_id`, with `tags`; returns the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from objectives.artifacts import using_tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(name, description="Self-supervised ViT encoders (pretrain)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with using_tracking_uri(tracking_uri):
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    return str(version.version)


def best_verdict(
    *, value: float, baseline: float | None, holder: str | None, held: float | None, metric: str
) -> tuple[bool, str]:
    """Whether a version scoring `value` takes alias `best` from version `holder` (scoring `held`), and why."""
    stays = f"; stays on v{holder}" if holder is not None else ""
    if baseline is not None and value <= baseline:
        return False, f"not moved: {_pct(value)} <= random init {_pct(baseline)}{stays}"
    if holder is not None and held is not None and value <= held:
        return False, f"stays on v{holder}: {_pct(value)} <= {_pct(held)}"
    beaten = [] if baseline is None else [f"random init {_pct(baseline)}"]
    notes = []
    if holder is None:
        notes.append("nobody held it")
    elif held is None:
        notes.append(f"holder v{holder} has no eval.{metric}")
    else:
        beaten.append(f"holder v{holder} {_pct(held)}")
    if baseline is None:
        notes.append("no random-init baseline")
    if beaten:
        notes.insert(0, f"beats {' and '.join(beaten)}")
    return True, "; ".join(notes)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _promote(
    *, name: str, version: str, metric: str, value: float, baseline: float | None, tracking_uri: str
) -> tuple[bool, str]:
    """promote_best, with the verdict in words."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        holder = client.get_model_version_by_alias(name, BEST_ALIAS)
    except MlflowException:
        holder = None
    held = None if holder is None else holder.tags.get(f"eval.{metric}")
    moved, reason = best_verdict(
        value=value,
        baseline=baseline,
        holder=None if holder is None else str(holder.version),
        held=None if held is None else float(held),
        metric=metric,
    )
    log.info(
        "alias %s %s %s v%s: %s %.4f, random init %s (%s)",
        BEST_ALIAS,
        "moves to" if moved else "does not move to",
        name,
        version,
        metric,
        value,
        "-" if baseline is None else f"{baseline:.4f}",
        reason,
    )
    if moved:
        client.set_registered_model_alias(name, BEST_ALIAS, version)
    return moved, reason


def promote_best(
    *, name: str, version: str, metric: str, value: float, baseline: float | None, tracking_uri: str
) -> bool:
    """Point alias `best` at `version` if `value` beats its random-init `baseline` and the holder; True if it moved.

    Both comparisons are strict. The holder test passes when nobody holds `best` or the
    holder has no `eval.<metric>` tag; `baseline=None` (no baseline measured) skips that test.
    """
    return _promote(
        name=name, version=version, metric=metric, value=value, baseline=baseline, tracking_uri=tracking_uri
    )[0]


def eval_text(tags: dict[str, str]) -> str:
    """A version's `eval.<metric>` tags in words: "knn_top1 41.2% (random init 30.1%)", comma-separated."""
    shown = []
    for key in sorted(tags):
        metric = key.removeprefix("eval.")
        if not key.startswith("eval.") or metric.startswith("baseline_"):
            continue
        base = tags.get(f"eval.baseline_{metric}")
        versus = f" (random init {_tag_pct(base)})" if base is not None else ""
        shown.append(f"{metric} {_tag_pct(tags[key])}{versus}")
    return ", ".join(shown)


def _tag_pct(text: str) -> str:
    try:
        return _pct(float(text))
    except ValueError:
        return text


def upstream_chain(tags: dict[str, str], tracking_uri: str) -> list[dict[str, str]]:
    """The upstream versions behind a version's lineage `tags`, most upstream first, each with its own upstream before it.

    Entries: role, uri, objective, steps, eval. Only `models:/<name>/<version>` URIs are
    followed; other sources (`timm:...`, `runs:/...`, paths) are listed but end the walk,
    a version missing from the registry is listed as such, and a cycle is cut.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    chain: list[dict[str, str]] = []
    seen: set[str] = set()

    def visit(role: str, uri: str) -> None:
        if uri in seen:
            return
        seen.add(uri)
        found, problem = _version_tags(client, uri)
        for up_role in UPSTREAM_ROLES:
            if found.get(f"pretrain.{up_role}"):
                visit(up_role, found[f"pretrain.{up_role}"])
        objective, steps = found.get("pretrain.objective", ""), found.get("pretrain.steps", "")
        chain.append(
            {"role": role, "uri": uri, "objective": objective, "steps": steps, "eval": problem or eval_text(found)}
        )

    for role in UPSTREAM_ROLES:
        if tags.get(f"pretrain.{role}"):
            visit(role, tags[f"pretrain.{role}"])
    return chain


def _version_tags(client: Any, uri: str) -> tuple[dict[str, str], str]:
    """(tags, "") of registry version `uri`; ({}, "") if `uri` is not a version URI; ({}, why) if it cannot be read."""
    from mlflow.exceptions import MlflowException

    match = VERSION_URI.fullmatch(uri)
    if match is None:
        return {}, ""
    try:
        return dict(client.get_model_version(match[1], match[2]).tags), ""
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}, "not found in the registry"
        return {}, f"not read: {err.message.splitlines()[0]}"


def lineage_table(chain: list[dict[str, str]]) -> list[str]:
    """The card's "Lineage" section: one markdown table row per chain entry."""
    lines = ["## Lineage", "", "| role | model version | objective | steps | evaluation |", "|---|---|---|---|---|"]
    for entry in chain:
        cells = [entry["role"], entry["uri"], entry["objective"], entry["steps"], entry["eval"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") or "-" for c in cells) + " |")
    return [*lines, ""]


def publish_encoder(
    cfg: PretrainConfig, *, run_dir: str, run_name: str, tracking_uri: str, run_id: str, steps: int
) -> dict[str, Any]:
    """Evaluate, card, log and register the run's exported encoder; returns what the summary prints."""
    from objectives.artifacts import download_dir
    from pretrain.evaluate import eval_sources, evaluate_encoder, log_result
    from pretrain.features import load_encoder, pick_device
    from pretrain.trainer.worker import configure_logging

    configure_logging()
    export_url = f"{run_dir.rstrip('/')}/export/encoder"
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        # One copy of the weights (from object storage too): loaded, then logged with the model.
        files = download_dir(export_url, Path(tmp), cfg.data.storage_options)  # the encoder artifact
        encoder = load_encoder(str(files), tracking_uri=tracking_uri or None)
        encoder.source = export_url
        result = None
        if cfg.eval.enabled:
            fit, test = eval_sources(cfg.eval, cfg.data)
            device = pick_device("cuda" if cfg.eval.num_gpus > 0 else "cpu")
            result = evaluate_encoder(encoder, cfg.eval, fit, test, device=device)
            log.info("eval: %s (random init %s) in %.1f s", result.encoder, result.baseline, result.seconds)
            (files / EVAL_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
            if run_id:
                log_result(result, tracking_uri=tracking_uri, run_id=run_id, step=steps)
        tags = lineage(cfg, run_id=run_id, run_name=run_name, steps=steps, tracking_uri=tracking_uri)
        if result is not None:
            tags.update({f"eval.{k}": f"{v:.6f}" for k, v in result.encoder.items()})
            tags.update({f"eval.baseline_{k}": f"{v:.6f}" for k, v in result.baseline.items()})
        out: dict[str, Any] = {"result": None if result is None else asdict(result), "export": export_url}
        name = registered_name(cfg) if run_id and cfg.tracking.register else ""
        version = model_id = ""
        if run_id:
            model_id, out["uri"] = log_encoder(encoder, files, run_id=run_id, tracking_uri=tracking_uri)
            if name:
                version = register(name=name, model_id=model_id, run_id=run_id, tracking_uri=tracking_uri, tags=tags)
                out.update(uri=f"models:/{name}/{version}", registered=name, version=version)
        # The card names the version it describes, so it is written once the version exists.
        chain = upstream_chain(tags, tracking_uri) if tracking_uri else None
        card = model_card(cfg, encoder, result, tags, name=name or registered_name(cfg), version=version, chain=chain)
        (files / CARD_FILE).write_text(card)
        if run_id:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.log_model_artifacts(model_id, str(files / CARD_FILE))
            if name:
                client.update_model_version(name, version, description=card[:5000])
                out["best"], out["best_reason"] = _promote_published(cfg, result, name, version, tracking_uri)
            client.set_tag(run_id, "pretrain.export.encoder", out["uri"])
            client.log_text(run_id, card, "model_card.md")
        for extra in (CARD_FILE, EVAL_FILE):
            if (files / extra).is_file():
                _put_file(files / extra, export_url, cfg.data.storage_options)
    out["card"] = f"{export_url}/{CARD_FILE}"
    return out


def _promote_published(
    cfg: PretrainConfig, result: EvalResult | None, name: str, version: str, tracking_uri: str
) -> tuple[bool, str]:
    """Alias `best` for a freshly registered version: (moved, why)."""
    metric = cfg.eval.select_metric
    if result is None:
        return False, "not moved: not evaluated"
    if metric not in result.encoder:
        return False, f"not moved: no {metric} in the evaluation"
    return _promote(
        name=name,
        version=version,
        metric=metric,
        value=result.encoder[metric],
        baseline=result.baseline.get(metric),
        tracking_uri=tracking_uri,
    )


def _put_file(file: Path, dest_dir: str, storage_options: dict[str, Any] | None) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(dest_dir, **(storage_options or {}))
    fs.put_file(str(file), f"{path.rstrip('/')}/{file.name}")
