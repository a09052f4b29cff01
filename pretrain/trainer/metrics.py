"""Step metrics: a window of steps between two log points, reduced over ranks, logged by rank 0.

Rank 0 sends each window to MLflow, and writes a log line when the driver shows no
progress bar; every step's loss and speed go to the driver's bar (`pretrain.progress`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

from pretrain.progress import push

log = logging.getLogger("pretrain.worker")

# Loader counters summed over ranks in each window's metrics.
LOADER_COUNTS = {"data/skipped": "skipped", "data/samples": "samples_seen", "data/io_retries": "io_retries"}


class Meter:
    """Averages of step metrics between two log points."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self.seconds = 0.0

    def add(self, metrics: dict[str, float], images: int, seconds: float) -> None:
        """One finished (not skipped) step's metrics, images and wall time."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.images += images
        self.seconds += seconds

    def means(self) -> dict[str, float]:
        """Each metric's mean over the steps added; {} when none was."""
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


def all_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce)."""
    import torch.distributed as dist

    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def all_max(value: float, device: torch.device) -> float:
    """The largest `value` over ranks."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory so far: allocated on the GPU, or resident on the CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unit = 1 if sys.platform == "darwin" else 2**10  # ru_maxrss is in bytes on macOS, KiB on Linux
    return peak * unit / 2**30


def window_metrics(
    meter: Meter, loader: Any, *, lr: float, nonfinite_skipped: int, world: int, device: torch.device
) -> dict[str, float]:
    """The logged metrics of one window: step means over steps and ranks, loader totals, speed, memory.

    All ranks call it (collectives). `loss` is NaN when every step of the window was skipped.
    """
    counts = {key: float(getattr(loader, attr)) for key, attr in LOADER_COUNTS.items()}
    metrics = all_mean({**meter.means(), **counts}, device)
    for key in counts:  # totals over ranks
        metrics[key] = float(round(metrics[key] * world))
    metrics["lr"] = lr  # same on every rank; not an average over the window
    metrics["images_per_sec"] = meter.images / max(meter.seconds, 1e-9)
    metrics["data/epoch"] = float(loader.epoch)
    metrics["train/nonfinite_skipped"] = float(nonfinite_skipped)
    metrics["sys/peak_memory_gb"] = all_max(peak_memory_gb(device), device)  # the fullest worker
    metrics.setdefault("loss", float("nan"))
    return metrics


class MetricsLogger:
    """Collects step metrics into windows; rank 0 logs each window (MLflow, log line) and feeds the progress bar."""

    def __init__(
        self,
        *,
        rank: int,
        world: int,
        device: torch.device,
        max_steps: int,
        images_per_step: int,
        lr: float,
        run_logger: Any = None,
        progress_queue: Any = None,
    ) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.max_steps = max_steps
        self.images_per_step = images_per_step
        self.lr = lr  # of the last finished step
        self.run_logger = run_logger  # a pretrain.tracking.RunLogger on rank 0 when tracking is on
        self.progress_queue = progress_queue
        self.meter = Meter()
        self.first_loss: float | None = None

    def add_step(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """A finished step's metrics (skipped steps add none)."""
        self.lr = metrics["lr"]
        self.meter.add(metrics, self.images_per_step, seconds)
        if self.rank == 0:
            rate = self.images_per_step / max(self.meter.seconds / self.meter.count, 1e-9)
            push(self.progress_queue, step, metrics["loss"], rate)

    def close_window(self, step: int, loader: Any, nonfinite_skipped: int) -> dict[str, float]:
        """All ranks: reduce the window ending at `step`, log it on rank 0, start the next; returns its metrics."""
        metrics = window_metrics(
            self.meter, loader, lr=self.lr, nonfinite_skipped=nonfinite_skipped, world=self.world, device=self.device
        )
        self.meter = Meter()
        self.first_loss = metrics["loss"] if self.first_loss is None else self.first_loss
        if self.run_logger is not None:
            self.run_logger.log_metrics(metrics, step)
            self.run_logger.flush()
        if self.rank == 0 and self.progress_queue is None:
            log.info(
                "step %d/%d loss %.4f lr %.3g %.1f img/s",
                step,
                self.max_steps,
                metrics["loss"],
                self.lr,
                metrics["images_per_sec"],
            )
        return metrics

    def report(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """What goes to ray.train.report with a window's checkpoint (the driver's summary reads the last)."""
        return {"step": step, "loss_first": self.first_loss, **metrics}
