"""Metric windows: means over steps and ranks, loader totals, speed, and what rank 0 logs and reports."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pretrain.trainer.metrics import Meter, MetricsLogger, all_max, all_mean, window_metrics

CPU = torch.device("cpu")


def loader(skipped: int = 1, samples: int = 32, retries: int = 2, epoch: int = 3) -> SimpleNamespace:
    return SimpleNamespace(skipped=skipped, samples_seen=samples, io_retries=retries, epoch=epoch)


def test_meter_means() -> None:
    meter = Meter()
    meter.add({"loss": 2.0, "mae/x": 1.0}, 16, 1.0)
    meter.add({"loss": 4.0, "mae/x": 0.0}, 16, 3.0)
    assert meter.means() == {"loss": 3.0, "mae/x": 0.5}
    assert (meter.count, meter.images, meter.seconds) == (2, 32, 4.0)
    assert Meter().means() == {}


def test_window_on_one_process() -> None:
    meter = Meter()
    meter.add({"loss": 2.0, "lr": 0.1}, 16, 1.0)
    meter.add({"loss": 4.0, "lr": 0.2}, 16, 3.0)
    got = window_metrics(meter, loader(), lr=0.2, nonfinite_skipped=1, world=1, device=CPU)
    peak = got.pop("sys/peak_memory_gb")
    assert got == {
        "loss": 3.0,
        "lr": 0.2,  # the last step's, not the window's mean
        "data/skipped": 1.0,
        "data/samples": 32.0,
        "data/io_retries": 2.0,
        "images_per_sec": 8.0,  # 32 images in 4 s
        "data/epoch": 3.0,
        "train/nonfinite_skipped": 1.0,
    }
    assert 0.01 < peak < 1024


def test_window_of_skipped_steps_only_has_a_nan_loss() -> None:
    got = window_metrics(Meter(), loader(), lr=0.5, nonfinite_skipped=2, world=1, device=CPU)
    assert math.isnan(got["loss"]) and got["images_per_sec"] == 0.0 and got["train/nonfinite_skipped"] == 2.0


class RecordingRunLogger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.flushes = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def flush(self) -> None:
        self.flushes += 1


class RecordingQueue:
    def __init__(self) -> None:
        self.items: list[tuple[int, float, float]] = []

    def put_nowait(self, item: tuple[int, float, float]) -> None:
        self.items.append(item)


def test_logger_windows_first_loss_and_report() -> None:
    run_logger, queue = RecordingRunLogger(), RecordingQueue()
    metrics = MetricsLogger(
        rank=0, world=1, device=CPU, max_steps=4, images_per_step=8, lr=1.0, run_logger=run_logger, progress_queue=queue
    )
    metrics.add_step(1, {"loss": 5.0, "lr": 0.5}, 2.0)
    metrics.add_step(2, {"loss": 3.0, "lr": 0.4}, 2.0)
    assert queue.items == [(1, 5.0, 4.0), (2, 3.0, 4.0)]  # 8 images per 2 s
    first = metrics.close_window(2, loader(), 0)
    assert (first["loss"], first["lr"]) == (4.0, 0.4) and metrics.meter.count == 0
    metrics.add_step(3, {"loss": 1.0, "lr": 0.3}, 1.0)
    second = metrics.close_window(3, loader(), 0)
    assert second["loss"] == 1.0
    assert [(step, m["loss"]) for step, m in run_logger.logged] == [(2, 4.0), (3, 1.0)] and run_logger.flushes == 2
    report = metrics.report(3, second)
    assert report["step"] == 3 and report["loss_first"] == 4.0 and report["loss"] == 1.0


def test_other_ranks_push_no_progress() -> None:
    queue = RecordingQueue()
    metrics = MetricsLogger(rank=1, world=2, device=CPU, max_steps=4, images_per_step=8, lr=1.0, progress_queue=queue)
    metrics.add_step(1, {"loss": 5.0, "lr": 0.5}, 2.0)
    assert queue.items == [] and metrics.lr == 0.5


def _two_ranks(rank: int) -> None:
    meter = Meter()
    meter.add({"loss": float(rank + 1)}, 4, 1.0)  # rank 0: 1.0, rank 1: 2.0
    got = window_metrics(
        meter, loader(samples=10 * (rank + 1), skipped=rank), lr=0.1, nonfinite_skipped=0, world=2, device=CPU
    )
    assert got["loss"] == 1.5
    assert (got["data/samples"], got["data/skipped"], got["data/io_retries"]) == (30.0, 1.0, 4.0)  # totals
    assert all_mean({"a": float(rank), "b": 4.0 * rank}, CPU) == {"a": 0.5, "b": 2.0}
    assert all_max(float(rank) - 3.0, CPU) == -2.0


def test_window_over_two_ranks(gloo_ranks: Any) -> None:
    gloo_ranks(_two_ranks, 2)


@pytest.mark.parametrize("values", [{}, {"loss": 2.0}])
def test_all_mean_without_a_group_is_the_identity(values: dict[str, float]) -> None:
    assert all_mean(values, CPU) == values and all_max(3.0, CPU) == 3.0
