"""torch.distributed for Ray Train's workers, set up without importing torch in the driver or in
Ray Train's controller.

Ray's own `TorchConfig` lives in a module that imports torch at the top: the driver imports it to
build a `TorchTrainer`, and the controller (a fresh interpreter) imports it again when it receives
the config, before it starts the workers (about 3 cpu-s each on a slow 2-core host, both before
step 1; docs/benchmarks.md). The config and backend here keep the controller's side (choose the
rendezvous on rank 0, hand every worker its rank) free of torch; each call on a worker hands over
to Ray's own functions (`ray.train.torch.config`), so the process group itself, NCCL's error
handling included, is set up as `TorchTrainer` sets it up. TPUs (`tpu_dist`) are not handled here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger("pretrain")

# torch.distributed backends this config sets up: gloo for CPU workers, NCCL for GPU workers.
BACKENDS = ("gloo", "nccl")


@dataclass
class ProcessGroupConfig(BackendConfig):
    """Ray Train's backend config for a torch process group: `backend` and `timeout_s` as in Ray's
    `TorchConfig`, its default `env://` rendezvous (MASTER_ADDR/MASTER_PORT)."""

    backend: str = "gloo"
    timeout_s: int = 1800

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"process group backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")

    @classmethod
    def for_devices(cls, use_gpu: bool) -> ProcessGroupConfig:
        """NCCL between GPU workers, gloo between CPU workers (as `TorchTrainer` picks)."""
        return cls(backend="nccl" if use_gpu else "gloo")

    @property
    def backend_cls(self) -> type[Backend]:
        return ProcessGroupBackend

    @property
    def train_func_context(self) -> type:
        return CurrentDevice

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class ProcessGroupBackend(Backend):
    """Runs in Ray Train's controller: rank 0's address and a free port as the rendezvous, then
    every worker joins the process group with its rank."""

    share_cuda_visible_devices = True  # as Ray's torch backend: NCCL needs to see the peers' GPUs

    def on_start(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        address, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_rendezvous_env, address=address, port=port)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join_process_group,
                    backend=backend_config.backend,
                    world_rank=rank,
                    world_size=len(worker_group),
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )

    def on_shutdown(self, worker_group: Any, backend_config: ProcessGroupConfig) -> None:
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import (
            DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
        )

        timeout_s = int(
            os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        )
        futures = worker_group.execute_async(_leave_process_group, destroy=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            log.warning("the torch process group's shutdown timed out after %d s", timeout_s)


# On the workers (they import torch anyway): Ray's own functions.


def _rendezvous_env(address: str, port: int) -> None:
    """MASTER_ADDR/MASTER_PORT and torchrun's RANK, LOCAL_RANK, WORLD_SIZE, ... variables."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)
    _set_torch_distributed_env_vars()


def _join_process_group(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(backend, world_rank, world_size, "env://", timeout_s)


def _leave_process_group(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)


class CurrentDevice:
    """Around the training function on each worker: its GPU (if any) as torch's current device."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        TorchConfigContextManager().__enter__()

    def __exit__(self, *exc: object) -> bool:
        return False
