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
            "objective: unknown objective 'nope'; valid choices: beitv2, ccvit, mae, maskdistill, mocov3, semaim, simclr, vqkd",
        ),
        (["model=vit_huge_typo"], "valid choices: vit_base, vit_large, vit_nano, vit_small, vit_tiny"),
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
        "trainer.batch_size=-1", "trainer.num_workers=0", "deepspeed.zero_stage=7", "eval.holdout_fraction=2"
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert sorted(proc.stderr.strip().splitlines()) == [
        "error: deepspeed.zero_stage: must be one of 0, 1, 2, 3; got 7",
        "error: eval.holdout_fraction: must be in (0, 1), got 2.0",
        "error: trainer.batch_size: must be >= 1, got -1",
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
    required = {"beitv2": ["objective.tokenizer=models:/vqkd-x/latest"]}
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
