"""Driver side: connect to Ray, open the MLflow run, build and run the TorchTrainer."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pretrain.config import (
    PretrainConfig,
    TrainerConfig,
    in_ray_job,
    missing_eval_data,
    node_local_storage_problems,
    recipe_line,
    url_scheme,
)
from pretrain.hardware import interpreter_first_on_path

log = logging.getLogger("pretrain")

RUN_RECORD = "pretrain_run.json"
# How often Ray Train's controller polls its workers (Ray's default: 2 s). The end of training,
# and a dead worker, are noticed at the next poll; a poll is one small actor call per worker.
# 0.5 s took 3-4 s off every run's end on 2 cores (docs/benchmarks.md). An exported value wins.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.5"
# Ray Train's PreemptionWatcher actor polls the nodes for cloud preemption notices (spot
# instances). A local instance is this one machine: nothing to watch, and the actor is one more
# interpreter starting beside the workers' set-up. Kept on clusters. An exported value wins.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Read by a Python interpreter as it starts (where modules are found): only a runtime
# environment can give it to a worker. The workers set their other variables themselves.
AT_INTERPRETER_START = ("PYTHONPATH",)


@dataclass
class RunPlace:
    """Where a run lives: Ray Train's storage_path/name, plus a local root for the MLflow store."""

    storage_path: str  # local absolute dir or fsspec URL
    name: str
    local_root: Path  # local directory for the default sqlite MLflow store

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


def default_storage_path() -> str:
    return str(Path("runs").resolve())


def place_for(cfg: PretrainConfig) -> RunPlace:
    """Storage path and run name for a new run or for `resume=`."""
    storage = cfg.trainer.storage_path or default_storage_path()
    if url_scheme(storage) == "file":
        storage = str(Path(storage.removeprefix("file://")).expanduser().resolve())
    name = cfg.name or f"{cfg.objective.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if cfg.resume:
        if "/" in cfg.resume:  # a run directory or URL
            parent, _, name = cfg.resume.rstrip("/").rpartition("/")
            storage = parent if url_scheme(parent) != "file" else str(Path(parent).expanduser().resolve())
        else:
            name = cfg.resume
    local_root = Path(storage) if url_scheme(storage) == "file" else Path(default_storage_path())
    return RunPlace(storage_path=storage, name=name, local_root=local_root)


def read_run_record(place: RunPlace, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The record a previous launch wrote in the run directory, or None."""
    import fsspec

    url = f"{place.run_dir}/{RUN_RECORD}"
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_run_record(place: RunPlace, record: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{place.run_dir}/{RUN_RECORD}", **(storage_options or {}))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(record, f, indent=2)


def connect_ray(cfg: PretrainConfig) -> str:
    """Attach to the cluster named by RAY_ADDRESS / the surrounding Ray job, else start a local one."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        # The job server's URL (what `ray job submit` reads, e.g. from scripts/stack.sh env), not a
        # GCS address: attach to the cluster whose head runs on this machine.
        ray.init(address="auto", log_to_driver=True)
        return f"attached to the Ray cluster on this machine (RAY_ADDRESS={address} is its job server)"
    if address or in_ray_job():
        ray.init(address=address or "auto", log_to_driver=True)
        return f"attached to {address or 'the job cluster'}"
    t = cfg.trainer
    # Background evaluation tasks run beside the workers (eval.every_steps).
    eval_cpus = cfg.eval.num_cpus if cfg.eval.enabled and cfg.eval.every_steps else 0.0
    need_cpus = int(t.num_workers * t.cpus_per_worker + eval_cpus + 0.999)
    start_local_ray(need_cpus)
    return "started a local Ray instance"


def cluster_storage_problems(cfg: PretrainConfig) -> list[tuple[str, str]]:
    """Node-local checkpoints or tracking store on the Ray cluster this driver attached to.

    More than one node: refused (a restarted worker or a later resume lands on another node).
    One node, outside a job: a warning (it works until the cluster grows). Inside a job the
    config check has refused them already.
    """
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if nodes > 1:
        return node_local_storage_problems(cfg, f"on a Ray cluster of {nodes} nodes")
    for key, message in node_local_storage_problems(cfg, "on this one-node Ray cluster"):
        log.warning("%s: %s (works while the cluster has one node)", key, message.split("; set ", 1)[0])
    return []


# The GCS address of the Ray instance this process started (start_local_ray), if it did: its
# processes end with this one (Ray ties a local instance's fate to its driver).
_started_gcs_address: str | None = None
# The environment that instance's processes inherit: this process's when it started it.
_started_env: dict[str, str] = {}


def on_ray_started_here() -> bool:
    """Whether this process is connected to a Ray instance it started itself."""
    import ray

    return (
        _started_gcs_address is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _started_gcs_address
    )


def start_local_ray(num_cpus: int = 0, runtime_env: dict[str, Any] | None = None) -> None:
    """A new Ray instance on this machine, as `pretrain.run` starts one: at least `num_cpus` CPUs
    (all of the machine's where it has more), the dashboard on 127.0.0.1, warnings and up."""
    global _started_gcs_address, _started_env
    import ray

    os.environ["PATH"] = interpreter_first_on_path(os.environ.get("PATH", ""), sys.executable)
    _started_env = dict(os.environ)

    ray.init(
        # "local": a new instance even where `ray start` left one running on this machine.
        address="local",
        num_cpus=max(os.cpu_count() or 1, num_cpus),
        # The dashboard serves Ray's state API (Ray Train uses it); it binds 127.0.0.1.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
        # Ray prestarts idle interpreters, one per CPU at start and more when the first driver
        # connects, for tasks without a runtime environment; every actor here has one (Ray
        # Train's and ours), so they were never used and only took CPU from the start-up
        # (docs/benchmarks.md).
        _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
    )
    _started_gcs_address = ray.get_runtime_context().gcs_address


def worker_env(cfg: PretrainConfig) -> dict[str, str]:
    """Environment for the training workers."""
    env = {
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        # Teachers/tokenizers download from MLflow in every worker: no progress bars in the logs.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    if not cfg.trainer.use_gpu:
        # CPU training even where a GPU exists: DeepSpeed picks its CPU accelerator + gloo.
        env["DS_ACCELERATOR"] = "cpu"
    from pretrain.trainer.faults import FAULT_ENV, NAN_ENV

    for key in ("PYTHONPATH", "PRETRAIN_CACHE", FAULT_ENV, NAN_ENV):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def split_worker_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The workers' variables as (what their runtime environment carries, what the train loop
    sets itself as it starts).

    Ray starts an actor whose runtime environment has variables through a shim (its
    `setup_worker.py` imports Ray, then execs the worker): 0.7 cpu-s more per process on a slow
    host, and actors inherit their creator's runtime environment (docs/benchmarks.md). On a Ray
    instance this process started, the workers inherit the environment it had then, so the
    runtime environment carries only the variables an interpreter reads as it starts
    (`AT_INTERPRETER_START`) that differ from it, usually none. On a cluster it carries them all
    (its nodes have their own environments).
    """
    if not on_ray_started_here():
        return dict(env), {}
    at_start = {k: v for k, v in env.items() if k in AT_INTERPRETER_START and _started_env.get(k) != v}
    return at_start, {k: v for k, v in env.items() if k not in at_start}


def worker_range(t: TrainerConfig) -> int | tuple[int, int]:
    """Ray Train's worker count: fixed, or (min, max) for elastic training (Ray Train v2)."""
    return (t.min_workers, t.num_workers) if 0 < t.min_workers < t.num_workers else t.num_workers


@functools.cache
def torch_trainer_class() -> type:
    """Ray Train's trainer for torch workers (what its `TorchTrainer` is), less what has nothing
    to do here.

    - Ray Train starts a `DatasetManager` actor (a fresh interpreter importing Ray Data: about 2
      cpu-s on the 2-core VM, beside the workers' start) for the Ray Datasets passed to the
      trainer, also when none are. Runs here pass none (the workers stream WebDataset shards
      themselves), so that callback is left out; a trainer given datasets keeps it.
    - Its `PlacementGroupCleaner` (a detached actor: a fresh interpreter, about 2 cpu-s, then a
      state-API query a second through the dashboard) removes the run's placement groups if the
      controller dies without doing so. On a Ray instance this process started, they go with the
      instance, which ends with this process: left out there, kept on a cluster.
    - A fixed-size run's controller asks Ray's autoscaler for its workers' resources through an
      `AutoscalingCoordinator` (a detached actor importing Ray Data: about 2.5 cpu-s, and the
      controller waits for it before starting the workers). A Ray instance this process started
      has no nodes to add, so there the request is left out; kept on clusters and for elastic
      runs (whose policy reads the coordinator's reserved resources).
    - Ray's `TorchConfig` lives in a module that imports torch: the driver would import torch to
      build the trainer, and the controller again when it receives the config, both before the
      workers start. `pretrain.process_group.ProcessGroupConfig` sets up the same process group
      (gloo on CPUs, NCCL on GPUs) with Ray's own functions on the workers, and neither imports
      torch.
    - Ray Train gives its controller a runtime environment with variables (its settings, read
      from the environment), which makes Ray start the controller, and every actor it creates
      (the synchronization actor, the workers), through Ray's runtime-environment shim: 0.7
      cpu-s per process on a slow host, the controller's on the path to step 1. On a Ray
      instance this process started, where none of Ray Train's variables is exported, the
      controller starts without one and is handed the runs' settings (`controller_settings`)
      while it is built; with `split_worker_env` its workers need none either.
    """
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.constants import get_env_vars_to_propagate
        from ray.train.v2._internal.execution.controller import TrainController as RayTrainController
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        from pretrain.process_group import ProcessGroupConfig
    except ImportError:  # another Ray: its own trainer, as it is
        from ray.train.torch import TorchTrainer

        return TorchTrainer

    class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
        """Ray Train's fixed scaling, without resource requests to an autoscaler."""

        def after_controller_start(self, train_run_context: Any) -> None:
            self._requester_id = f"train-{train_run_context.run_id}"

        def _maybe_send_resource_request(self) -> None:
            pass

    class TrainController(RayTrainController):  # Ray names the process after the class
        """Ray Train's controller, its settings handed to it rather than exported to it.

        The controller reads them from its environment while it is built; they are there only
        then, so that it does not pass them on (Ray Train gives the workers' runtime environment
        every one of its variables set in the controller's)."""

        def __init__(self, *, settings: dict[str, str], **kwargs: Any) -> None:
            import ray._private.worker

            # What Ray Train's RAY_WARN_BLOCKING_GET_INSIDE_ASYNC=0 does for its controller: Ray
            # warns once per process about a blocking get in an async actor, and this one is
            # built that way. Marked as warned here, since the variable would be passed on.
            ray._private.worker.blocking_get_inside_async_warned = True
            saved = {key: os.environ.get(key) for key in settings}
            os.environ.update(settings)
            try:
                super().__init__(**kwargs)
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value

    TrainController.__qualname__ = "TrainController"  # as Ray's state API and dashboard list it

    class LeanTorchTrainer(DataParallelTrainer):
        def __init__(self, train_loop_per_worker: Any, *, scaling_config: Any = None, **kwargs: Any) -> None:
            use_gpu = bool(scaling_config and scaling_config.use_gpu)
            kwargs.setdefault("backend_config", ProcessGroupConfig.for_devices(use_gpu))
            super().__init__(train_loop_per_worker, scaling_config=scaling_config, **kwargs)

        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            unused: tuple[type, ...] = () if self.datasets else (DatasetsCallback,)
            if on_ray_started_here():
                unused += (PlacementGroupCleanerCallback,)
            return [cb for cb in callbacks if not isinstance(cb, unused)]

        @staticmethod
        def lean_scaling_policy(policy: Any) -> Any:
            if type(policy) is FixedScalingPolicy and on_ray_started_here():
                return FixedScalingWithoutAutoscaler(policy.scaling_config)
            return policy

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            import ray

            kwargs["scaling_policy"] = self.lean_scaling_policy(kwargs["scaling_policy"])
            settings = controller_settings()
            if not on_ray_started_here() or get_env_vars_to_propagate():
                # Ray Train's own way: the settings exported while it builds the controller's
                # runtime environment (and gone after the run).
                os.environ.update(settings)
                try:
                    return super()._initialize_and_run_controller(**kwargs)
                finally:
                    for key in settings:
                        os.environ.pop(key, None)
            # As Ray Train places its controller: 0 CPUs, on the driver's node.
            node = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
            actor = ray.remote(num_cpus=0, label_selector=node)(TrainController)
            controller = actor.remote(settings=settings, **kwargs)
            if threading.current_thread() is threading.main_thread():
                self._register_sigint_handler(controller)  # Ctrl-C aborts the run gracefully
            ray.get(controller.run.remote())
            return ray.get(controller.get_result.remote())

    return LeanTorchTrainer


def controller_settings() -> dict[str, str]:
    """Ray Train's settings for the runs' controllers: polling every 0.5 s, and on an instance
    this process started no preemption watcher (exported values win: Ray Train reads those)."""
    settings = {HEALTH_CHECK_ENV: HEALTH_CHECK_INTERVAL_S}
    if on_ray_started_here():
        settings[PREEMPTION_WATCHER_ENV] = "0"
    return {key: value for key, value in settings.items() if key not in os.environ}


def build_trainer(cfg: PretrainConfig, place: RunPlace, info: Any) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.config import LoggingConfig

    from pretrain.trainer.worker import train_loop

    t = cfg.trainer
    resources: dict[str, float] = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    at_start, in_loop = split_worker_env(worker_env(cfg))
    return torch_trainer_class()(
        train_loop,
        train_loop_config={"cfg": cfg, "info": info, "env": in_loop},
        scaling_config=ScalingConfig(num_workers=worker_range(t), use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=place.name,
            storage_path=place.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            worker_runtime_env={"env_vars": at_start},
            # Ray Train's per-report INFO lines drown ours; warnings and failures still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def launch(cfg: PretrainConfig, place: RunPlace, record: dict[str, Any] | None, parent_run_id: str = "") -> int:
    """Run training to the end; returns the process exit code. parent_run_id: the pipeline's MLflow run."""
    from pretrain import tracking
    from pretrain.background_eval import start_evaluator
    from pretrain.trainer.worker import RunInfo

    started = time.perf_counter()
    log.info("%s", recipe_line(cfg))
    if cfg.data.urls:
        from pretrain.resolve import data_key

        try:  # the run's key reads the training data's manifest: read it before anything starts
            data_key(cfg.data)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: data.urls: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            return 2
    skipped = missing_eval_data(cfg)
    if skipped:
        log.warning("%s", skipped)
        cfg = replace(cfg, eval=replace(cfg.eval, enabled=False))
    if os.environ.get("RAY_ADDRESS") or in_ray_job():
        # Attaching to a cluster: its size decides whether node-local storage is refused, before
        # anything is written.
        how = connect_ray(cfg)
        problems = cluster_storage_problems(cfg)
        if problems:
            print("\n".join(f"error: {key}: {message}" for key, message in problems), file=sys.stderr)
            return 2
        uri, run_id = open_tracking(cfg, place, record, parent_run_id)
    else:
        # Ray starts (seconds, mostly waiting for its processes) while MLflow opens the run beside it.
        with ThreadPoolExecutor(1, thread_name_prefix="open-tracking") as pool:
            opening = pool.submit(open_tracking, cfg, place, record, parent_run_id)
            how = connect_ray(cfg)
            uri, run_id = opening.result()
    write_run_record(
        place,
        {"name": place.name, "mlflow_run_id": run_id, "tracking_uri": uri, "config": tracking.redact(asdict(cfg))},
        cfg.data.storage_options,
    )
    log.info("%s; run %s in %s", how, place.name, place.storage_path)
    info = RunInfo(
        train_url=cfg.data.urls,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        run_dir=place.run_dir,
    )
    info.evaluator = start_evaluator(cfg, uri, run_id, worker_env(cfg))
    result, error = fit(cfg, place, info)
    published: dict[str, Any] = {}
    if info.evaluator is not None:
        import ray

        published["background"] = ray.get(info.evaluator.drain.remote())
    if error is None:
        steps = int((result.metrics or {}).get("step", cfg.trainer.max_steps)) if result is not None else 0
        try:
            published.update(publish(cfg, place, uri, run_id, steps))
        except Exception as exc:  # noqa: BLE001 - training succeeded; say why publishing did not
            published["error"] = _last_line(exc)
            log.error("evaluating/registering the encoder failed: %s", published["error"])
    if run_id:
        tracking.close_run(uri, run_id, failed=error is not None)
    exports = finished_exports(cfg, place, uri, run_id) if error is None else {}
    if "registered" in published:
        exports.pop("encoder", None)  # shown as `registered`
    print_summary(cfg, place, result, error, uri, run_id, time.perf_counter() - started, exports, published)
    return 1 if error is not None or "error" in published else 0


def open_tracking(
    cfg: PretrainConfig, place: RunPlace, record: dict[str, Any] | None, parent_run_id: str = ""
) -> tuple[str, str]:
    """(tracking URI, MLflow run id) of this run, re-opened on resume; ("", "") with tracking off.

    The run is tagged with its stage key and directory (a pipeline finds and resumes it by
    them) and, inside a pipeline, nested under the pipeline's run.
    """
    from pretrain import tracking
    from pretrain.resolve import PARENT_TAG, RUN_DIR_TAG, STAGE_KEY_TAG, stage_key

    if not cfg.tracking.enabled:
        return "", ""
    tags = {STAGE_KEY_TAG: stage_key(cfg), RUN_DIR_TAG: place.run_dir}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    uri = (record or {}).get("tracking_uri") or cfg.tracking.uri or tracking.default_tracking_uri(place.local_root)
    run_id = tracking.open_run(
        uri,
        cfg.tracking.experiment,
        place.name,
        run_id=(record or {}).get("mlflow_run_id", ""),
        artifact_root=artifact_root(cfg, place),
        tags=tags,
    )
    return uri, run_id


def artifact_root(cfg: PretrainConfig, place: RunPlace) -> str:
    """Where a new experiment of the default sqlite store keeps artifacts: beside the runs ("" with a server)."""
    return str((place.local_root / "mlartifacts").resolve()) if not cfg.tracking.uri else ""


def fit(cfg: PretrainConfig, place: RunPlace, info: Any) -> tuple[Any, BaseException | None]:
    """Ray Train's result (None if it never returned) and the error that ended training, if any."""
    result = None
    try:
        if sys.stderr.isatty():
            from pretrain.progress import DriverProgress

            with DriverProgress(cfg.trainer.max_steps, f"{cfg.objective.name} {place.name}") as progress:
                info.progress_queue = progress.queue
                result = build_trainer(cfg, place, info).fit()
        else:
            result = build_trainer(cfg, place, info).fit()
        return result, result.error
    except Exception as exc:  # noqa: BLE001 - Ray Train raises its own error types on worker failure
        return result, exc
    except KeyboardInterrupt as exc:
        return result, exc


def finished_exports(cfg: PretrainConfig, place: RunPlace, uri: str, run_id: str) -> dict[str, str]:
    """{name: URI or path} of a finished run's exports: its MLflow tags, or its export folder without tracking."""
    if run_id:
        from pretrain.export import exports_of_run

        return exports_of_run(uri, run_id)
    from pretrain.export import exports_in_dir

    return exports_in_dir(place.run_dir, cfg.data.storage_options)


def publish(cfg: PretrainConfig, place: RunPlace, uri: str, run_id: str, steps: int) -> dict[str, Any]:
    """Evaluate, log and register the exported encoder; {} if there is none.

    On a multi-node cluster, or with eval.num_gpus, in a Ray task (eval.num_cpus/num_gpus).
    """
    import fsspec
    import ray

    from pretrain.publish import publish_encoder

    fs, path = fsspec.core.url_to_fs(f"{place.run_dir}/export/encoder", **(cfg.data.storage_options or {}))
    if not fs.isdir(path):
        return {}
    kwargs = {"run_dir": place.run_dir, "run_name": place.name, "tracking_uri": uri, "run_id": run_id, "steps": steps}
    if cfg.eval.num_gpus == 0 and len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        # One node (a laptop, one box): this process is on it and the workers have released
        # its cores; a task would only add a fresh interpreter's imports (docs/benchmarks.md).
        log.info("evaluating and registering the encoder")
        return publish_encoder(cfg, **kwargs)
    task = ray.remote(publish_encoder).options(
        num_cpus=cfg.eval.num_cpus,
        num_gpus=cfg.eval.num_gpus,
        runtime_env={"env_vars": worker_env(cfg)},
        max_retries=0,
    )
    log.info("evaluating and registering the encoder in a Ray task")
    return ray.get(task.remote(cfg, **kwargs))


def publish_rows(published: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary lines of the evaluation and the registration."""
    rows = []
    background = published.get("background") or {}
    if background:
        shown = []
        for step, done in background.items():
            score = done if isinstance(done, str) else next(iter(done["encoder"].values()), None)
            shown.append(f"{step}: {score if isinstance(score, str) else f'{100 * score:.1f}%'}")
        rows.append(("eval during", ", ".join(shown)))
    if "error" in published:
        return [*rows, ("publish", f"FAILED: {published['error']}")]
    if "card" not in published:
        return rows
    result = published.get("result")
    if result:
        for key, value in result["encoder"].items():
            base = result["baseline"].get(key)
            versus = f" (random init {100 * base:.1f}%, {100 * (value - base):+.1f} points)" if base is not None else ""
            rows.append((f"eval {key}", f"{100 * value:.1f}%{versus}"))
        rows.append(("eval data", f"fit {result['fit_samples']}, test {result['test_samples']} held out"))
    if "registered" in published:
        rows.append(("registered", published["uri"]))
        if published.get("best_reason"):
            moved = "moved here: " if published.get("best") else ""
            rows.append(("alias best", f"{moved}{published['best_reason']}"))
    rows.append(("model card", published["card"]))
    return rows


def _last_line(error: BaseException) -> str:
    """The line of a (possibly multi-worker) error that says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else repr(error)


def objective_rows(objective: str, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The objective's own metrics of the last report (e.g. vqkd/codebook_usage), 4 significant digits."""
    prefix = f"{objective}/"
    return [(key, f"{value:.4g}") for key, value in sorted(metrics.items()) if key.startswith(prefix)]


def print_summary(
    cfg: PretrainConfig,
    place: RunPlace,
    result: Any,
    error: BaseException | None,
    uri: str,
    run_id: str,
    seconds: float,
    exports: dict[str, str] | None = None,
    published: dict[str, Any] | None = None,
) -> None:
    from pretrain.tracking import run_url

    metrics = (result.metrics if result is not None else None) or {}
    ckpt = result.checkpoint.path if result is not None and result.checkpoint is not None else "see run directory"
    scheme = url_scheme(place.storage_path)
    if scheme != "file" and "://" not in ckpt and ckpt != "see run directory":
        ckpt = f"{scheme}://{ckpt}"
    rows = [
        ("status", "FAILED" if error is not None else "finished"),
        ("objective", cfg.objective.name),
        ("steps", f"{metrics.get('step', 0)}/{cfg.trainer.max_steps}"),
        (
            "loss",
            f"{metrics['loss_first']:.4f} (first logged) -> {metrics['loss']:.4f} (last)"
            if "loss" in metrics
            else "n/a",
        ),
        ("images/s", f"{metrics['images_per_sec']:.1f}" if "images_per_sec" in metrics else "n/a"),
        ("wall time", f"{seconds:.0f} s"),
        *objective_rows(cfg.objective.name, metrics),
        ("mlflow run", run_url(uri, run_id) if run_id else "tracking disabled"),
        ("checkpoint", ckpt),
        *((f"export {name}", where) for name, where in (exports or {}).items()),
        *publish_rows(published or {}),
        ("resume with", f"python -m pretrain.run resume={place.run_dir}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n== pretrain summary ==")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if error is not None:
        print(f"error: {_last_line(error)}")
