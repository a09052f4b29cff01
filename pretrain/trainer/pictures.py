"""The objective's pictures (reconstructions, masks, token maps...) of one fixed batch, logged to MLflow.

The batch is the first one the run trained on, kept aside: every `trainer.pictures_every`
steps the same images are drawn again and logged with their step (MLflow's image series,
`key=pictures/<name>`), so the UI shows them change as training goes; the last drawing is
also `pictures/<name>.png`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from pretrain.trainer.step import to_device

log = logging.getLogger("pretrain.worker")


def remember_first(batches: Iterator[dict[str, Any]], kept: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`batches` unchanged, with a copy of the first one appended to `kept` (the pictures' batch)."""
    for n, batch in enumerate(batches):
        if n == 0:
            kept.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        yield batch


def draw_pictures(
    engine: Any,
    batch: dict[str, Any],
    *,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    logger: Any,
    step: int,
    final: bool = False,
) -> None:
    """The objective's pictures of one batch (every rank: ZeRO-3 gathers collectively), logged by rank 0."""
    objective = engine.module
    objective.eval()
    # Drawing must not move the training's random streams (exact resume compares them).
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices):
            pictures = objective.pictures(to_device(batch, device, dtype))
    except Exception as exc:  # noqa: BLE001 - a picture must not fail a finished run; say why there is none
        log.warning("rank %d: no pictures (%s: %s)", rank, type(exc).__name__, exc)
        pictures = {}
    finally:
        objective.train()
    if logger is not None:
        for name, image in pictures.items():
            logger.client.log_image(logger.run_id, image, key=f"pictures/{name}", step=step)
            if final:
                logger.client.log_image(logger.run_id, image, f"pictures/{name}.png")
        if pictures:
            log.info("logged pictures at step %d: %s", step, ", ".join(sorted(pictures)))
