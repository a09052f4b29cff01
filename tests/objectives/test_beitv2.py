"""BEiT v2 MIM stage and the exported VQ-KD tokenizer it learns from (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from data.masks import block_patch_mask
from objectives.artifacts import save_encoder
from objectives.base import MaskSpec, RunContext
from objectives.beitv2 import BEiTv2, masked_targets
from objectives.components.tokenizer import VQTokenizer, load_tokenizer
from objectives.configs import BEiTv2Config, TeacherConfig, VQKDConfig
from objectives.vqkd import VQKD
from pretrain.backbone import arch_kwargs, build_backbone
from pretrain.config import ModelConfig
from pretrain.model_registry import log_model_dir

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}
MODEL = ModelConfig(arch=ARCH, **TINY)
GRID, PATCH, N = 4, 8, 16
NUM_CODES = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def vqkd(tmp_path_factory: pytest.TempPathFactory) -> VQKD:
    """A VQ-KD objective a few steps into training (codebook k-means-initialised and EMA-updated)."""
    torch.manual_seed(0)
    teacher = timm.create_model(ARCH, num_classes=0, **{**TINY, "depth": 2})
    tdir = save_encoder(teacher, tmp_path_factory.mktemp("teacher") / "t", ARCH, {**TINY, "depth": 2, "num_classes": 0})
    cfg = VQKDConfig(
        teacher=TeacherConfig(source=str(tdir)),
        num_codes=NUM_CODES,
        code_dim=8,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    context = RunContext(input_mean=MEAN, input_std=STD, arch=ARCH, arch_kwargs=arch_kwargs(MODEL))
    torch.manual_seed(1)
    model = VQKD(cfg, build_backbone(MODEL), context)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        out = model({"views": [images(8, step)]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def block_masks(batch: int, seed: int, ratio: float = 0.375) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([block_patch_mask((GRID, GRID), gen, ratio=ratio) for _ in range(batch)])


@pytest.fixture(scope="module")
def exported(vqkd: VQKD, tmp_path_factory: pytest.TempPathFactory) -> Path:
    items = {item.name: item for item in vqkd.export(tmp_path_factory.mktemp("export"))}
    assert set(items) == {"encoder", "tokenizer"}
    assert items["tokenizer"].registered_name == "vqkd-t"  # vqkd-<teacher directory name>
    return items["tokenizer"].path


def make(tokenizer: VQTokenizer, **overrides: object) -> BEiTv2:
    torch.manual_seed(2)
    cfg = BEiTv2Config(tokenizer="<given>", mask_ratio=0.375, **overrides)
    context = RunContext(input_mean=MEAN, input_std=STD, inputs={"tokenizer": tokenizer})
    return BEiTv2(cfg, build_backbone(MODEL), context)


# --- the exported tokenizer ------------------------------------------------------


def test_exported_tokenizer_gives_the_training_runs_codes(vqkd: VQKD, exported: Path) -> None:
    meta = json.loads((exported / "pretrain.json").read_text())
    assert meta["kind"] == "tokenizer" and meta["num_codes"] == NUM_CODES and meta["arch"] == ARCH
    x = images(6, 10)
    tokenizer = load_tokenizer(str(exported), input_mean=MEAN, input_std=STD)
    assert not tokenizer.renormalize  # same normalisation as the tokenizer's training data
    assert torch.equal(tokenizer(x), vqkd.codes(x))
    # The tokenizer equals a nearest-codebook search written out by hand.
    z = F.normalize(vqkd.encode(x).float(), dim=-1)  # (B, N, d)
    dists = ((z.unsqueeze(2) - vqkd.quantizer.codebook.view(1, 1, NUM_CODES, -1)) ** 2).sum(-1)  # (B, N, K)
    assert torch.equal(tokenizer(x), dists.argmin(-1))
    assert not any(p.requires_grad for p in tokenizer.parameters())


def test_tokenizer_renormalises_other_data_statistics(vqkd: VQKD, exported: Path) -> None:
    other_mean, other_std = (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)
    x = images(4, 11)
    tokenizer = load_tokenizer(str(exported), input_mean=other_mean, input_std=other_std)
    view = (1, 3, 1, 1)
    pixels = x * torch.tensor(other_std).view(view) + torch.tensor(other_mean).view(view)
    as_tokenizer = (pixels - torch.tensor(MEAN).view(view)) / torch.tensor(STD).view(view)
    assert torch.equal(tokenizer(x), vqkd.codes(as_tokenizer))


def test_tokenizer_from_the_mlflow_registry(
    vqkd: VQKD, exported: Path, tmp_path: Path, monkeypatch, empty_mlflow_store
) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = empty_mlflow_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("tok", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    kwargs = {"run_id": run_id, "tracking_uri": uri, "name": "tokenizer", "model_type": "pretrain.tokenizer"}
    assert log_model_dir(exported, registered_name="vqkd-t", **kwargs) == "models:/vqkd-t/1"
    assert log_model_dir(exported, registered_name="vqkd-t", **kwargs) == "models:/vqkd-t/2"
    x = images(3, 12)
    for source in ("models:/vqkd-t/latest", "models:/vqkd-t/1", f"runs:/{run_id}/tokenizer"):
        assert torch.equal(load_tokenizer(source, tracking_uri=uri, input_mean=MEAN, input_std=STD)(x), vqkd.codes(x))
    with pytest.raises(FileNotFoundError, match="objective=vqkd"):
        load_tokenizer("models:/no-such-tokenizer/latest", tracking_uri=uri)


def test_missing_tokenizer_says_how_to_train_one(tmp_path: Path) -> None:
    (problem,) = BEiTv2Config().problems()
    assert problem[0] == "objective.tokenizer"
    assert "stage:vqkd" in problem[1] and "python -m pretrain.run objective=vqkd" in problem[1]
    assert BEiTv2Config(tokenizer="stage:vqkd").problems() == []
    with pytest.raises(FileNotFoundError, match="python -m pretrain.run objective=vqkd"):
        load_tokenizer(str(tmp_path / "nothing-here"))
    assert {k for k, _ in BEiTv2Config(tokenizer="s3://b/t", mask_ratio=1.0, early_layers=0).problems()} == {
        "objective.tokenizer",
        "objective.mask_ratio",
        "objective.early_layers",
    }


# --- the BEiT v2 objective -------------------------------------------------------


class RewrittenTokenizer(torch.nn.Module):
    """A real tokenizer whose codes at the unmasked positions of `mask` are overwritten."""

    def __init__(self, inner: VQTokenizer, mask: torch.Tensor, seed: int) -> None:
        super().__init__()
        self.inner, self.mask, self.seed = inner, mask, seed
        self.num_codes, self.grid_size, self.source = inner.num_codes, inner.grid_size, "rewritten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.inner(x)
        noise = torch.randint(NUM_CODES, codes.shape, generator=torch.Generator().manual_seed(self.seed))
        return torch.where(self.mask, codes, noise)


def test_data_needs_the_papers_block_mask() -> None:
    needs = BEiTv2.data_needs(BEiTv2Config(tokenizer="x"))
    assert needs.views == 1 and needs.mask == MaskSpec("block", 0.3827)
    assert round(196 * needs.mask.ratio) == 75  # 75 of 196 patches


def test_targets_are_the_tokenizers_codes_at_masked_positions_only(exported: Path) -> None:
    tokenizer = load_tokenizer(str(exported), input_mean=MEAN, input_std=STD)
    x, mask = images(4, 20), block_masks(4, 21)
    codes = tokenizer(x)
    by_hand = [int(codes[b, i]) for b in range(4) for i in range(N) if mask[b, i]]
    assert masked_targets(codes, mask).tolist() == by_hand

    model = make(tokenizer)
    final, agg = model.logits(x, mask)
    labels = torch.tensor(by_hand)
    expected = F.cross_entropy(final, labels) + F.cross_entropy(agg, labels)
    out = model({"views": [x], "mask": mask})
    torch.testing.assert_close(out.loss, expected)
    # Rewriting the tokenizer's codes at unmasked positions leaves the loss bit-identical.
    for seed in (1, 2):
        other = make(RewrittenTokenizer(tokenizer, mask, seed))  # type: ignore[arg-type]
        assert torch.equal(other({"views": [x], "mask": mask}).loss, out.loss)
    # ... while a code changed at one masked position changes it.
    flipped = mask.clone()
    b, i = map(int, mask.nonzero()[0])
    flipped[b, i] = False
    changed = make(RewrittenTokenizer(tokenizer, flipped, 3))  # type: ignore[arg-type]
    assert not torch.equal(changed({"views": [x], "mask": mask}).loss, out.loss)


def test_masked_pixels_are_invisible_to_the_encoder(exported: Path) -> None:
    model = make(load_tokenizer(str(exported), input_mean=MEAN, input_std=STD))
    x, mask = images(2, 30), block_masks(2, 31)
    noisy = x.clone()
    for b in range(2):
        for i in range(N):
            if mask[b, i]:
                row, col = divmod(i, GRID)
                noisy[b, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] += 5.0
    for a, b in zip(model.logits(x, mask), model.logits(noisy, mask), strict=True):
        assert torch.equal(a, b)


def test_aggregation_branch_by_hand(exported: Path) -> None:
    """CLS of the last block + patch tokens of block depth-3 -> 2 blocks -> shared norm -> shared head."""
    model = make(load_tokenizer(str(exported), input_mean=MEAN, input_std=STD))
    assert model.early_layers == 1  # depth 4 - 3
    vit = model.backbone.vit
    x, mask = images(2, 40), block_masks(2, 41)
    tokens = vit.patch_embed(x)
    w = mask.unsqueeze(-1).float()
    tokens = tokens * (1 - w) + model.mask_token * w
    h = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], 1) + vit.pos_embed
    states = []
    for block in vit.blocks:
        h = block(h)
        states.append(h)
    agg = torch.cat([states[-1][:, :1], states[0][:, 1:]], 1)
    for block in model.aggregation_blocks:
        agg = block(agg)
    expected_agg = model.lm_head(vit.norm(agg)[:, 1:][mask])
    expected_final = model.lm_head(vit.norm(states[-1])[:, 1:][mask])
    final, aggregated = model.logits(x, mask)
    torch.testing.assert_close(final, expected_final)
    torch.testing.assert_close(aggregated, expected_agg)


def test_tokenizer_is_frozen_and_loss_falls(exported: Path) -> None:
    tokenizer = load_tokenizer(str(exported), input_mean=MEAN, input_std=STD)
    model = make(tokenizer)
    assert not any(k.startswith("tokenizer") or "codebook" in k for k in model.state_dict())
    before = {k: v.clone() for k, v in tokenizer.state_dict().items()}
    x, mask = images(8, 50), block_masks(8, 51)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(40):
        out = model({"views": [x], "mask": mask})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(v, before[k]) for k, v in tokenizer.state_dict().items())
    assert float(out.metrics["beitv2/mim_acc"]) > 0.5
    assert float(out.metrics["beitv2/mask_ratio"]) == pytest.approx(0.375)


def test_grid_mismatch_is_one_line(exported: Path) -> None:
    tokenizer = load_tokenizer(str(exported))
    with pytest.raises(ValueError, match="patch grid"):
        BEiTv2(
            BEiTv2Config(tokenizer="x"),
            build_backbone(ModelConfig(arch=ARCH, **{**TINY, "patch_size": 4})),
            RunContext(inputs={"tokenizer": tokenizer}),
        )
