"""`python -m pretrain.evaluate` on a `models:/` URI of a real sqlite registry; labelled shards and their splits."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from data.labelled import LabelledSource, empty_message, holdout_split, labelled_batches
from data.shards import manifest_url, write_shards
from pretrain.evaluate import main

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220)]


class LabelledSet(NamedTuple):
    images: torch.Tensor  # (N, 3, S, S) float32
    labels: torch.Tensor  # (N,) int64
    skipped: int


def read_labelled(source: LabelledSource, *, img_size: int, crop_pct: float, mean, std) -> LabelledSet:
    """The whole (small) labelled set in memory, from `labelled_batches`."""
    images, labels, skipped = [], [], 0
    for x, y, bad in labelled_batches(source, img_size=img_size, crop_pct=crop_pct, mean=mean, std=std):
        skipped += bad
        if y.numel():
            images.append(x)
            labels.append(y)
    if not images:
        raise ValueError(empty_message(source, skipped))
    return LabelledSet(torch.cat(images), torch.cat(labels), skipped)


def _png(rgb: tuple[int, int, int], rng: np.random.Generator, side: int = 20) -> bytes:
    pixels = np.clip(np.array(rgb)[None, None, :] + rng.integers(-6, 7, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _colour_samples(n: int, seed: int = 0):
    """Near-constant images of one of 3 colours; the label is the colour. Any encoder separates them."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"__key__": f"s-{i:05d}", "png": _png(COLOURS[i % 3], rng), "cls": i % 3}


def test_holdout_split_is_a_stable_partition_by_key() -> None:
    keys = [f"k{i}" for i in range(2000)]
    held = [k for k in keys if holdout_split(k, 0.25, seed=3)]
    assert 0.22 < len(held) / len(keys) < 0.28
    assert held == [k for k in keys if holdout_split(k, 0.25, seed=3)]  # same on every call
    assert held != [k for k in keys if holdout_split(k, 0.25, seed=4)]  # another seed, another split
    # Nested: a larger fraction keeps every key of a smaller one (the same hash threshold).
    assert set(held) <= {k for k in keys if holdout_split(k, 0.5, seed=3)}


def test_labelled_reader_skips_and_counts_bad_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    good = list(_colour_samples(10))
    bad = [
        {"__key__": "no-label", "png": _png((1, 2, 3), rng)},
        {"__key__": "text-label", "png": _png((1, 2, 3), rng), "cls": "cat"},
        {"__key__": "broken-image", "png": b"not a png", "cls": 1},
        {"__key__": "no-image", "cls": 2},
    ]
    write_shards(good[:5] + bad + good[5:], str(tmp_path), prefix="mixed", shard_size=4)
    from data.stream import resolve_urls

    urls = resolve_urls(manifest_url(str(tmp_path), "mixed"))
    mean, std = [0.5] * 3, [0.5] * 3
    got = read_labelled(LabelledSource(urls), img_size=16, crop_pct=1.0, mean=mean, std=std)
    assert got.skipped == 4
    assert got.labels.tolist() == [s["cls"] for s in good]
    # The eval transform by hand for sample 0: 20 px -> resize 16 (short side) -> centre crop 16 -> normalise.
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(good[0]["png"])))).permute(2, 0, 1)
    resized = TF.resize(pixels, [16], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expected = (resized.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(got.images[0], expected)
    # Held-out halves: disjoint, together every good sample.
    halves = [
        read_labelled(LabelledSource(urls, holdout=(0.5, keep, 0)), img_size=16, crop_pct=1.0, mean=mean, std=std)
        for keep in (True, False)
    ]
    assert sum(len(h.labels) for h in halves) == 10 and sum(h.skipped for h in halves) == 4


@pytest.fixture()
def registered_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_store) -> str:
    """A tiny timm encoder logged and registered (as pretrain.publish does) in a sqlite store; its store URI."""
    import timm

    from objectives.artifacts import save_encoder
    from pretrain.features import load_encoder
    from pretrain.publish import BEST_ALIAS, log_encoder, promote_best, register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = empty_mlflow_store(tmp_path / "mlflow.db")
    torch.manual_seed(0)
    files = save_encoder(timm.create_model(ARCH, **KWARGS), tmp_path / "export", ARCH, KWARGS)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment("pretrain")).info.run_id
    model_id, _ = log_encoder(load_encoder(str(files), tracking_uri=None), files, run_id=run_id, tracking_uri=store)
    version = register(name="tiny-enc", model_id=model_id, run_id=run_id, tracking_uri=store, tags={})
    promote_best(name="tiny-enc", version=version, metric="knn_top1", value=0.0, baseline=None, tracking_uri=store)
    assert BEST_ALIAS == "best"
    return store


def test_evaluate_cli_on_a_registry_uri(registered_encoder: str, tmp_path: Path, capsys) -> None:
    store = registered_encoder
    write_shards(_colour_samples(90), str(tmp_path / "shards"), prefix="colours", shard_size=32)
    labelled = manifest_url(str(tmp_path / "shards"), "colours")
    out = tmp_path / "result.json"
    rc = main(
        [
            "model_uri=models:/tiny-enc@best",
            f"tracking.uri={store}",
            f"eval.test_urls={labelled}",  # one labelled set: 25% of it (by key) held out
            "eval.holdout_fraction=0.25",
            "eval.crop_pct=1.0",
            "eval.batch_size=16",
            "eval.num_workers=0",
            "eval.k=5",
            f"output={out}",
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    held = sum(holdout_split(f"s-{i:05d}", 0.25, 0) for i in range(90))
    assert (result["test_samples"], result["fit_samples"]) == (held, 90 - held)
    assert result["num_classes"] == 3 and result["skipped"] == 0
    # Near-constant colour images: every encoder, trained or random, separates them.
    assert result["encoder"] == {"knn_top1": 1.0, "linear_top1": 1.0}
    assert result["baseline"] == {"knn_top1": 1.0, "linear_top1": 1.0}
    confusion = np.array(result["confusion"])
    assert confusion.trace() == held and np.count_nonzero(confusion - np.diag(np.diag(confusion))) == 0
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "100.0%" in printed and str(out) in printed

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("evaluate")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["eval/knn_top1"] == 1.0 and run.data.metrics["eval/baseline_linear_top1"] == 1.0
    assert run.data.params["model_uri"] == "models:/tiny-enc@best"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert files == {"eval/results.json", "eval/confusion.png"}


def test_evaluate_cli_mistakes_are_one_line(registered_encoder: str, capsys) -> None:
    store = registered_encoder
    cases = [
        ([], 2, "error: model_uri: required"),
        (["model_uri=x", "eval.protocols=[svm]"], 2, "error: eval.protocols: unknown protocol(s) ['svm']"),
        (
            ["model_uri=x", "eval=nope"],
            2,
            "error: eval: unknown eval 'nope'; valid choices: default, knn, linear_probe",
        ),
        (["model_uri=ftp://h/x"], 2, "error: model_uri: unsupported scheme 'ftp'"),
        (["model_uri=x", "eval.select_metric=linear_top1", "eval=knn"], 2, "error: eval.select_metric:"),
        (
            [f"tracking.uri={store}", "model_uri=models:/nope@best"],
            1,
            "error: models:/nope@best: not found in the MLflow store",
        ),
        (["model_uri=/no/such/dir"], 1, "error: /no/such/dir: no encoder there (no model.safetensors + pretrain.json)"),
    ]
    for argv, code, start in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith(start), (argv, err)
        assert "Traceback" not in "\n".join(err)
