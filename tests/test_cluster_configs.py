"""cluster/: launcher YAMLs, the KubeRay RayJob and the runtime_env, checked by Ray's own code.

No cloud API and no network: Ray's defaults merge and JSON schema for cluster launcher
configs (prepare_config + validate_config), KubeRay's RayCluster -> autoscaling-config
translation, RuntimeEnv validation and Ray's working_dir packer. Every
`python -m pretrain.run ...` command in these files, examples in comments included,
must compose and validate with pretrain.compose.load_config.
"""

from __future__ import annotations

import copy
import re
import shlex
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from pretrain.compose import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
KUBERAY = "kuberay-rayjob.yaml"
RUNTIME_ENV = "runtime_env.yaml"
# Files whose header comments show a `ray job submit ... -- python -m pretrain.run ...`.
WITH_SUBMIT_EXAMPLES = [*LAUNCHERS, RUNTIME_ENV]
RUN_PREFIX = ["python", "-m", "pretrain.run"]

MAX_PACKAGE_BYTES = 5 * 1024 * 1024
NEVER_UPLOADED = (".venv/", "runs/", ".stack/", ".git/")
NEVER_SYNCED = {".venv/", "runs/", ".stack/", ".git/", "mlruns/", "__pycache__/"}
SECRET_ENV_NAME = re.compile(r"AWS_SECRET|AWS_ACCESS|TOKEN|PASSWORD")
AWS_ACCESS_KEY = re.compile(r"AKIA[0-9A-Z]{16}")
AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", re.IGNORECASE)


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def makefile_torch_pins() -> str:
    """`torch==X torchvision==Y` as the Makefile installs them."""
    match = re.search(r"torch==\S+ torchvision==\S+", (ROOT / "Makefile").read_text())
    assert match, "Makefile no longer installs torch==... torchvision==...; update this test"
    return match.group(0)


def constraints_pin(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert match, f"constraints.txt has no {package}== pin"
    return match.group(1)


def submit_examples(text: str) -> list[list[str]]:
    """argv of each `ray job submit ...` example in the comments (backslash continuations joined)."""
    commands, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        body = stripped.lstrip("#").strip() if stripped.startswith("#") else None
        if body is None:
            current = None
            continue
        if current is None and body.startswith("ray job submit"):
            current = ""
        if current is not None:
            current += " " + body.removesuffix("\\")
            if not body.endswith("\\"):
                commands.append(shlex.split(current, comments=True))
                current = None
    return commands


def run_overrides(argv: list[str], where: str) -> list[str]:
    """The overrides of a `python -m pretrain.run ...` argv."""
    assert argv[: len(RUN_PREFIX)] == RUN_PREFIX, f"{where}: expected `python -m pretrain.run ...`, got {argv[:4]}"
    return argv[len(RUN_PREFIX) :]


def composed(overrides: list[str], where: str) -> Any:
    try:
        return load_config(overrides)
    except ConfigError as exc:
        pytest.fail(f"{where}: the pretrain.run overrides do not validate: {exc}")


def rayjob_cluster_cr(rayjob: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster that KubeRay creates for a RayJob."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rayjob["metadata"]["name"], "namespace": "default"},
        "spec": rayjob["spec"]["rayClusterSpec"],
    }


def rayjob_containers(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rayjob["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in rayjob["spec"]:
        templates.append(rayjob["spec"]["submitterPodTemplate"])
    return [c for t in templates for c in t["spec"].get("containers", [])]


def test_every_file_in_cluster_is_checked() -> None:
    found = {p.name for p in CLUSTER.iterdir() if p.is_file()}
    assert found == {*LAUNCHERS, KUBERAY, RUNTIME_ENV}, (
        f"cluster/ holds {sorted(found)}; add new files to this test so Ray validates them"
    )


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_validation(name: str) -> None:
    cfg = load(name)
    prepared = prepare_config(cfg)
    validate_config(prepared)
    head = prepared["available_node_types"][prepared["head_node_type"]]
    if cfg["provider"]["type"] == "local":
        # Ray makes one node type for head and workers, and keeps one worker per listed IP.
        ips = len(cfg["provider"]["worker_ips"])
        assert head["min_workers"] == head["max_workers"] == prepared["max_workers"] == ips, (
            f"{name}: expected {ips} workers (one per worker_ips entry), got {head}"
        )
    else:
        assert head["max_workers"] == 0, f"{name}: the head node type must not scale"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_rays_validation_rejects_a_misspelt_field(name: str) -> None:
    # Control: the schema check is live (jsonschema present), so a passing file means something.
    cfg = copy.deepcopy(load(name))
    cfg["head_start_ray_command"] = cfg["head_start_ray_commands"]
    with pytest.raises(jsonschema.ValidationError, match="head_start_ray_command"):
        validate_config(prepare_config(cfg))


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_keeps_token_auth_and_a_loopback_dashboard(name: str) -> None:
    cfg = load(name)
    head_start = " ".join(cfg["head_start_ray_commands"])
    worker_start = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_start, f"{name}: head must start with token auth"
    assert "--dashboard-host=127.0.0.1" in head_start, f"{name}: the dashboard must listen on the head's loopback"
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in worker_start, (
        f"{name}: workers must start with token auth"
    )
    mounts = cfg["file_mounts"]
    assert mounts.get("~/pretrain") == ".", f"{name}: the checkout must be synced to ~/pretrain"
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token", f"{name}: the auth token must be synced"
    missing = NEVER_SYNCED - set(cfg["rsync_exclude"])
    assert not missing, f"{name}: rsync_exclude lacks {sorted(missing)}"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_installs_the_project_like_the_makefile(name: str) -> None:
    commands = load(name)["setup_commands"]
    steps = [
        f"pip install -c constraints.txt {makefile_torch_pins()}",
        "pip install --no-build-isolation -c constraints.txt deepspeed",
        "pip install --no-build-isolation -c constraints.txt -e .",
    ]
    where = []
    for step in steps:
        hits = [i for i, c in enumerate(commands) if c.strip() == f"cd ~/pretrain && {step}"]
        assert hits, f"{name}: setup_commands lack `cd ~/pretrain && {step}`"
        where.append(hits[0])
    assert where == sorted(where), f"{name}: torch, then deepspeed, then the project (Makefile order)"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_container_image_carries_the_pinned_ray(name: str) -> None:
    image = load(name)["docker"]["image"]
    assert image == f"rayproject/ray:{constraints_pin('ray')}-py311-gpu", (
        f"{name}: docker.image {image!r} must match ray=={constraints_pin('ray')} of constraints.txt"
    )


@pytest.mark.parametrize("name", WITH_SUBMIT_EXAMPLES)
def test_submit_examples_compose(name: str) -> None:
    examples = submit_examples((CLUSTER / name).read_text())
    assert examples, f"{name}: no `ray job submit ... -- python -m pretrain.run ...` example in its comments"
    for argv in examples:
        assert "--runtime-env" in argv and argv[argv.index("--runtime-env") + 1] == f"cluster/{RUNTIME_ENV}"
        cfg = composed(run_overrides(argv[argv.index("--") + 1 :], name), name)
        assert cfg.trainer.use_gpu, f"{name}: the cluster examples train on GPUs"


def test_gcp_gpu_nodes_fit_the_example_job() -> None:
    # GCP node types declare their resources (the provider does not detect them).
    (argv,) = submit_examples((CLUSTER / "gcp.yaml").read_text())
    cfg = composed(run_overrides(argv[argv.index("--") + 1 :], "gcp.yaml"), "gcp.yaml")
    t = cfg.trainer
    prepared = prepare_config(load("gcp.yaml"))
    gpu_types = {k: v for k, v in prepared["available_node_types"].items() if v["resources"].get("GPU")}
    capacity = sum(v["max_workers"] * v["resources"]["GPU"] for v in gpu_types.values())
    assert capacity >= t.num_workers * t.gpus_per_worker, f"{capacity} GPUs at most, the job needs {t.num_workers}"
    for key, node in gpu_types.items():
        per_node = node["resources"]["GPU"] // t.gpus_per_worker
        assert node["resources"]["CPU"] >= per_node * t.cpus_per_worker, f"{key}: too few CPUs for {per_node} workers"


def test_kuberay_rayjob_shape() -> None:
    rayjob = load(KUBERAY)
    spec = rayjob["spec"]
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == constraints_pin("ray"), "rayVersion must be the Ray of constraints.txt"
    assert cluster["authOptions"] == {"mode": "token"}, "KubeRay token auth must stay on"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", "the head Service stays private"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    secret_like = [k for k in runtime_env.get("env_vars", {}) if SECRET_ENV_NAME.search(k)]
    assert not secret_like, f"runtimeEnvYAML is shown in the dashboard; move {secret_like} to a Secret"


def test_kuberay_entrypoint_composes_and_fits_the_cluster() -> None:
    rayjob = load(KUBERAY)
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint.startswith("python -m pretrain.run") and "objective=beitv2" in entrypoint.split()
    cfg = composed(run_overrides(shlex.split(entrypoint), KUBERAY), KUBERAY)
    autoscaling = _derive_autoscaling_config_from_ray_cr(rayjob_cluster_cr(rayjob))
    validate_config(prepare_config(autoscaling))
    t = cfg.trainer
    workers = {k: v for k, v in autoscaling["available_node_types"].items() if k != autoscaling["head_node_type"]}
    gpus = sum(v["max_workers"] * v["resources"].get("GPU", 0) for v in workers.values())
    assert gpus == t.num_workers * t.gpus_per_worker, f"pods hold {gpus} GPUs, trainer.num_workers={t.num_workers}"
    for key, node in workers.items():
        per_pod = node["resources"].get("GPU", 0) // t.gpus_per_worker
        assert node["resources"]["CPU"] >= per_pod * t.cpus_per_worker, f"{key}: too few CPUs for {per_pod} workers"


def test_kuberay_translation_rejects_a_pod_without_cpus() -> None:
    # Control: the CR really goes through Ray's translation (it needs each group's CPUs).
    rayjob = copy.deepcopy(load(KUBERAY))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"] = {}
    with pytest.raises(ValueError, match="CPU"):
        _derive_autoscaling_config_from_ray_cr(rayjob_cluster_cr(rayjob))


def test_kuberay_credentials_come_from_secrets() -> None:
    secret_vars = []
    for container in rayjob_containers(load(KUBERAY)):
        for var in container.get("env", []):
            if SECRET_ENV_NAME.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), (
                    f"{container['name']}: {var['name']} must come from valueFrom.secretKeyRef, not a literal value"
                )
                secret_vars.append(var["name"])
    assert "AWS_SECRET_ACCESS_KEY" in secret_vars, "expected the S3 credentials as Secret references"


def test_runtime_env_is_valid_and_its_package_is_small(tmp_path: Path) -> None:
    cfg = load(RUNTIME_ENV)
    RuntimeEnv(**cfg)
    secret_like = [k for k in cfg.get("env_vars", {}) if SECRET_ENV_NAME.search(k)]
    assert not secret_like, f"runtime_env is shown in the dashboard; {secret_like} must not be set here"
    package = tmp_path / "working_dir.zip"
    # Only the file's excludes: no .gitignore, no Ray default excludes - the file holds on its own.
    create_package(str(ROOT / cfg["working_dir"]), package, include_gitignore=False, excludes=cfg["excludes"])
    size = package.stat().st_size
    assert size < MAX_PACKAGE_BYTES, f"working_dir zip is {size / 2**20:.1f} MiB; add large folders to excludes"
    names = zipfile.ZipFile(package).namelist()
    leaked = sorted({n.split("/")[0] + "/" for n in names if n.startswith(NEVER_UPLOADED)})
    assert not leaked, f"working_dir zip contains {leaked}"
    assert {"pretrain/run.py", "pretrain/conf/config.yaml", "objectives/__init__.py"} <= set(names), (
        "the package must carry the project's code and config"
    )


@pytest.mark.parametrize("name", [*LAUNCHERS, KUBERAY, RUNTIME_ENV])
def test_no_literal_credentials_and_no_disabled_auth(name: str) -> None:
    text = (CLUSTER / name).read_text()
    assert not AWS_ACCESS_KEY.search(text), f"{name} contains what looks like an AWS access key id"
    assert not AUTH_DISABLED.search(text), f"{name} disables Ray token authentication"
