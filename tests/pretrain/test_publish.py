"""Encoder publishing against a real sqlite MLflow store: the pt2 model, the registry aliases, the card, lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from objectives.artifacts import save_encoder
from pretrain.config import PretrainConfig
from pretrain.evaluate import EvalResult, result_table
from pretrain.features import Encoder, load_encoder
from pretrain.publish import (
    BEST_ALIAS,
    lineage,
    log_encoder,
    model_card,
    promote_best,
    register,
    registered_name,
    resolve_model_uri,
)

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # No MLFLOW_TRACKING_URI: every call must name the store itself.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _encoder(tmp_path: Path, seed: int) -> tuple[Encoder, Path]:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model(ARCH, **KWARGS).eval()
    files = save_encoder(vit, tmp_path / f"export-{seed}", ARCH, KWARGS, mean=[0.5] * 3, std=[0.25] * 3)
    return load_encoder(str(files), tracking_uri=None), files


def _run(store: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("t") if client.get_experiment_by_name("t") is None else "1"
    return client.create_run(exp).info.run_id


def _publish(store: str, tmp_path: Path, seed: int, name: str = "mae-vit_test") -> tuple[Encoder, str, str]:
    encoder, files = _encoder(tmp_path, seed)
    run_id = _run(store)
    model_id, runs_uri = log_encoder(encoder, files, run_id=run_id, tracking_uri=store)
    assert runs_uri == f"runs:/{run_id}/encoder"
    version = register(
        name=name, model_id=model_id, run_id=run_id, tracking_uri=store, tags={"pretrain.run_id": run_id}
    )
    return encoder, version, run_id


def test_logged_encoder_loads_with_mlflow_pytorch_and_as_a_teacher(store: str, tmp_path: Path) -> None:
    import mlflow.pytorch
    import timm
    from safetensors.torch import load_file

    encoder, version, run_id = _publish(store, tmp_path, seed=0)
    assert version == "1"
    images = torch.randn(3, 3, 16, 16)  # batch 3: the exported program's batch dimension is dynamic
    with torch.no_grad():
        expected = encoder.vit(images)
    from objectives.artifacts import using_tracking_uri

    with using_tracking_uri(store):  # as a user would: MLFLOW_TRACKING_URI
        program = mlflow.pytorch.load_model("models:/mae-vit_test/1")
    with torch.no_grad():
        torch.testing.assert_close(program(images), expected, rtol=0, atol=1e-6)
    # The same files behind runs:/ and models:/: timm strict load, and the teacher loader.
    for uri in (f"runs:/{run_id}/encoder", "models:/mae-vit_test/latest"):
        again = load_encoder(uri, tracking_uri=store)
        assert again.arch == ARCH and again.mean == [0.5] * 3 and again.std == [0.25] * 3
        with torch.no_grad():
            torch.testing.assert_close(again.vit(images), expected, rtol=0, atol=0)
    plain = timm.create_model(ARCH, **KWARGS)
    plain.load_state_dict(load_file(str(tmp_path / "export-0" / "model.safetensors")), strict=True)


def test_best_alias_moves_only_when_the_metric_beats_the_holder(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = "mae-vit_test"
    scores = {}
    holders = []
    for seed, score in enumerate([0.50, 0.40, 0.50, 0.65, 0.10]):
        _, version, _ = _publish(store, tmp_path, seed=seed, name=name)
        client.set_model_version_tag(name, version, "eval.knn_top1", str(score))
        scores[version] = score
        promote_best(name=name, version=version, metric="knn_top1", value=score, tracking_uri=store)
        holders.append(str(client.get_model_version_by_alias(name, BEST_ALIAS).version))
    # v1 first holder; v2 worse; v3 only ties (not a beat); v4 better; v5 worse.
    assert holders == ["1", "1", "1", "4", "4"]
    # `latest` is MLflow's reserved name for the newest version, not an alias.
    assert resolve_model_uri(f"models:/{name}/latest", store) == f"models:/{name}/5"
    assert resolve_model_uri(f"models:/{name}@{BEST_ALIAS}", store) == f"models:/{name}/4"
    assert resolve_model_uri("runs:/abc/encoder", store) == "runs:/abc/encoder"


def test_a_holder_without_the_metric_is_replaced(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    _publish(store, tmp_path, seed=0)
    client.set_registered_model_alias("mae-vit_test", BEST_ALIAS, "1")  # promoted by hand, no eval tag
    _, version, _ = _publish(store, tmp_path, seed=1)
    assert promote_best(name="mae-vit_test", version=version, metric="knn_top1", value=0.2, tracking_uri=store)
    assert str(client.get_model_version_by_alias("mae-vit_test", BEST_ALIAS).version) == "2"


def test_registered_name_lineage_and_model_card(store: str, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from pretrain.compose import load_config

    cfg: PretrainConfig = OmegaConf.to_object(
        load_config(
            [
                "objective=beitv2",
                "objective.tokenizer=models:/vqkd-x/latest",
                "model=vit_small",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.default_train_samples=32",
                "data.default_eval_samples=16",
                "data.default_shard_size=16",
            ]
        )
    )
    assert registered_name(cfg) == "beitv2-vit_small"
    cfg.tracking.registered_model = "my encoder/v2"
    assert registered_name(cfg) == "my-encoder-v2"

    # The tokenizer is pinned to the version in the registry at the time of the run.
    _publish(store, tmp_path, seed=0, name="vqkd-x")
    _publish(store, tmp_path, seed=1, name="vqkd-x")
    tags = lineage(cfg, run_id="r1", run_name="demo", steps=7, tracking_uri=store)
    assert tags["pretrain.tokenizer"] == "models:/vqkd-x/2"
    from data.default import ensure_default_dataset
    from data.manifest import read_manifest

    manifest = read_manifest(ensure_default_dataset(cfg.data).train_url)
    assert tags["pretrain.data_manifest_hash"] == manifest.manifest_hash
    assert tags["pretrain.objective"] == "beitv2" and tags["pretrain.steps"] == "7"
    assert "pretrain.teacher" not in tags  # BEiT v2 has a tokenizer, no teacher

    encoder, _ = _encoder(tmp_path, seed=2)
    result = EvalResult(
        model_uri="x",
        arch=ARCH,
        features="cls",
        fit_samples=100,
        test_samples=40,
        num_classes=3,
        skipped=0,
        encoder={"knn_top1": 0.625, "linear_top1": 0.7},
        baseline={"knn_top1": 0.25, "linear_top1": 0.3},
        linear_weight_decay=1e-4,
    )
    card = model_card(cfg, encoder, result, tags, name="beitv2-vit_small", version="3")
    assert card.startswith("# beitv2-vit_small v3")
    for needle in (ARCH, manifest.manifest_hash, "models:/vqkd-x/2", "`beitv2`", "62.5%", "25.0%", "+37.5"):
        assert needle in card, needle
    assert json.dumps(KWARGS, sort_keys=True) in card
    table = result_table(result)
    assert table[-2].split() == ["kNN", "top-1", "62.5%", "25.0%", "+37.5"]
    assert table[-1].split() == ["linear", "probe", "top-1", "70.0%", "30.0%", "+40.0"]
