"""The contrastive, centroid, autoregressive and rotation objectives end to end: real Ray Train +
DeepSpeed + MLflow, 2 CPU workers, a few steps each, spread over ZeRO stages, precisions,
optimizers and backbone families (the contrastive ones on a ResNet and a ConvNeXt at ZeRO-3,
RotNet on a Swin with SGD; the exported encoder loads strictly into timm and is evaluated on its
pooled features). ZeRO-1 runs in tests/e2e/test_pipeline.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pretrain.run import main

pytestmark = pytest.mark.slow

CASES = {
    # objective: (model, ZeRO stage, precision, overrides that size it for the tiny model)
    # On a ResNet (BatchNorm over both workers' batches): the momentum encoder, running
    # statistics included, is updated from parameters that ZeRO-3 partitions.
    "mocov3": ("resnet18", 3, "fp32", ["objective.dim=16", "objective.mlp_dim=32"]),
    # On a ConvNeXt: pooled features + the head's LayerNorm, ZeRO-3 partitioned.
    "simclr": ("convnext_atto", 3, "fp32", ["objective.proj_dim=16"]),
    # k-means centroids built in prepare() from the stream, exported and registered at the end.
    "ccvit": ("vit_nano", 2, "bf16", ["objective.num_centroids=32", "objective.kmeans_samples=2048"]),
    # Order from the EMA encoder, kept in fp32 buffers and updated from ZeRO-3-partitioned
    # parameters; with gradient accumulation (bf16 + accumulation + ZeRO-3 in one engine); the
    # encoder gathered at step 2 for an evaluation task beside training.
    "semaim": ("vit_nano", 3, "bf16", ["objective.order_source=ema", "trainer.grad_accum=2", "eval.every_steps=2"]),
    # On a Swin (its own CPU size): the rotation head's BatchNorm over both workers' copies; SGD
    # with Nesterov momentum (the paper's optimizer) under ZeRO-2 partitions.
    "rotnet": ("swin_nano", 2, "fp32", ["optim.name=sgd", "optim.nesterov=true", "optim.base_lr=0.05"]),
}


# Pictures each objective logs at the end (drawn on every rank: ZeRO-2/3 included).
PICTURES = {
    "mocov3": [],
    "simclr": [],
    "ccvit": ["centroid_ids", "centroid_usage"],
    "semaim": ["semantic_order"],
    "rotnet": ["rotnet_predictions", "rotnet_confusion"],
}


@pytest.fixture(autouse=True)
def copied_store(empty_mlflow_store, tmp_path: Path) -> str:
    """The sqlite store these runs' default tracking URI names (beside their storage path),
    copied from the session's: a store MLflow creates runs its migrations, 2.1-2.4 cpu-s on the
    2-core VM, on the path of a run whose Ray is already up. The other end-to-end files' runs
    create their stores, as a user's first run does."""
    return empty_mlflow_store((tmp_path / "mlflow.db").resolve())


@pytest.mark.parametrize("objective", sorted(CASES))
def test_objective_runs_end_to_end(objective: str, ray_local: None, runs, tmp_path: Path, copied_store: str) -> None:
    model, stage, precision, overrides = CASES[objective]
    common = [a for a in runs.tiny if not a.startswith(("objective.", "model."))] + (
        [a for a in runs.tiny if a.startswith("model.")] if model == "vit_nano" else []
    )
    rc = main(
        [
            *common,
            f"model={model}",
            f"objective={objective}",
            *overrides,
            f"deepspeed.zero_stage={stage}",
            f"deepspeed.precision={precision}",
            # bf16 is checked for correctness here, tiny, also on hosts that only emulate it.
            "deepspeed.force_precision=true",
            "trainer.max_steps=3",
            "trainer.checkpoint_every=3",
            "trainer.pictures_every=2",  # pictures over time: at step 2, then at the end (3)
            f"trainer.storage_path={tmp_path}",
            f"name={objective}",
        ]
    )
    assert rc == 0
    record = runs.record(tmp_path, objective)
    assert record["tracking_uri"] == copied_store
    losses = [v for _, v in runs.history(record, "loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)

    from mlflow import MlflowClient

    run = MlflowClient(record["tracking_uri"]).get_run(record["mlflow_run_id"])
    own = [k for k in run.data.metrics if k.startswith(f"{objective}/")]
    assert own, f"no {objective}/ metrics logged"
    # Evaluated against a random-init baseline, then registered as <objective>-<model>.
    assert run.data.tags["pretrain.export.encoder"] == f"models:/{objective}-{model}/1"
    for key in ("eval/knn_top1", "eval/linear_top1", "eval/baseline_knn_top1", "eval/baseline_linear_top1"):
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
        # Evaluated at the end, and beside training where eval.every_steps asks (the same baseline).
        assert [s for s, _ in runs.history(record, key)] == ([2, 3] if objective == "semaim" else [3]), key
    # ZeRO 2 and 3 partition the optimizer state: one file per rank in the checkpoint.
    state = tmp_path / objective / "checkpoint_00000003" / "state"
    assert len(list(state.glob("*optim_states.pt"))) == 2, sorted(p.name for p in state.iterdir())
    pictures = {a.path for a in MlflowClient(record["tracking_uri"]).list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {f"pictures/{name}.png" for name in PICTURES[objective]}
    # The same kept batch drawn at steps 2 and 3, as MLflow image series (images/<key>+step+<n>+...).
    series = {a.path for a in MlflowClient(record["tracking_uri"]).list_artifacts(run.info.run_id, "images")}
    steps = {(p.split("/")[1].split("+step+")[0], int(p.split("+step+")[1].split("+")[0])) for p in series}
    assert steps == {(f"pictures~{name}", n) for name in PICTURES[objective] for n in (2, 3)}
    if objective == "ccvit":
        assert run.data.tags["pretrain.export.centroids"].startswith("models:/ccvit-centroids-32x4/")
        assert (tmp_path / objective / "export" / "centroids").is_dir()


def killed_in_step_5_and_restarted(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, sizes: list[str]):
    """`objective=<name>` at ZeRO-3, 5 steps, checkpoints every 3, killed in step 5: Ray Train restarts it from
    the step-3 checkpoint; the redone step 4 must repeat the first attempt's loss (everything the step reads,
    EMA copies and random draws included, came back exactly). Returns (record, MLflow client, MLflow run)."""
    from mlflow import MlflowClient

    from pretrain.trainer.faults import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "5:kill:1")
    rc = main(
        [
            *[a for a in runs.tiny if not a.startswith("objective.")],
            f"objective={name}",
            *sizes,
            "deepspeed.zero_stage=3",
            "trainer.max_steps=5",
            "trainer.checkpoint_every=3",
            "trainer.deterministic=true",
            "trainer.max_failures=1",
            f"trainer.storage_path={tmp_path}",
            f"name={name}",
        ]
    )
    assert rc == 0
    record = runs.record(tmp_path, name)
    losses = runs.history(record, "loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 4, 5]
    (first, again) = [v for s, v in losses if s == 4]
    assert again == pytest.approx(first, rel=1e-6)
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["mlflow_run_id"])
    assert run.data.tags["pretrain.resumed_at_step"] == "3"
    return record, client, run


def test_dmtjepa_at_zero3_restarts_exactly_with_its_ema_target_and_head(
    ray_local: None, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DMT-JEPA, the I-JEPA family's fullest member (multi-block masks from the loader workers, an EMA target
    encoder and an EMA aggregation head held in float32 buffers outside ZeRO-3's partitions) killed in
    step 5: Ray Train restarts it from the step-3 checkpoint and the redone step 4 has the loss of the
    first attempt's (target encoder and head came back exactly)."""
    record, client, run = killed_in_step_5_and_restarted(
        runs, tmp_path, monkeypatch, "dmtjepa", ["objective.predictor_embed_dim=16", "objective.predictor_depth=1"]
    )
    momenta = dict(runs.history(record, "dmtjepa/momentum"))
    # Read in each step's forward, before that step's update: m(step - 2) for step >= 2, linear to 1 over 5 steps.
    assert [momenta[s] for s in (1, 2, 5)] == pytest.approx([0.996, 0.996, 0.996 + 0.004 * 3 / 5], abs=1e-6)
    # Exported with its representation (the mean of the patch tokens), evaluated on it.
    meta = json.loads((tmp_path / "dmtjepa" / "export" / "encoder" / "pretrain.json").read_text())
    assert meta["features"] == "mean"
    assert 0.0 <= run.data.metrics["eval/knn_top1"] <= 1.0
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {"pictures/dmtjepa_blocks.png", "pictures/dmtjepa_neighbours.png"}
    similarity = runs.history(record, "dmtjepa/neighbour_similarity")
    assert similarity and all(0.0 < v <= 1.0 for _, v in similarity)


def test_ibot_at_zero3_with_local_crops_restarts_exactly(
    ray_local: None, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """iBOT (2 global crops with a block mask each and 2 smaller local crops from the loader workers; an EMA
    teacher and two centres in buffers outside ZeRO-3's partitions) killed in step 5 and restarted from the
    step-3 checkpoint: the redone step 4 repeats the first attempt's loss, so teacher, centres and the
    photometric draws came back exactly."""
    sizes = ["objective.out_dim=64", "objective.patch_out_dim=64", "objective.head_hidden_dim=32"]
    sizes += ["objective.head_bottleneck_dim=16", "objective.local_views=2", "objective.local_size=16"]
    record, client, run = killed_in_step_5_and_restarted(
        runs, tmp_path, monkeypatch, "ibot", [*sizes, "eval.enabled=false"]
    )
    ratios = [v for _, v in runs.history(record, "ibot/mask_ratio")]
    assert all(0.2 < r < 0.4 for r in ratios)  # block masks of 30% on the global crops
    assert all(math.isfinite(v) for _, v in runs.history(record, "ibot/patch"))
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {"pictures/dino_attention.png"}
