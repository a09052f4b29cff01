"""Encoder publishing against a real sqlite MLflow store: the pt2 model, the registry aliases, the card, lineage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from objectives.artifacts import save_encoder
from pretrain.config import PretrainConfig
from pretrain.evaluate import EvalResult, result_table
from pretrain.features import Encoder, load_encoder
from pretrain.publish import (
    BEST_ALIAS,
    best_verdict,
    lineage,
    log_encoder,
    model_card,
    promote_best,
    register,
    registered_name,
    resolve_model_uri,
    upstream_chain,
)

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_store) -> str:
    # No MLFLOW_TRACKING_URI: every call must name the store itself.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return empty_mlflow_store(tmp_path / "mlflow.db")


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
    import mlflow.pyfunc
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
    # What serving runs (log_encoder skips MLflow's own check of it): pyfunc on a numpy batch.
    with using_tracking_uri(store):
        served = mlflow.pyfunc.load_model("models:/mae-vit_test/1").predict(images.numpy())
    torch.testing.assert_close(torch.from_numpy(served), expected, rtol=0, atol=1e-6)
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
        # No baseline measured: only the holder test applies.
        promote_best(name=name, version=version, metric="knn_top1", value=score, baseline=None, tracking_uri=store)
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
    assert promote_best(
        name="mae-vit_test", version=version, metric="knn_top1", value=0.2, baseline=0.1, tracking_uri=store
    )
    assert str(client.get_model_version_by_alias("mae-vit_test", BEST_ALIAS).version) == "2"


def test_best_alias_needs_to_beat_the_random_init_baseline(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = "vqkd-vit_test"

    def publish(seed: int, score: float, baseline: float) -> bool:
        _, version, _ = _publish(store, tmp_path, seed=seed, name=name)
        client.set_model_version_tag(name, version, "eval.knn_top1", str(score))
        return promote_best(
            name=name, version=version, metric="knn_top1", value=score, baseline=baseline, tracking_uri=store
        )

    # (a) The first version, below its own random init, does not take `best`: nobody holds it.
    with caplog.at_level(logging.INFO, logger="pretrain.publish"):
        assert publish(0, score=0.30, baseline=0.35) is False
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, BEST_ALIAS)
    said = [r.getMessage() for r in caplog.records if r.name == "pretrain.publish"]
    assert said == [
        "alias best does not move to vqkd-vit_test v1: knn_top1 0.3000, random init 0.3500"
        " (not moved: 30.0% <= random init 35.0%)"
    ]
    # (b) Above its baseline and with no holder: takes it.
    assert publish(1, score=0.40, baseline=0.20) is True
    assert str(client.get_model_version_by_alias(name, BEST_ALIAS).version) == "2"
    # (c) Above the holder (0.45 > 0.40) but below its own baseline (0.45 < 0.50): stays on v2.
    assert publish(2, score=0.45, baseline=0.50) is False
    # A tie with its baseline is not a beat either; then above both takes it.
    assert publish(3, score=0.45, baseline=0.45) is False
    assert str(client.get_model_version_by_alias(name, BEST_ALIAS).version) == "2"
    assert publish(4, score=0.45, baseline=0.44) is True
    assert str(client.get_model_version_by_alias(name, BEST_ALIAS).version) == "5"


def test_best_verdict_says_why() -> None:
    common = {"metric": "knn_top1"}
    assert best_verdict(value=0.125, baseline=0.095, holder="1", held=0.10, **common) == (
        True,
        "beats random init 9.5% and holder v1 10.0%",
    )
    assert best_verdict(value=0.09, baseline=0.05, holder="1", held=0.10, **common) == (
        False,
        "stays on v1: 9.0% <= 10.0%",
    )
    assert best_verdict(value=0.08, baseline=0.095, holder=None, held=None, **common) == (
        False,
        "not moved: 8.0% <= random init 9.5%",
    )
    # Below the baseline and the holder: the baseline is the reason, and where `best` stays.
    assert best_verdict(value=0.08, baseline=0.095, holder="2", held=0.30, **common) == (
        False,
        "not moved: 8.0% <= random init 9.5%; stays on v2",
    )
    assert best_verdict(value=0.2, baseline=0.1, holder=None, held=None, **common) == (
        True,
        "beats random init 10.0%; nobody held it",
    )
    assert best_verdict(value=0.2, baseline=0.1, holder="1", held=None, **common) == (
        True,
        "beats random init 10.0%; holder v1 has no eval.knn_top1",
    )
    assert best_verdict(value=0.2, baseline=None, holder="3", held=0.15, **common) == (
        True,
        "beats holder v3 15.0%; no random-init baseline",
    )
    assert best_verdict(value=0.2, baseline=None, holder=None, held=None, **common) == (
        True,
        "nobody held it; no random-init baseline",
    )


def _register_dir(store: str, tmp_path: Path, name: str, tags: dict[str, str]) -> str:
    """A registry version of `name` for a one-file directory, with version `tags`; its models:/ URI."""
    from mlflow import MlflowClient

    from pretrain.model_registry import log_model_dir

    files = tmp_path / f"files-{name}"
    files.mkdir()
    (files / "weights.txt").write_text(name)
    uri = log_model_dir(
        files, run_id=_run(store), tracking_uri=store, name="model", model_type="test", registered_name=name
    )
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    for key, value in tags.items():
        client.set_model_version_tag(name, uri.rsplit("/", 1)[1], key, value)
    return uri


def _entry(role: str, uri: str, objective: str = "", steps: str = "", evaluation: str = "") -> dict[str, str]:
    return {"role": role, "uri": uri, "objective": objective, "steps": steps, "eval": evaluation}


def test_upstream_chain_walks_the_registry_and_the_card_shows_it(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    from pretrain.compose import load_config

    timm_teacher = "timm:vit_small_patch16_224.dino"
    teacher = _register_dir(
        store,
        tmp_path,
        "mae-vit_nano",
        {
            "pretrain.objective": "mae",
            "pretrain.steps": "300",
            "pretrain.teacher": timm_teacher,  # a source outside the registry: listed, not followed
            "eval.knn_top1": "0.412000",
            "eval.baseline_knn_top1": "0.301000",
            "eval.linear_top1": "0.500000",
            "eval.baseline_linear_top1": "0.400000",
        },
    )
    tokenizer = _register_dir(
        store,
        tmp_path,
        "vqkd-mae-vit_nano",
        {"pretrain.objective": "vqkd", "pretrain.steps": "200", "pretrain.teacher": teacher},
    )
    assert (teacher, tokenizer) == ("models:/mae-vit_nano/1", "models:/vqkd-mae-vit_nano/1")
    tags = {
        "pretrain.objective": "beitv2",
        "pretrain.steps": "100",
        "pretrain.global_batch": "64",
        "pretrain.tokenizer": tokenizer,
        "eval.knn_top1": "0.625000",
        "eval.baseline_knn_top1": "0.250000",
    }
    teacher_eval = "knn_top1 41.2% (random init 30.1%), linear_top1 50.0% (random init 40.0%)"
    expected = [
        _entry("teacher", timm_teacher),
        _entry("teacher", teacher, "mae", "300", teacher_eval),
        _entry("tokenizer", tokenizer, "vqkd", "200"),
    ]
    chain = upstream_chain(tags, store)
    assert chain == expected

    cfg: PretrainConfig = OmegaConf.to_object(
        load_config(["objective=beitv2", f"objective.tokenizer={tokenizer}", "model=vit_nano"])
    )
    encoder, _ = _encoder(tmp_path, seed=0)
    card = model_card(cfg, encoder, None, tags, name="beitv2-vit_nano", version="1", chain=chain)
    table = [
        "## Lineage",
        "",
        "| role | model version | objective | steps | evaluation |",
        "|---|---|---|---|---|",
        f"| teacher | {timm_teacher} | - | - | - |",
        f"| teacher | models:/mae-vit_nano/1 | mae | 300 | {teacher_eval} |",
        "| tokenizer | models:/vqkd-mae-vit_nano/1 | vqkd | 200 | - |",
        "| this encoder | models:/beitv2-vit_nano/1 | beitv2 | 100 | knn_top1 62.5% (random init 25.0%) |",
        "",
    ]
    assert "\n".join(table) in card
    # The single rows of the top table stay.
    assert f"| tokenizer | {tokenizer} |" in card and "| teacher | - |" in card

    # A cycle (the teacher tagged with the tokenizer built from it) is cut: each version once.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    client.set_model_version_tag("mae-vit_nano", "1", "pretrain.tokenizer", tokenizer)
    assert upstream_chain(tags, store) == expected

    # Missing versions are listed, never raised; runs:/, paths and aliases are listed, not followed.
    missing = upstream_chain(
        {"pretrain.teacher": "models:/mae-vit_nano/9", "pretrain.tokenizer": "models:/nope/1"}, store
    )
    assert missing == [
        _entry("teacher", "models:/mae-vit_nano/9", evaluation="not found in the registry"),
        _entry("tokenizer", "models:/nope/1", evaluation="not found in the registry"),
    ]
    for uri in ("runs:/abc/encoder", str(tmp_path / "files-mae-vit_nano"), "models:/mae-vit_nano@best"):
        assert upstream_chain({"pretrain.teacher": uri}, store) == [_entry("teacher", uri)]
    assert upstream_chain({"pretrain.objective": "mae"}, store) == []


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
    assert "## Lineage" not in card  # no chain given
    for needle in (ARCH, manifest.manifest_hash, "models:/vqkd-x/2", "`beitv2`", "62.5%", "25.0%", "+37.5"):
        assert needle in card, needle
    assert json.dumps(KWARGS, sort_keys=True) in card
    table = result_table(result)
    assert table[-2].split() == ["kNN", "top-1", "62.5%", "25.0%", "+37.5"]
    assert table[-1].split() == ["linear", "probe", "top-1", "70.0%", "30.0%", "+40.0"]
