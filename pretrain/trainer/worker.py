"""The Ray Train entry point on every worker, and what the driver hands it."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class RunInfo:
    """What the driver hands every worker besides the config."""

    train_url: str  # "" = the embedded default dataset
    tracking_uri: str  # "" = no MLflow logging
    mlflow_run_id: str
    run_dir: str = ""  # <storage_path>/<name>: exports go to <run_dir>/export/
    progress_queue: Any = None  # a ray.util.queue.Queue when the driver shows a progress bar
    evaluator: Any = None  # a BackgroundEvaluator actor when eval.every_steps > 0


class CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever `sys.stderr` is when a record is emitted.

    A plain StreamHandler keeps the stream it was made with; in a driver whose stderr is swapped
    later (pytest's capture, a notebook) it would write to a closed stream ("--- Logging error ---").
    """

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns one; the property wins
        pass


def configure_logging() -> None:
    """INFO lines from this project's loggers (pretrain.*, data.*, objectives.*) only."""
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("pretrain", "data", "objectives"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False
    # botocore says at INFO where it found credentials and the endpoint, per client.
    for name in ("botocore", "aiobotocore", "s3fs"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report at INFO (on a logger named after its file path)."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):  # other Ray versions: only noise is at stake
        pass


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point on each worker: `{"cfg": PretrainConfig, "info": RunInfo, "env":
    variables}` -> a trained, exported run. The variables are set first, before anything that
    reads them is imported (`pretrain.launch.split_worker_env`: on a Ray instance the driver
    started they come here rather than in a runtime environment)."""
    os.environ.update(loop_config.get("env") or {})
    import ray.train
    import ray.train.torch

    from pretrain.trainer.faults import fault_hooks
    from pretrain.trainer.trainer import Trainer

    configure_logging()
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    trainer = Trainer(
        loop_config["cfg"],
        loop_config["info"],
        rank=rank,
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        hooks=fault_hooks(rank),  # [] unless a test or drill sets the fault variables
    )
    trainer.train()
