"""Pipelines of stages: the plan, per-stage settings, and resolution against a real MLflow registry (sqlite)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data.config import DataConfig
from pretrain.compose import ConfigError, expand_overrides, load_config
from pretrain.pipeline import build_plan, compose_stage, plan_lines
from pretrain.resolve import DATA_KEY_TAG, STAGE_KEY_TAG, Want, data_key, find_version, stage_key

EMBEDDED = data_key(DataConfig())  # what versions trained on the embedded default data are tagged with

REPO = Path(__file__).resolve().parents[2]
CLIP = "timm:vit_base_patch16_clip_224.openai"


def plan_for(overrides: list[str]):  # noqa: ANN201 - a Plan
    expanded = expand_overrides(overrides)
    return build_plan(load_config(expanded), expanded)


def run_main(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`pretrain.run.main(args)` in a fresh interpreter; prints whether Ray got imported."""
    code = (
        "import sys; from pretrain.run import main; rc = main(sys.argv[1:]); "
        "print('ray imported:', 'ray' in sys.modules); sys.exit(rc)"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)


# --- the plan -------------------------------------------------------------------------


def test_dry_run_prints_the_chain_and_starts_nothing(tmp_path: Path) -> None:
    done = run_main(["objective=beitv2", "pipeline.dry_run=true", "stages.mae.trainer.max_steps=7"], tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "== pretrain plan: beitv2, 3 stage(s) =="
    stages = [line.split()[:3] for line in out if line[:1].isdigit()]
    assert stages == [["1.", "mae", "train"], ["2.", "vqkd", "train"], ["3.", "beitv2", "train"]]
    assert "1. mae          train  7 steps" in out[1]  # the per-stage setting; the others keep 300
    text = "\n".join(out)
    # The CPU preset's teacher, said so, with the paper's alternative.
    assert "teacher <- stage 1 (mae, trained here)" in text
    assert (
        f"stage:mae: the CPU preset (pretrain/conf/preset/vqkd_cpu.yaml); preset=none uses the paper's {CLIP}" in text
    )
    assert "registers vqkd-vit_nano (encoder), vqkd-mae-vit_nano (tokenizer)" in text
    assert "registers beitv2-vit_nano (encoder)" in text
    assert "ray imported: False" in text
    # An empty registry is not created by asking it.
    assert not (tmp_path / "runs").exists()


def test_paper_recipe_takes_the_papers_teacher_as_given() -> None:
    plan = plan_for(["objective=vqkd", "preset=none"])
    assert [s.objective for s in plan.stages] == ["vqkd"]
    (teacher,) = plan.final.inputs
    assert (teacher.how, teacher.uri) == ("given", CLIP)
    assert teacher.why == "the paper recipe (pretrain/conf/objective/vqkd.yaml)"
    # The paper recipe of BEiT v2: its tokenizer stage distils CLIP, no MAE stage.
    plan = plan_for(["objective=beitv2", "preset=none"])
    assert [s.objective for s in plan.stages] == ["vqkd", "beitv2"]
    assert plan.stages[0].inputs[0].uri == CLIP
    assert plan.stages[0].registers()["tokenizer"] == "vqkd-vit_base_patch16_clip_224.openai"


def test_explicit_input_wins(tmp_path: Path) -> None:
    plan = plan_for(["objective=beitv2", f"objective.tokenizer={tmp_path}"])
    assert [s.objective for s in plan.stages] == ["beitv2"]
    (tokenizer,) = plan.final.inputs
    assert (tokenizer.how, tokenizer.uri, tokenizer.why) == ("given", str(tmp_path), "given on the command line")
    plan = plan_for(["objective=maskdistill", "stages.mae.trainer.max_steps=5", "objective.teacher.source=models:/t/3"])
    assert any("given on the command line" in line for line in plan_lines(plan))


def test_resolve_never_is_the_one_line_error_of_today(tmp_path: Path) -> None:
    done = run_main(["objective=beitv2", "pipeline.resolve=never"], tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: objective.tokenizer: required: a VQ-KD tokenizer")
    assert line.endswith("(pipeline.resolve=never leaves stage:vqkd unresolved)")
    with pytest.raises(ConfigError, match=r"^objective.teacher.source: stage:nope does not produce an encoder; stages"):
        load_config(["objective=maskdistill", "objective.teacher.source=stage:nope"])
    with pytest.raises(ConfigError, match=r"^objective.tokenizer: stage:mae does not produce a tokenizer; .*: vqkd$"):
        load_config(["objective=beitv2", "objective.tokenizer=stage:mae"])


def test_stage_settings_are_per_stage_and_the_rest_is_shared() -> None:
    args = [
        "objective=maskdistill",
        "trainer.max_steps=5",
        "objective.mask_ratio=0.5",
        "optim.base_lr=0.5",
        "name=mine",
        "tracking.registered_model=mine",
        "stages.mae.trainer.batch_size=4",
        "stages.mae.model=vit_tiny",
    ]
    expanded = expand_overrides(args)
    root = load_config(expanded)
    mae = compose_stage("mae", expanded, OmegaConf.to_container(root.stages))
    assert mae.cfg.trainer.max_steps == 5  # shared
    assert mae.cfg.trainer.batch_size == 4 and mae.cfg.model.name == "vit_tiny"  # its own
    assert mae.cfg.objective.mask_ratio == 0.75  # the final stage's objective.* stays there
    # Not the final stage's optim; and vit_tiny's 224 px inputs are beyond the CPU preset's
    # sizes, so the stage trains the paper recipe (optim/mae.yaml), as its plan line says.
    assert mae.cfg.optim.base_lr == 1.5e-4 and mae.preset == "none"
    assert mae.cfg.name == "" and mae.cfg.tracking.registered_model == ""
    assert mae.registers() == {"encoder": "mae-vit_tiny"}
    # stages.<objective> may also size the stage asked for.
    plan = plan_for(["objective=maskdistill", "stages.maskdistill.trainer.max_steps=9", "trainer.max_steps=4"])
    assert [s.cfg.trainer.max_steps for s in plan.stages] == [4, 9]
    # Mistakes name the stage's key.
    with pytest.raises(ConfigError, match=r"^stages.mae.trainer.max_steps: must be >= 1, got -1$"):
        plan_for(["objective=maskdistill", "stages.mae.trainer.max_steps=-1"])
    with pytest.raises(ConfigError, match=r"^stages.mea: unknown objective; this run's earlier stages: mae$"):
        plan_for(["objective=maskdistill", "stages.mea.trainer.max_steps=3"])
    # A stage trained for another must see images as it does; the key named is the one set.
    # (vit_tiny's 224 px take the vqkd stage off the CPU preset: the paper's CLIP teacher, no mae stage.)
    with pytest.raises(
        ConfigError,
        match=r"^stages.vqkd.model: the vqkd stage would train at 224 px with 16 px patches, "
        r"but the beitv2 stage needs its tokenizer at 32 px with 4 px patches$",
    ):
        plan_for(["objective=beitv2", "stages.vqkd.model=vit_tiny"])
    with pytest.raises(
        ConfigError,
        match=r"^stages.mae.model: the mae stage would train at 64 px .* needs its "
        r"teacher at 32 px with 4 px patches$",
    ):
        plan_for(["objective=beitv2", "stages.mae.model.img_size=64"])
    # A stage the run does not need (its teacher given) is ignored with a warning.
    plan = plan_for(["objective=maskdistill", "stages.mae.trainer.max_steps=3", "objective.teacher.source=/t"])
    assert [s.objective for s in plan.stages] == ["maskdistill"]


def test_a_recipe_file_is_the_command_line_in_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "objective: beitv2\ntrainer:\n  max_steps: 6\n  batch_size: 8\n"
        "stages:\n  mae:\n    trainer: {max_steps: 4}\n  vqkd:\n    objective: {num_codes: 32}\n"
        "eval:\n  probe_weight_decays: [1.0e-4]\n"
    )
    expanded = expand_overrides([f"recipe={recipe}", "trainer.max_steps=8"])
    assert (
        "objective=beitv2" in expanded and "trainer.max_steps=8" in expanded and "trainer.max_steps=6" not in expanded
    )
    plan = build_plan(load_config(expanded), expanded)
    assert [(s.objective, s.cfg.trainer.max_steps) for s in plan.stages] == [("mae", 4), ("vqkd", 8), ("beitv2", 8)]
    assert plan.stages[1].cfg.objective.num_codes == 32 and plan.final.cfg.eval.probe_weight_decays == [1e-4]
    with pytest.raises(ConfigError, match=r"^recipe: no recipe 'nope'"):
        expand_overrides(["recipe=nope"])


def test_stage_key_names_what_decides_the_weights() -> None:
    def key(*args: str) -> str:
        return stage_key(OmegaConf.to_object(load_config(["objective=mae", *args])))

    base = key()
    assert base == key() and len(base) == 16
    # Same global batch (2 x 8 = 1 x 16), other storage, tracking, logging, ZeRO stage: the same stage.
    same = ["trainer.num_workers=1", "trainer.batch_size=64", "trainer.storage_path=/elsewhere", "trainer.log_every=1"]
    assert key(*same, "deepspeed.zero_stage=2", "tracking.uri=http://x:5000", "data.num_workers=3") == base
    for changed in ("trainer.max_steps=301", "objective.mask_ratio=0.5", "model.depth=3", "seed=1", "optim.base_lr=1"):
        assert key(changed) != base, changed
    assert key("data.default_train_samples=512") != base  # other data


# --- resolution against the registry --------------------------------------------------


def register(store: str, name: str, meta: dict, tags: dict[str, str] | None = None, files: bool = True) -> str:
    """A registry version whose files are a pretrain.json with `meta` (weights are not read when planning)."""
    import tempfile

    from mlflow import MlflowClient

    from pretrain.model_registry import log_model_dir

    client = MlflowClient(store, store)
    exp = client.get_experiment_by_name("stages")
    exp_id = exp.experiment_id if exp else client.create_experiment("stages", str(Path(store[10:]).parent / "art"))
    run_id = client.create_run(exp_id).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        if files:
            (Path(tmp) / "pretrain.json").write_text(json.dumps({"format": 2, **meta}))
        (Path(tmp) / "model.safetensors").write_bytes(b"not read")
        uri = log_model_dir(
            tmp,
            run_id=run_id,
            tracking_uri=store,
            name=meta.get("kind", "x"),
            model_type="t",
            registered_name=name,
            tags={DATA_KEY_TAG: EMBEDDED, **(tags or {})},
        )
    client.set_terminated(run_id)
    return uri


def encoder_meta(patch: int = 4, img: int = 32) -> dict:
    return {"kind": "encoder", "arch": "vit_tiny_patch16_224", "arch_kwargs": {"img_size": img, "patch_size": patch}}


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"


def test_incompatible_and_unloadable_versions_are_skipped_and_best_preferred(
    store: str, empty_mlflow_store, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    empty_mlflow_store(Path(store[10:]))
    assert register(store, "mae-vit_nano", encoder_meta(patch=8)) == "models:/mae-vit_nano/1"
    register(store, "mae-vit_nano", encoder_meta())  # 2: compatible
    register(store, "mae-vit_nano", encoder_meta(), files=False)  # 3: no pretrain.json
    register(store, "mae-vit_nano", {**encoder_meta(), "kind": "tokenizer"})  # 4: the wrong kind
    want = Want(kind="encoder", img_size=32, patch_size=4)
    with caplog.at_level(logging.WARNING, logger="pretrain.pipeline"):
        found = find_version(store, "mae-vit_nano", want)
    assert (found.uri, found.how, found.why) == ("models:/mae-vit_nano/2", "registry", "the newest compatible version")
    skipped = [r.getMessage() for r in caplog.records if r.name == "pretrain.pipeline"]
    assert skipped[0] == "skipping models:/mae-vit_nano/4: it is a tokenizer, this input needs encoders"
    assert skipped[1].startswith("skipping models:/mae-vit_nano/3: cannot read its pretrain.json")
    assert len(skipped) == 2  # v1 is never looked at: v2 was found first
    register(store, "mae-vit_nano", encoder_meta())  # 5: compatible, newest
    assert find_version(store, "mae-vit_nano", want).uri == "models:/mae-vit_nano/5"
    MlflowClient(store, store).set_registered_model_alias("mae-vit_nano", "best", "2")
    found = find_version(store, "mae-vit_nano", want)
    assert (found.uri, found.why) == ("models:/mae-vit_nano/2", "the `best` alias")
    # best on an incompatible version: the newest compatible one instead.
    MlflowClient(store, store).set_registered_model_alias("mae-vit_nano", "best", "1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pretrain.pipeline"):
        assert find_version(store, "mae-vit_nano", want).uri == "models:/mae-vit_nano/5"
    ours = [r.getMessage() for r in caplog.records if r.name == "pretrain.pipeline"]
    assert ours[0] == (
        "skipping models:/mae-vit_nano/1: image size 32 with 8 px patches, this run needs 32 with 4 px patches"
    )
    # The same stage (its key) wins over best; with the stage sized by the user only it counts.
    register(store, "mae-vit_nano", encoder_meta(), tags={STAGE_KEY_TAG: "k" * 16})  # 6
    keyed = Want(kind="encoder", img_size=32, patch_size=4, key="k" * 16)
    found = find_version(store, "mae-vit_nano", keyed)
    assert (found.uri, found.how) == ("models:/mae-vit_nano/6", "reused")
    other = Want(kind="encoder", img_size=32, patch_size=4, key="j" * 16, exact=True)
    assert find_version(store, "mae-vit_nano", other) is None
    # Trained on other data: never the default teacher of a run on the embedded data.
    register(store, "mae-vit_nano", encoder_meta(), tags={DATA_KEY_TAG: "abc123"})  # 7
    caplog.clear()
    on_embedded = Want(kind="encoder", img_size=32, patch_size=4, data=EMBEDDED)
    with caplog.at_level(logging.WARNING, logger="pretrain.pipeline"):
        assert find_version(store, "mae-vit_nano", on_embedded).uri == "models:/mae-vit_nano/6"
    ours = [r.getMessage() for r in caplog.records if r.name == "pretrain.pipeline"]
    assert ours[-1] == f"skipping models:/mae-vit_nano/7: trained on other data (abc123), this stage reads {EMBEDDED}"
    assert len(ours) == 2  # and v1, which holds `best` but has 8 px patches
    assert find_version(store, "no-such-model", want) is None


def test_a_tokenizer_must_come_from_the_teacher_the_recipe_asks_for(store: str, empty_mlflow_store) -> None:
    empty_mlflow_store(Path(store[10:]))
    tok = {**encoder_meta(), "kind": "tokenizer"}
    register(store, "vqkd-mae-vit_nano", {**tok, "teacher": "models:/mae-vit_nano/2"})  # 1
    register(store, "vqkd-mae-vit_nano", {**tok, "teacher": "models:/mae-vit_nano/1"})  # 2: another teacher
    want = Want(kind="tokenizer", img_size=32, patch_size=4, teacher="models:/mae-vit_nano/2")
    assert find_version(store, "vqkd-mae-vit_nano", want).uri == "models:/vqkd-mae-vit_nano/1"
    assert find_version(store, "vqkd-mae-vit_nano", Want("tokenizer", 32, 4, teacher=CLIP)) is None


def test_the_plan_takes_upstream_stages_from_the_registry(tmp_path: Path, store: str, empty_mlflow_store) -> None:
    empty_mlflow_store(Path(store[10:]))  # in tmp_path / "runs"
    storage = f"trainer.storage_path={tmp_path / 'runs'}"
    register(store, "mae-vit_nano", encoder_meta(patch=8))
    register(store, "mae-vit_nano", encoder_meta())  # 2
    plan = plan_for(["objective=maskdistill", storage])
    mae, distill = plan.stages
    assert not mae.trains and mae.reused.uri == "models:/mae-vit_nano/2" and distill.trains
    assert distill.inputs[0].how == "registry" and distill.inputs[0].uri == "models:/mae-vit_nano/2"
    lines = plan_lines(plan)
    assert lines[1] == "1. mae          reuse  models:/mae-vit_nano/2 (the newest compatible version)"
    # Sized by the user, the stage is reused only when built with exactly those settings: here, trained.
    plan = plan_for(["objective=maskdistill", storage, "stages.mae.trainer.max_steps=7"])
    assert plan.stages[0].trains and plan.final.inputs[0].how == "train"
    # Its key is on the version it registers: the same command then reuses it.
    mae_cfg = plan.stages[0].resolved_cfg()
    register(store, "mae-vit_nano", encoder_meta(), tags={STAGE_KEY_TAG: stage_key(mae_cfg)})  # 3
    plan = plan_for(["objective=maskdistill", storage, "stages.mae.trainer.max_steps=7"])
    assert plan.stages[0].reused.uri == "models:/mae-vit_nano/3" and plan.final.inputs[0].how == "reused"
    # A tokenizer chain: the vqkd version must have been distilled from the resolved teacher (v3, the newest).
    tokenizer = {**encoder_meta(), "kind": "tokenizer"}
    register(store, "vqkd-mae-vit_nano", {**tokenizer, "teacher": "models:/mae-vit_nano/2"})
    plan = plan_for(["objective=beitv2", storage])
    assert [(s.objective, s.trains) for s in plan.stages] == [("mae", False), ("vqkd", True), ("beitv2", True)]
    assert plan.stages[1].inputs[0].uri == "models:/mae-vit_nano/3"
    register(store, "vqkd-mae-vit_nano", {**tokenizer, "teacher": "models:/mae-vit_nano/3"})
    plan = plan_for(["objective=beitv2", storage])
    assert [(s.objective, s.trains) for s in plan.stages] == [("mae", False), ("vqkd", False), ("beitv2", True)]
    assert plan.final.inputs[0].uri == "models:/vqkd-mae-vit_nano/2"
    # resolve=never: nothing is looked up (and the missing input is a config error).
    with pytest.raises(ConfigError, match="^objective.teacher.source: required"):
        plan_for(["objective=maskdistill", storage, "pipeline.resolve=never"])


def test_an_unfinished_run_of_the_same_stage_is_found(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pretrain.resolve import RUN_DIR_TAG, unfinished_run

    assert unfinished_run(store, "pretrain", "k" * 16) is None  # no store yet, and none created
    assert not Path(store[10:]).exists()
    (Path(store[10:]).parent).mkdir(parents=True)
    client = MlflowClient(store, store)
    exp = client.create_experiment("pretrain", str(tmp_path / "art"))

    def stage_run(key: str, status: str) -> str:
        run = client.create_run(exp, tags={STAGE_KEY_TAG: key, RUN_DIR_TAG: f"/runs/{status}"})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    stage_run("k" * 16, "FINISHED")
    assert unfinished_run(store, "pretrain", "k" * 16) is None
    failed = stage_run("k" * 16, "FAILED")
    stage_run("j" * 16, "RUNNING")  # another stage
    found = unfinished_run(store, "pretrain", "k" * 16)
    assert found.info.run_id == failed and found.data.tags[RUN_DIR_TAG] == "/runs/FAILED"
    running = stage_run("k" * 16, "RUNNING")  # newest: another pipeline training the same stage now
    assert unfinished_run(store, "pretrain", "k" * 16).info.run_id == running
    assert unfinished_run(store, "elsewhere", "k" * 16) is None
