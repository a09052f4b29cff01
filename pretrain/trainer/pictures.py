"""The objective's pictures of one batch after training (reconstructions, masks...), logged to MLflow."""

from __future__ import annotations

import logging
from typing import Any

import torch

from pretrain.trainer.step import to_device

log = logging.getLogger("pretrain.worker")


def draw_pictures(
    engine: Any, batch: dict[str, Any], *, rank: int, device: torch.device, dtype: torch.dtype, logger: Any
) -> None:
    """The objective's pictures of one batch (every rank: ZeRO-3 gathers collectively), logged by rank 0."""
    objective = engine.module
    objective.eval()
    try:
        with torch.no_grad():
            pictures = objective.pictures(to_device(batch, device, dtype))
    except Exception as exc:  # noqa: BLE001 - a picture must not fail a finished run; say why there is none
        log.warning("rank %d: no pictures (%s: %s)", rank, type(exc).__name__, exc)
        pictures = {}
    finally:
        objective.train()
    if logger is not None:
        for name, image in pictures.items():
            logger.client.log_image(logger.run_id, image, f"pictures/{name}.png")
        if pictures:
            log.info("logged pictures: %s", ", ".join(sorted(pictures)))
