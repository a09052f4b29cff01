"""Teacher loading: features equal a hand-run of the timm model, from a file and through MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from objectives.artifacts import fetch, save_encoder
from objectives.base import Objective
from objectives.components.teacher import load_teacher
from objectives.configs import TeacherConfig
from pretrain.model_registry import log_teacher

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 0}


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, **KWARGS).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def by_hand(vit: torch.nn.Module, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Tokens (B, 1 + N, D): patch embed + CLS + positions, blocks 0..layer, final norm only for -1."""
    with torch.no_grad():
        x = vit.patch_embed(images)  # (B, N, D)
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
        for block in vit.blocks if layer == -1 else vit.blocks[: layer + 1]:
            x = block(x)
        return vit.norm(x) if layer == -1 else x


@pytest.mark.parametrize("layer", [-1, 0])
def test_local_safetensors_matches_hand_run(tmp_path: Path, vit, images, layer: int) -> None:
    save_encoder(vit, tmp_path / "t", ARCH, KWARGS)
    teacher = load_teacher(
        TeacherConfig(source=str(tmp_path / "t" / "model.safetensors"), layer=layer, return_cls=True)
    )
    out = teacher(images)
    expected = by_hand(vit, images, layer)
    assert out.patches.shape == (3, 16, 32) and teacher.num_patches == 16 and teacher.grid_size == (4, 4)
    assert teacher.feature_dim == 32 and teacher.patch_size == 8
    torch.testing.assert_close(out.patches, expected[:, 1:])
    torch.testing.assert_close(out.cls, expected[:, 0])
    if layer == -1:  # and timm's own path agrees
        torch.testing.assert_close(out.patches, vit.forward_features(images)[:, 1:])


def test_pt_state_dict_with_arch_from_config(tmp_path: Path, vit, images) -> None:
    torch.save({"model": vit.state_dict()}, tmp_path / "w.pt")
    cfg = TeacherConfig(source=str(tmp_path / "w.pt"), arch=ARCH, arch_kwargs=KWARGS, layer=1)
    torch.testing.assert_close(load_teacher(cfg)(images).patches, by_hand(vit, images, 1)[:, 1:])


def test_mlflow_registered_and_runs_uri(tmp_path: Path, monkeypatch, vit, images, empty_mlflow_store) -> None:
    import mlflow

    uri = empty_mlflow_store(tmp_path / "mlflow.db")
    # No MLFLOW_TRACKING_URI in the environment: every call gets the store explicitly.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(uri, uri)
    exp = client.create_experiment("teachers", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    model_uri = log_teacher(vit, ARCH, KWARGS, run_id=run_id, tracking_uri=uri, registered_name="tiny-teacher")
    assert model_uri == "models:/tiny-teacher/1"
    client.set_registered_model_alias("tiny-teacher", "best", "1")
    expected = by_hand(vit, images, -1)[:, 1:]
    for source in (model_uri, "models:/tiny-teacher/latest", "models:/tiny-teacher@best", f"runs:/{run_id}/teacher"):
        teacher = load_teacher(TeacherConfig(source=source), tracking_uri=uri)
        torch.testing.assert_close(teacher(images).patches, expected)
    # The logged files are the plain layout: no MLmodel, no pickle.
    files = fetch(model_uri, tmp_path / "dl", tracking_uri=uri)
    assert sorted(os.listdir(files)) == ["config.json", "model.safetensors", "pretrain.json"]


def test_frozen_and_kept_out_of_objective_parameters(tmp_path: Path, vit, images) -> None:
    save_encoder(vit, tmp_path, ARCH, KWARGS)
    teacher = load_teacher(TeacherConfig(source=str(tmp_path)))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    holder = Objective(cfg=None, backbone=torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    holder.attach_frozen("teacher", teacher)
    assert holder.frozen_modules()["teacher"] is teacher
    assert sum(p.numel() for p in holder.parameters()) == 6  # the Linear's weight + bias only
    assert not any(k.startswith("teacher") or "vit" in k for k in holder.state_dict())
    out = teacher(images.requires_grad_(False))
    assert not out.patches.requires_grad


def test_layer_norm_targets(tmp_path: Path, vit, images) -> None:
    save_encoder(vit, tmp_path, ARCH, KWARGS)
    out = load_teacher(TeacherConfig(source=str(tmp_path), layer=0, normalize="layer_norm"))(images)
    raw = by_hand(vit, images, 0)[:, 1:]
    mean, var = out.patches.mean(-1), out.patches.var(-1, unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(var, torch.ones_like(var), atol=1e-3, rtol=0)  # eps 1e-5 / var
    expected = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(out.patches, expected)


def test_renormalises_inputs_and_resamples_positions(tmp_path: Path, vit, images) -> None:
    data_mean, data_std, t_mean, t_std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    save_encoder(vit, tmp_path, ARCH, KWARGS, mean=t_mean, std=t_std)
    teacher = load_teacher(TeacherConfig(source=str(tmp_path)), input_mean=data_mean, input_std=data_std)
    view = (1, 3, 1, 1)
    pixels = images * torch.tensor(data_std).view(view) + torch.tensor(data_mean).view(view)
    as_teacher = (pixels - torch.tensor(t_mean).view(view)) / torch.tensor(t_std).view(view)
    torch.testing.assert_close(teacher(images).patches, by_hand(vit, as_teacher, -1)[:, 1:])
    big = load_teacher(TeacherConfig(source=str(tmp_path)), img_size=48)
    assert big.grid_size == (6, 6) and big(torch.randn(2, 3, 48, 48)).patches.shape == (2, 36, 32)


class Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": Boom(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused"):
        load_teacher(TeacherConfig(source=str(tmp_path / "evil.pt"), arch=ARCH, arch_kwargs=KWARGS))
    assert not marker.exists()


def test_one_line_errors(tmp_path: Path, vit) -> None:
    save_encoder(vit, tmp_path / "t", ARCH, KWARGS)
    cases = [
        (TeacherConfig(source="s3://bucket/t.safetensors"), ValueError, "unknown scheme"),
        (TeacherConfig(source=str(tmp_path / "nope.safetensors")), FileNotFoundError, "no such file"),
        (TeacherConfig(source=str(tmp_path / "t"), layer=2), ValueError, r"layer 2 out of range.*0\.\.1"),
        (TeacherConfig(source=str(tmp_path / "t"), arch="vit_small_patch16_224"), ValueError, "file says"),
        (
            TeacherConfig(source=str(tmp_path / "t"), arch_kwargs={"depth": 3}),
            ValueError,
            r"do not fit arch 'vit_tiny_patch16_224'.*12 missing, 0 unexpected",
        ),
        (TeacherConfig(source="timm:no_such_model"), ValueError, "unknown timm model"),
    ]
    for cfg, kind, pattern in cases:
        with pytest.raises(kind, match=pattern) as info:
            load_teacher(cfg)
        assert "\n" not in str(info.value)
    torch.save(vit.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="set objective.teacher.arch"):
        load_teacher(TeacherConfig(source=str(tmp_path / "bare.pt")))


def test_config_problems_need_no_torch() -> None:
    assert TeacherConfig().problems() == []
    bad = TeacherConfig(source="gs://x", layer=-2, normalize="batch", project=True)
    keys = [key for key, _ in bad.problems()]
    assert keys == [
        "objective.teacher.source",
        "objective.teacher.layer",
        "objective.teacher.normalize",
        "objective.teacher.project",
    ]


def test_project_applies_head_to_every_final_token(tmp_path: Path, images) -> None:
    torch.manual_seed(2)
    kwargs = {**KWARGS, "num_classes": 8}  # a CLIP-style projection head to 8 dims
    clip_like = timm.create_model(ARCH, **kwargs).eval()
    save_encoder(clip_like, tmp_path, ARCH, kwargs)
    teacher = load_teacher(TeacherConfig(source=str(tmp_path), project=True))
    expected = by_hand(clip_like, images, -1)[:, 1:] @ clip_like.head.weight.T + clip_like.head.bias
    assert teacher.feature_dim == 8
    torch.testing.assert_close(teacher(images).patches, expected)


# --- non-ViT teachers: one feature map, its cells as patches ----------------------------------

SWIN = {
    "img_size": 32,
    "patch_size": 4,
    "window_size": 2,
    "embed_dim": 16,
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 1, 1, 1),
}


def resnet_by_hand(model: torch.nn.Module, x: torch.Tensor, upto: str) -> torch.Tensor:
    """The stem, then the residual stages up to `upto`: (B, C, h, w)."""
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, name)(x)
            if name == upto:
                return x
    raise AssertionError(upto)


@pytest.mark.parametrize(
    ("arch", "kwargs", "layer", "stride", "dim"),
    [
        ("resnet18", {}, 3, 16, 256),  # layer3 (feature_info: act1, layer1..4)
        ("resnet18", {}, -1, 32, 512),
        ("convnext_atto", {}, -1, 32, 320),
        ("swin_tiny_patch4_window7_224", SWIN, 1, 8, 32),
    ],
    ids=["resnet-stage3", "resnet-final", "convnext-final", "swin-stage1"],
)
def test_a_cnn_or_swin_teacher_gives_one_feature_map_as_tokens(
    tmp_path: Path, arch: str, kwargs: dict, layer: int, stride: int, dim: int
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=0, **kwargs).eval()
    with torch.no_grad():  # BatchNorm running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_encoder(model, tmp_path / "t", arch, {**kwargs, "num_classes": 0})
    size = kwargs.get("img_size", 64)  # convolutional teachers take any size; Swin at its own here
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    teacher = load_teacher(TeacherConfig(source=str(tmp_path / "t"), layer=layer), img_size=size)
    out = teacher(x)
    side = size // stride
    assert teacher.patch_size == stride and teacher.grid_size == (side, side) and teacher.feature_dim == dim
    assert out.patches.shape == (2, side * side, dim) and out.cls is None
    if arch == "resnet18":
        fmap = resnet_by_hand(model, x, "layer3" if layer == 3 else "layer4")
    elif arch == "convnext_atto":
        with torch.no_grad():
            fmap = model.forward_features(x)  # stem + stages + norm_pre, before the head's pooling
    else:
        with torch.no_grad():  # patch embedding and the first two stages, NHWC in timm's Swin
            fmap = model.layers[1](model.layers[0](model.patch_embed(x))).permute(0, 3, 1, 2)
    # Row-major cells, as a ViT numbers its patches: token i*w + j is cell (i, j).
    torch.testing.assert_close(out.patches, fmap.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.patches[:, side + 1], fmap[:, :, 1, 1])


def test_a_cnn_teacher_on_a_vit_student_needs_the_matching_stride(tmp_path: Path) -> None:
    """MaskDistill of a ViT with 8-pixel patches from a ResNet: stride 8 is feature 2 (layer2)."""
    from objectives.configs import MaskDistillConfig
    from objectives.maskdistill import MaskDistill
    from pretrain.backbone import build_backbone
    from pretrain.config import ModelConfig

    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=0).eval()
    save_encoder(resnet, tmp_path, "resnet18", {"num_classes": 0})
    student = ModelConfig(arch=ARCH, **{k: v for k, v in KWARGS.items() if k != "num_classes"})
    with pytest.raises(ValueError, match=r"\(1, 1\) \(stride 32\).*\(4, 4\); set objective.teacher.layer=2") as info:
        MaskDistill(MaskDistillConfig(teacher=TeacherConfig(source=str(tmp_path))), build_backbone(student))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"layer 5 out of range.*strides \[2, 4, 8, 16, 32\]\) 0\.\.4"):
        load_teacher(TeacherConfig(source=str(tmp_path), layer=5), img_size=32)
    with pytest.raises(ValueError, match="return_cls=True but the model has no class token"):
        load_teacher(TeacherConfig(source=str(tmp_path), return_cls=True), img_size=32)
    md = MaskDistill(
        MaskDistillConfig(teacher=TeacherConfig(source=str(tmp_path), layer=2, normalize="layer_norm")),
        build_backbone(student),
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    out = md({"views": [x], "mask": mask})
    assert md.head.out_features == 128 and torch.isfinite(out.loss)
    target = torch.nn.functional.layer_norm(resnet_by_hand(resnet, x, "layer2").flatten(2).transpose(1, 2), (128,))
    torch.testing.assert_close(md.frozen_modules()["teacher"](x).patches, target)
