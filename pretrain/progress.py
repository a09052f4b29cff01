"""User feedback while training: a progress bar in the driver's terminal.

Rank 0 pushes (step, loss, images/s) into a Ray queue; a thread in the driver turns
them into a tqdm bar. Without a terminal, rank 0 writes plain periodic log lines
instead (see `pretrain.trainer.metrics`).
"""

from __future__ import annotations

import queue as std_queue
import threading
from typing import Any


class DriverProgress:
    """A tqdm bar in the driver fed by rank 0 through a `ray.util.queue.Queue`."""

    def __init__(self, total: int, desc: str) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=10_000)
        self._total, self._desc = total, desc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pretrain-progress", daemon=True)

    def __enter__(self) -> DriverProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.queue.shutdown()

    def _run(self) -> None:
        from tqdm import tqdm

        with tqdm(total=self._total, desc=self._desc, unit="step", dynamic_ncols=True) as bar:
            while not self._stop.is_set():
                try:
                    step, loss, rate = self.queue.get(timeout=0.5)
                except (std_queue.Empty, Exception):  # noqa: BLE001 - ray's Empty and a closing actor
                    continue
                bar.n = step
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", refresh=False)
                bar.refresh()


def push(progress_queue: Any, step: int, loss: float, images_per_sec: float) -> None:
    """Rank 0: report progress without ever blocking training."""
    if progress_queue is None:
        return
    try:
        progress_queue.put_nowait((step, loss, images_per_sec))
    except Exception:  # noqa: BLE001 - a full or closed queue only loses a bar update
        pass
