"""`python -m pretrain.run` validation: one line, exit 2, nothing heavy imported or started."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pretrain.compose import group_options, load_config

# Runs main() in a fresh interpreter and fails if torch/Ray/MLflow got imported.
PROBE = textwrap.dedent(
    """
    import sys
    from pretrain.run import main
    rc = main(sys.argv[1:])
    heavy = sorted(m for m in ("torch", "ray", "mlflow", "deepspeed", "timm") if m in sys.modules)
    if heavy:
        print("imported: " + ",".join(heavy), file=sys.stderr)
        sys.exit(99)
    sys.exit(rc)
    """
)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["objective=nope"],
            "objective: unknown objective 'nope'; valid choices: beitv2, ccvit, crossmae, dino, dmtjepa, fcmae, flexpredict, ibot, ijepa, mae, maskdistill, moby, mocov3, "
            "msbreg, rotnet, semaim, simclr, simmim, vqkd",
        ),
        (
            ["model=vit_huge_typo"],
            "valid choices: convnext_atto, convnext_tiny, convnextv2_base, convnextv2_nano_32, resnet18, resnet50, "
            "swin_base_192, swin_nano, vit_base, vit_large, vit_nano, vit_small, vit_tiny",
        ),
        (
            ["model=resnet18"],  # the default objective, MAE, reads patch tokens
            "model.arch: objective mae runs on vit backbones (vit: model=vit_nano, vit_base), and resnet18 is a resnet; "
            "objectives on any timm model: moby, mocov3, msbreg, rotnet, simclr",
        ),
        (
            ["model=convnext_atto", "objective=mocov3", "objective.freeze_patch_embed=true"],
            "objective.freeze_patch_embed: is a ViT setting (a convnext backbone has no ViT patch projection); use "
            "auto or false",
        ),
        (
            ["objective=fcmae"],  # on the default ViT
            "model.arch: objective fcmae runs on convnext backbones (convnext: model=convnextv2_nano_32, "
            "convnextv2_base, convnext_atto), and vit_tiny_patch16_224 is a vit",
        ),
        (["model.family=cnn"], "model.family: unknown family 'cnn'; valid choices: auto, vit, resnet, convnext"),
        (["trainer.nope=1"], "trainer.nope: unknown key 'nope'; valid keys under trainer:"),
        (["nope=1"], "nope: unknown key 'nope'"),
        (["trainer.batch_size=abc"], "trainer.batch_size: 'abc' is not a valid Integer"),
        (["trainer.batch_size=0"], "trainer.batch_size: must be >= 1, got 0"),
        (["trainer.storage_path=ftp://host/x"], "trainer.storage_path: unsupported scheme 'ftp'"),
        (["data.urls=ftp://host/a-{0..3}.tar"], "data.urls: unsupported scheme 'ftp'"),
        (["model.img_size=30"], "model.img_size: 30 is not a multiple of model.patch_size=4"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: must be one of 0, 1, 2, 3; got 4"),
        (["model.fused_attn=sometimes"], "model.fused_attn: must be true, false or auto, got 'sometimes'"),
        (["deepspeed.precision=fp8"], "valid choices: fp32, bf16, fp16"),
        (["objective.mask_ratio=1.0"], "objective.mask_ratio: must be in (0, 1), got 1.0"),
        (["objective.decoder_num_heads=3"], "objective.decoder_num_heads: 3 does not divide decoder_embed_dim=128"),
        (["trainer.num_workers=0"], "trainer.num_workers: must be >= 1, got 0"),
        (["trainer.max_nonfinite_steps=0"], "trainer.max_nonfinite_steps: must be >= 1, got 0"),
        (
            ["trainer.use_gpu=true", "trainer.gpus_per_worker=0"],
            "trainer.gpus_per_worker: must be > 0 with trainer.use_gpu=true",
        ),
        (["trainer.batch_size=1.5"], "trainer.batch_size: '1.5' is not a valid Integer"),
        (["optim.base_lr=-1"], "optim.base_lr: must be > 0, got -1.0"),
        (["data=nope"], "data: unknown data 'nope'; valid choices: default"),
        (["eval.protocols=[nope]"], "eval.protocols: unknown protocol(s) ['nope']; valid choices: knn, linear"),
        (["eval.holdout_fraction=1.5"], "eval.holdout_fraction: must be in (0, 1), got 1.5"),
        (["tracking.uri=ftp://host/mlflow"], "tracking.uri: unsupported scheme 'ftp'"),
        (
            ["objective=beitv2", "objective.tokenizer=ftp://x/y"],
            "objective.tokenizer: use models:/..., runs:/... or a local path",
        ),
        (["bare_word"], "bare_word: expected key=value"),
        (["--bogus"], "unknown option '--bogus'"),
        (
            ["resume=no-such-run", "trainer.storage_path=/nonexistent/runs"],
            "resume: no run at /nonexistent/runs/no-such-run",
        ),
    ],
)
def test_bad_config_is_one_line_exit_2_and_starts_nothing(args: list[str], expected: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert lines[0].startswith("error: ") or lines[0].startswith("error:")
    assert proc.stdout == ""


def test_every_config_problem_is_reported_at_once_each_on_its_line() -> None:
    proc = run_cli(
        "trainer.batch_size=-1",
        "trainer.num_workers=0",
        "deepspeed.zero_stage=7",
        "eval.holdout_fraction=2",
        "trainer.min_workers=-1",
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert sorted(proc.stderr.strip().splitlines()) == [
        "error: deepspeed.zero_stage: must be one of 0, 1, 2, 3; got 7",
        "error: eval.holdout_fraction: must be in (0, 1), got 2.0",
        "error: trainer.batch_size: must be >= 1, got -1",
        "error: trainer.min_workers: must be 0 (fixed size) or 1..trainer.num_workers=0, got -1",
        "error: trainer.num_workers: must be >= 1, got 0",
    ]


def test_cfg_job_prints_resolved_config_with_overrides() -> None:
    proc = run_cli("--cfg", "job", "trainer.max_steps=50", "model=vit_tiny", "preset=none")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 50" in proc.stdout
    assert "arch: vit_tiny_patch16_224" in proc.stdout
    # preset=none keeps the paper's decoder (8 blocks x 512).
    assert "decoder_depth: 8" in proc.stdout and "decoder_embed_dim: 512" in proc.stdout


def test_cpu_preset_is_the_default_and_paper_recipe_is_the_objective_yaml() -> None:
    cpu = load_config([])
    paper = load_config(["preset=none"])
    assert (cpu.objective.decoder_depth, cpu.objective.decoder_embed_dim) == (2, 128)
    assert (paper.objective.decoder_depth, paper.objective.decoder_embed_dim) == (8, 512)
    assert paper.objective.mask_ratio == 0.75 and paper.optim.base_lr == 1.5e-4
    assert list(paper.optim.betas) == [0.9, 0.95] and paper.optim.weight_decay == 0.05


def test_every_objective_yaml_has_a_registered_class_and_back() -> None:
    from objectives.registry import available

    assert group_options("objective") == available()
    # Values without a default (the tokenizer of beitv2) are given as a user would.
    required = {"beitv2": ["objective.tokenizer=models:/vqkd-x/latest"], "fcmae": ["model=convnextv2_nano_32"]}
    for name in available():
        assert load_config([f"objective={name}", *required.get(name, [])]).objective.name == name


def test_storage_path_and_tracking_uri_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # What scripts/stack.sh and the cluster setups export; unset, the embedded defaults.
    cfg = load_config([])
    assert (cfg.trainer.storage_path, cfg.tracking.uri) == ("", "")
    monkeypatch.setenv("PRETRAIN_STORAGE_PATH", "s3://bucket/runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = load_config([])
    assert (cfg.trainer.storage_path, cfg.tracking.uri) == ("s3://bucket/runs", "http://127.0.0.1:5000")
    assert load_config(["trainer=gpu"]).trainer.storage_path == "s3://bucket/runs"
    # An explicit key=value wins over the environment.
    cfg = load_config(["trainer.storage_path=/data/runs", "tracking.uri=http://mlflow:5000"])
    assert (cfg.trainer.storage_path, cfg.tracking.uri) == ("/data/runs", "http://mlflow:5000")
    # A bad scheme from the environment is reported like one on the command line.
    monkeypatch.setenv("PRETRAIN_STORAGE_PATH", "ftp://host/runs")
    done = run_cli()
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "trainer.storage_path" in done.stderr, done.stderr


def test_the_cpu_preset_applies_only_to_the_cpu_model_without_gpus() -> None:
    """`trainer=gpu model=vit_base` used to keep mae_cpu: a 2x128 decoder and the CPU learning rate."""
    cpu = load_config([])
    assert cpu.preset_name == "mae_cpu" and cpu.objective.decoder_depth == 2 and cpu.optim.base_lr == 1.0e-3
    for overrides in (["trainer=gpu"], ["model=vit_base"], ["trainer.use_gpu=true"], ["model=vit_tiny"]):
        cfg = load_config(overrides)
        # The paper recipe (He et al. 2022: 8 blocks x 512, base lr 1.5e-4), as with preset=none.
        assert cfg.preset_name == "none", overrides
        assert (cfg.objective.decoder_depth, cfg.objective.decoder_embed_dim, cfg.optim.base_lr) == (8, 512, 1.5e-4)
    # Small inputs on the CPU keep the preset (e.g. stages.mae.model.img_size=64 in a pipeline).
    assert load_config(["model.img_size=64"]).preset_name == "mae_cpu"
    # Another objective: its own preset, and the same rule.
    assert load_config(["objective=simclr"]).preset_name == "simclr_cpu"
    assert load_config(["objective=simclr", "trainer=gpu"]).preset_name == "none"


def test_an_explicit_cpu_preset_on_gpus_or_a_large_model_is_refused_unless_forced() -> None:
    proc = run_cli("trainer=gpu", "model=vit_base", "preset=mae_cpu", "trainer.max_steps=-1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "error: trainer.max_steps: must be >= 1, got -1"  # every problem, each on its line
    assert lines[1].startswith("error: preset: mae_cpu is a CPU preset (pretrain/conf/preset/mae_cpu.yaml")
    assert "not meant for trainer.use_gpu=true; use preset=none (the paper recipe) or force_preset=true" in lines[1]
    proc = run_cli("model=vit_base", "preset=mae_cpu")
    assert proc.returncode == 2
    assert "not meant for model vit_base at 224 px (the CPU presets are sized for <= 64 px)" in proc.stderr
    forced = load_config(["trainer=gpu", "preset=mae_cpu", "force_preset=true"])
    assert forced.preset_name == "mae_cpu" and forced.objective.decoder_depth == 2


def test_the_first_line_names_the_recipe() -> None:
    from omegaconf import OmegaConf

    from pretrain.config import recipe_line

    line = recipe_line(OmegaConf.to_object(load_config([])))
    assert line == (
        "recipe: mae on vit_nano with the CPU preset mae_cpu (pretrain/conf/preset/mae_cpu.yaml over "
        "pretrain/conf/objective/mae.yaml, optim/mae.yaml); preset=none trains the paper recipe"
    )
    paper = recipe_line(OmegaConf.to_object(load_config(["model=vit_base", "trainer=gpu"])))
    assert paper == "recipe: mae on vit_base, the paper recipe (pretrain/conf/objective/mae.yaml, optim/mae.yaml)"
    forced = OmegaConf.to_object(load_config(["trainer=gpu", "preset=mae_cpu", "force_preset=true"]))
    assert "with the CPU preset mae_cpu, forced (" in recipe_line(forced)


def test_inside_a_ray_job_node_local_storage_is_refused_with_the_fix() -> None:
    """`ray job submit` runs the driver in the job's temporary directory: ./runs and the sqlite
    store there would vanish with it, and resume= could not find the checkpoints."""
    import os

    from pretrain.config import RAY_JOB_ENV

    def in_job(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if k not in ("PRETRAIN_STORAGE_PATH", "MLFLOW_TRACKING_URI")}
        return subprocess.run(
            [sys.executable, "-c", PROBE, "--cfg", "job", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**clean, RAY_JOB_ENV: "{}", **env},
        )

    proc = in_job()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.storage_path: ./runs (the default) is on one node's disk inside a Ray job: checkpoints "
        "would be lost with the job's working directory or node and resume= could not find them; set "
        "trainer.storage_path=s3://<bucket>/runs (or PRETRAIN_STORAGE_PATH)",
        "error: tracking.uri: a sqlite store beside the runs (the default) is on one node's disk inside a Ray job; "
        "set tracking.uri=http://<mlflow server> (or MLFLOW_TRACKING_URI, or tracking=server)",
    ]
    assert (
        "tracking.uri: sqlite:////tmp/m.db is on one node's disk"
        in in_job("trainer.storage_path=s3://b/runs", "tracking.uri=sqlite:////tmp/m.db").stderr
    )
    # The environment the stack and the cluster YAMLs export is enough; so is tracking off.
    fixed = in_job(PRETRAIN_STORAGE_PATH="s3://b/runs", MLFLOW_TRACKING_URI="http://127.0.0.1:5000")
    assert fixed.returncode == 0, fixed.stderr
    assert in_job("trainer.storage_path=s3://b/runs", "tracking.enabled=false").returncode == 0
    # Outside a job the local defaults stay the default.
    assert run_cli("--cfg", "job").returncode == 0


def test_missing_training_manifest_is_one_line_exit_2_before_ray(tmp_path) -> None:  # noqa: ANN001
    missing = tmp_path / "none" / "train.manifest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.run", f"data.urls={missing}", f"trainer.storage_path={tmp_path / 'runs'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: data.urls: no manifest at '{missing}'; write one with `python -m data.write`"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
