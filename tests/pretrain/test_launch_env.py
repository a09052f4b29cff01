"""The environment local Ray workers inherit: one ninja and one extension cache for every run of
one Python environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.hardware import (
    EXTENSIONS_ENV,
    extension_cache_dir,
    interpreter_first_on_path,
    use_environment_build_tools,
)


def test_the_interpreters_bin_comes_first_once() -> None:
    sep = os.pathsep
    assert interpreter_first_on_path(sep.join(["/usr/bin", "/bin"]), "/v/bin/python") == sep.join(
        ["/v/bin", "/usr/bin", "/bin"]
    )
    # Already there (an activated venv): moved to the front, not repeated.
    assert interpreter_first_on_path(sep.join(["/usr/bin", "/v/bin", ""]), "/v/bin/python") == sep.join(
        ["/v/bin", "/usr/bin"]
    )
    assert interpreter_first_on_path("", "/v/bin/python") == "/v/bin"


def test_activated_or_not_the_same_ninja_is_found() -> None:
    """What `make demo` (venv not activated) and an activated venv each resolve `ninja` to."""
    venv_bin = str(Path(sys.executable).parent)
    system = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    found = {
        shutil.which("ninja", path=interpreter_first_on_path(path, sys.executable))
        for path in (system, os.pathsep.join([venv_bin, system]))
    }
    assert len(found) == 1
    if (Path(venv_bin) / "ninja").exists():  # the venv's own (pip's ninja, a DeepSpeed dependency)
        assert found == {str(Path(venv_bin) / "ninja")}
        version = subprocess.run([found.pop(), "--version"], capture_output=True, text=True, check=True)
        assert version.stdout.strip()


def test_each_environment_has_its_own_extension_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two venvs (two checkouts) no longer rebuild each other's DeepSpeed op in a shared cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    one, two = tmp_path / "a" / ".venv", tmp_path / "b" / ".venv"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    (tmp_path / "link").symlink_to(one)
    first, second = extension_cache_dir(str(one)), extension_cache_dir(str(two))
    assert first != second
    assert extension_cache_dir(str(tmp_path / "link")) == first  # the real path: a symlinked venv is the same one
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-"
    assert Path(first).parent == tmp_path / "cache" / "torch_extensions" and Path(first).name.startswith(tag)
    # Used unless the user chose a directory. (setenv first: monkeypatch then restores the
    # variable's state from before the test, even where it was unset.)
    monkeypatch.setenv(EXTENSIONS_ENV, "")
    monkeypatch.delenv(EXTENSIONS_ENV)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    assert use_environment_build_tools() == extension_cache_dir() == os.environ[EXTENSIONS_ENV]
    # ... and this interpreter's ninja, whatever PATH the process was started with.
    assert os.environ["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    monkeypatch.setenv(EXTENSIONS_ENV, str(tmp_path / "mine"))
    assert use_environment_build_tools() == str(tmp_path / "mine")


def test_prebuild_leaves_the_op_and_the_demo_data_a_run_loads_and_a_second_call_only_loads_them(
    tmp_path: Path,
) -> None:
    """`python -m pretrain.prebuild` (run by `make install`): the CPU communication op is built
    with this interpreter's ninja, so that a run's first process group only loads it, and the
    demo dataset of a run with the same overrides is generated where that run looks for it."""
    from data.config import DataConfig
    from data.default import ensure_default_dataset

    not_activated = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if p != str(Path(sys.executable).parent)
    )
    sizes = {"default_train_samples": 48, "default_eval_samples": 16, "default_shard_size": 16}
    argv = [sys.executable, "-m", "pretrain.prebuild", *(f"data.{k}={v}" for k, v in sizes.items())]
    env = {**os.environ, "PRETRAIN_CACHE": str(tmp_path)}

    def prebuild(path: str) -> dict[str, str]:
        out = subprocess.run(argv, env={**env, "PATH": path}, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = [line for line in out.stdout.splitlines() if line.startswith("prebuild: ")]
        return {"op": lines[0], "data": lines[1]}

    first = prebuild(not_activated)
    dataset = Path(first["data"].rsplit("(", 1)[1].rstrip(")"))
    assert first["data"].startswith("prebuild: demo dataset ready in ") and dataset.parent == tmp_path
    # What a run with these sizes uses (loader, evaluation): the same folder, complete.
    assert ensure_default_dataset(DataConfig(cache_dir=str(tmp_path), **sizes)).root == str(dataset)
    generated = {p: p.stat().st_mtime_ns for p in dataset.iterdir()}
    op_built = first["op"].rsplit("(", 1)[-1].rstrip(")")
    built = Path(op_built).stat().st_mtime_ns if op_built.endswith(".so") else 0
    # Called again, from an activated venv's PATH this time: loaded, not built again.
    second = prebuild(os.environ["PATH"])
    assert second["data"].endswith(f"({dataset})")
    assert {p: p.stat().st_mtime_ns for p in dataset.iterdir()} == generated
    if first["op"].endswith(("nothing to build", "no op to build")):
        return  # another accelerator: no op to prebuild
    assert first["op"].startswith("prebuild: deepspeed.ops.comm.deepspeed_shm_comm_op ready in ")
    library = Path(first["op"].rsplit("(", 1)[1].rstrip(")"))
    assert library.is_file() and library.suffix == ".so"
    assert library.is_relative_to(os.environ.get(EXTENSIONS_ENV) or extension_cache_dir())
    assert second["op"].endswith(f"({library})") and library.stat().st_mtime_ns == built


def test_prebuild_refuses_a_bad_override_before_building_anything(tmp_path: Path) -> None:
    """The overrides are `pretrain.run`'s: a bad one is its one-line error, exit 2, and nothing is made."""
    out = subprocess.run(
        [sys.executable, "-m", "pretrain.prebuild", "data.default_train_samples=many"],
        env={**os.environ, "PRETRAIN_CACHE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stdout == "", out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == ["error: data.default_train_samples: 'many' is not a valid Integer"]
    assert not any(tmp_path.iterdir())


def test_project_log_lines_follow_the_current_stderr() -> None:
    """configure_logging's handler writes to sys.stderr as it is at each record: a driver whose stderr
    is replaced later (pytest's capture, a notebook) gets no "--- Logging error ---" (seen: data.write's
    lines after an in-process run had configured logging under an earlier, closed capture)."""
    script = (
        "import io, logging, sys\n"
        "from pretrain.trainer.worker import configure_logging\n"
        "first = sys.stderr = io.StringIO()\n"
        "configure_logging()\n"
        "logging.getLogger('data.write').info('one')\n"
        "first.close()\n"
        "second = sys.stderr = io.StringIO()\n"
        "logging.getLogger('data.write').info('two')\n"
        "sys.__stdout__.write(second.getvalue())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("INFO data.write: two") and "Logging error" not in done.stdout + done.stderr


def test_the_trainer_keeps_the_placement_group_cleaner_on_a_ray_it_did_not_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attached to a cluster (here: no instance started by this process), Ray Train's cleaner of
    a dead controller's placement groups stays; the Ray Data actor goes without datasets. (On an
    instance this process started, the cleaner goes too: tests/e2e/test_train.py lists the actors.)"""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    import pretrain.launch as launch

    monkeypatch.setattr(launch, "_started_gcs_address", None)
    assert not launch.on_ray_started_here()
    trainer = launch.torch_trainer_class()(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
    kinds = {type(cb) for cb in trainer._create_default_callbacks()}
    assert PlacementGroupCleanerCallback in kinds and DatasetsCallback not in kinds


def test_on_a_ray_it_did_not_start_the_workers_variables_and_the_settings_travel_as_ray_train_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attached to a cluster (its nodes have their own environments), every worker variable goes
    in the workers' runtime environment and none through the train loop; the controller's
    settings are the 0.5 s poll alone (the preemption watcher stays), and an exported value wins.
    (On an instance this process started: tests/e2e/test_train.py checks that Ray Train's actors
    have no runtime environment, and the fault tests that the variables reach the workers.)"""
    import pretrain.launch as launch

    monkeypatch.setattr(launch, "_started_gcs_address", None)
    monkeypatch.delenv(launch.HEALTH_CHECK_ENV, raising=False)
    env = {"DS_ACCELERATOR": "cpu", "PYTHONPATH": "/src", "PRETRAIN_CACHE": "/cache"}
    assert launch.split_worker_env(env) == (env, {})
    assert launch.controller_settings() == {launch.HEALTH_CHECK_ENV: "0.5"}
    monkeypatch.setenv(launch.HEALTH_CHECK_ENV, "2")
    assert launch.controller_settings() == {}


def test_the_trainer_asks_the_autoscaler_on_a_ray_it_did_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's scaling policies reach the controller as Ray Train made them where the driver
    did not start the Ray instance (a cluster may add nodes for a request) and for elastic runs
    (their policy reads the autoscaling coordinator); only a fixed-size run on an instance this
    process started drops the request (tests/e2e/test_train.py: no coordinator actor there)."""
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
    from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    from ray.train.v2.api.config import ScalingConfig

    import pretrain.launch as launch

    lean = launch.torch_trainer_class().lean_scaling_policy
    fixed = create_scaling_policy(ScalingConfig(num_workers=2))
    elastic = create_scaling_policy(ScalingConfig(num_workers=(1, 2)))
    assert type(fixed) is FixedScalingPolicy and type(elastic) is ElasticScalingPolicy
    monkeypatch.setattr(launch, "_started_gcs_address", None)
    assert lean(fixed) is fixed and lean(elastic) is elastic
    # As if this process had started the instance it is connected to: only the fixed one changes.
    monkeypatch.setattr(launch, "on_ray_started_here", lambda: True)
    replaced = lean(fixed)
    assert type(replaced) is not FixedScalingPolicy and isinstance(replaced, FixedScalingPolicy)
    assert replaced.scaling_config is fixed.scaling_config and lean(elastic) is elastic


# Builds the runs' trainer in a fresh interpreter and writes what the driver sends Ray Train's
# controller (its run context, with the backend config, and its callbacks) as Ray pickles it.
_SEND = """
import sys
import ray.cloudpickle as pickle
from ray.train import ScalingConfig
from pretrain.launch import torch_trainer_class
from pretrain.trainer.worker import train_loop
trainer = torch_trainer_class()(train_loop, scaling_config=ScalingConfig(num_workers=2))
sent = pickle.dumps((trainer.train_run_context, trainer._create_default_callbacks()))
assert "torch" not in sys.modules, "the driver imported torch to build the trainer"
sys.stdout.buffer.write(sent)
"""
# Receives it as the controller does: a fresh interpreter.
_RECEIVE = """
import sys
import ray.cloudpickle as pickle
context, callbacks = pickle.loads(sys.stdin.buffer.read())
assert "torch" not in sys.modules, "receiving the trainer's config imported torch"
backends = {type(cb._backend).__name__ for cb in callbacks if hasattr(cb, "_backend")}
print(type(context.backend_config).__name__, context.backend_config.backend, *sorted(backends))
"""


def test_neither_the_driver_nor_the_controller_imports_torch_to_start_a_run() -> None:
    """Ray's TorchConfig lives in a module that imports torch: the driver building a TorchTrainer
    and the controller receiving its config each imported it before the workers started (about 3
    cpu-s each on a slow host). The runs' trainer carries pretrain.process_group's config instead;
    the workers' process group is the e2e tests' (tests/e2e: every run has two workers over gloo)."""
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1"}
    sent = subprocess.run([sys.executable, "-c", _SEND], capture_output=True, env=env, timeout=120)
    assert sent.returncode == 0, sent.stderr.decode()[-2000:]
    received = subprocess.run(
        [sys.executable, "-c", _RECEIVE], input=sent.stdout, capture_output=True, env=env, timeout=120
    )
    assert received.returncode == 0, received.stderr.decode()[-2000:]
    # The backend setup and the accelerator setup callbacks both hold the backend.
    assert received.stdout.decode().split() == ["ProcessGroupConfig", "gloo", "ProcessGroupBackend"], received.stdout


def test_the_process_group_backend_follows_the_devices() -> None:
    """NCCL between GPU workers, gloo between CPU workers (as Ray's TorchTrainer picks); another
    backend is refused by name."""
    from ray.train import ScalingConfig

    from pretrain.launch import torch_trainer_class
    from pretrain.process_group import ProcessGroupConfig

    cpu = torch_trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=2))
    gpu = torch_trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=2, use_gpu=True))
    assert (cpu.backend_config.backend, gpu.backend_config.backend) == ("gloo", "nccl")
    assert gpu.backend_config.to_dict() == {"backend": "nccl", "init_method": "env", "timeout_s": 1800}
    with pytest.raises(ValueError, match="process group backend 'mpi': expected one of gloo, nccl"):
        ProcessGroupConfig(backend="mpi")
