"""The artifact store: one layout for every kind, timm's own loader, fsspec URLs, and the format-1 layouts."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from objectives.artifacts import (
    ArtifactError,
    ArtifactNotFound,
    DownloadLines,
    read_artifact,
    save_artifact,
    save_encoder,
    upload_dir,
)
from objectives.components.kmeans import load_centroids
from objectives.components.teacher import load_encoder
from objectives.components.tokenizer import load_tokenizer

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, **KWARGS).eval()


def test_encoder_layout_loads_strict_and_with_timms_local_dir(tmp_path: Path, vit) -> None:
    out = save_encoder(vit, tmp_path / "enc", ARCH, KWARGS, mean=MEAN, std=STD)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "pretrain.json"]
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta == {
        "format": 2,
        "kind": "encoder",
        "arch": ARCH,
        "arch_kwargs": KWARGS,
        "mean": list(MEAN),
        "std": list(STD),
    }
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours, _ = load_encoder(str(out))
    theirs = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        expected = vit(x)
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(theirs(x), expected, rtol=0, atol=0)
    # timm's data config carries the normalisation the encoder was trained with.
    resolved = timm.data.resolve_data_config({}, model=theirs)
    assert resolved["mean"] == pytest.approx(MEAN) and resolved["std"] == pytest.approx(STD)


def test_fsspec_url_and_one_line_errors(tmp_path: Path, vit) -> None:
    local = save_artifact(tmp_path / "c", "centroids", {"centroids": torch.ones(2, 3)}, {"patch_size": 1})
    upload_dir(local, "memory://store/c")
    artifact = read_artifact("memory://store/c", "centroids")
    assert artifact.meta["patch_size"] == 1 and torch.equal(artifact.tensors["centroids"], torch.ones(2, 3))
    with pytest.raises(
        ArtifactError, match=r"holds kind 'centroids' format 2, expected a tokenizer; train one"
    ) as info:
        read_artifact(str(local), "tokenizer", hint="train one")
    assert "\n" not in str(info.value)
    with pytest.raises(ArtifactNotFound, match=r"nowhere: no encoder there .*; save one") as missing:
        read_artifact(str(tmp_path / "nowhere"), "encoder", hint="save one")
    assert isinstance(missing.value, FileNotFoundError) and isinstance(missing.value, ValueError)
    with pytest.raises(ArtifactNotFound, match="memory://store/none: no such directory"):
        read_artifact("memory://store/none", "encoder")


def test_downloads_say_their_size_and_time_and_log_while_they_last(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="objectives.artifacts")
    local = save_artifact(tmp_path / "c", "centroids", {"centroids": torch.ones(512, 512)}, {"patch_size": 1})
    upload_dir(local, "memory://store/big")
    read_artifact("memory://store/big", "centroids")
    size = sum(f.stat().st_size for f in local.iterdir()) / 1e6  # 1 MiB of float32 and the metadata
    (done,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("downloaded ")]
    assert done.startswith(f"downloaded memory://store/big: {size:.1f} MB in ")
    # A slow download (files landing for 0.3 s): lines with the MB so far, LINE_EVERY_S apart (0.05 s here).
    caplog.clear()
    folder = tmp_path / "landing"
    folder.mkdir()
    with DownloadLines("models:/slow/1", folder, every_s=0.05):
        for i in range(6):
            (folder / f"part{i}").write_bytes(b"x" * 200_000)
            time.sleep(0.05)
    messages = [r.getMessage() for r in caplog.records]
    so_far = [m for m in messages if m.startswith("downloading models:/slow/1: ")]
    assert len(so_far) >= 2 and all(" MB so far (" in m for m in so_far)
    assert messages[-1].startswith("downloaded models:/slow/1: 1.2 MB in ")
    with pytest.raises(ValueError, match="unknown artifact kind 'weights'"):
        save_artifact(tmp_path / "w", "weights", {}, {})


# --- directories written before the one layout (format 1) still load ------------------------


def write_format1(path: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """The first layout, as the earlier `save_teacher` / `save_tokenizer` / `save_centroids` wrote it."""
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / f"{stem}.safetensors"))
    (path / f"{stem}.json").write_text(json.dumps({"format": 1, **meta}))
    return path


def test_format1_encoder_tokenizer_and_centroids_still_load(tmp_path: Path, vit) -> None:
    teacher = write_format1(
        tmp_path / "teacher",
        "teacher",
        vit.state_dict(),
        {"arch": ARCH, "arch_kwargs": KWARGS, "mean": None, "std": None},
    )
    loaded, meta = load_encoder(str(teacher))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), vit(x), rtol=0, atol=0)
    assert meta["kind"] == "encoder" and meta["format"] == 1

    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    codebook = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    tensors = {f"backbone.vit.{k}": v for k, v in vit.state_dict().items()}
    tensors.update({f"encode_head.{k}": v for k, v in head.state_dict().items()}, codebook=codebook)
    meta = {
        "kind": "vqkd",
        "arch": ARCH,
        "arch_kwargs": KWARGS,
        "code_dim": 4,
        "num_codes": 8,
        "mean": None,
        "std": None,
    }
    tokenizer = load_tokenizer(str(write_format1(tmp_path / "tok", "tokenizer", tensors, meta)))
    assert tokenizer.num_codes == 8 and torch.equal(tokenizer.codebook, codebook)
    # Codes by hand: the frozen ViT's normed patch tokens -> head -> l2-normalise -> largest dot product.
    with torch.no_grad():
        z = torch.nn.functional.normalize(head(vit.forward_features(x)[:, 1:]), dim=-1)
    assert torch.equal(tokenizer(x), (z @ codebook.T).argmax(-1))

    centroids = torch.rand(5, 12)
    stored = load_centroids(
        str(
            write_format1(
                tmp_path / "cen",
                "centroids",
                {"centroids": centroids, "counts": torch.arange(5.0)},
                {"kind": "ccvit-centroids", "num_centroids": 5, "patch_size": 2},
            )
        )
    )
    assert torch.equal(stored.centroids, centroids) and stored.counts.tolist() == [0, 1, 2, 3, 4]
    assert stored.meta["patch_size"] == 2
