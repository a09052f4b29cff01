"""This rank's data streams: the training loader, and the objective's `prepare` loader (another seed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.config import PretrainConfig, mask_unit

if TYPE_CHECKING:
    from data.stream import ResumableLoader


def train_urls(cfg: PretrainConfig, train_url: str) -> list[str]:
    """The shard URLs of `train_url` ("" = the embedded default dataset, written on first use)."""
    from data.default import ensure_default_dataset
    from data.stream import resolve_urls

    url = train_url or ensure_default_dataset(cfg.data).train_url
    return resolve_urls(
        url, cfg.data.storage_options, retries=cfg.data.io_retries, retry_wait_s=cfg.data.io_retry_wait_s
    )


def build_loader(cfg: PretrainConfig, urls: list[str], *, rank: int, world_size: int, seed: int) -> ResumableLoader:
    """A resumable loader of what the objective asks for, over this rank's share of `urls`."""
    from data.stream import build_train_loader
    from objectives.registry import get_objective_class

    return build_train_loader(
        cfg.data,
        get_objective_class(cfg.objective.name).data_needs(cfg.objective),
        urls=urls,
        img_size=cfg.model.img_size,
        batch_size=cfg.trainer.batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        patch_size=mask_unit(cfg.model),
    )
