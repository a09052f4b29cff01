"""Typed configuration of the data pipeline (the `data` config group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    """Where the shards are and how they become model inputs."""

    # Brace pattern ("s3://b/train-{000000..000099}.tar"), a comma-free list is not
    # supported; or the URL of a manifest.json written by the shard writer.
    # Empty = the embedded default dataset, generated on first use into `cache_dir`.
    urls: str = ""
    # Held-out labelled split for evaluation (empty = the embedded default's eval split).
    eval_urls: str = ""
    # Where the embedded default dataset is generated ("" = $PRETRAIN_CACHE or
    # ~/.cache/pretrain).
    cache_dir: str = ""
    # Passed to fsspec when opening shards (e.g. {"client_kwargs": {"endpoint_url": ...}}).
    storage_options: dict[str, Any] = field(default_factory=dict)
    # DataLoader worker processes per training worker (decode happens there).
    num_workers: int = 1
    # Samples held in the shuffle buffer per loader worker.
    shuffle_buffer: int = 512
    # RandomResizedCrop scale lower bound (MAE main_pretrain.py: 0.2).
    crop_scale_min: float = 0.2
    hflip: bool = True
    # Normalisation (ImageNet statistics, as timm/MAE use).
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # Size of the embedded default dataset (procedural shapes).
    default_train_samples: int = 4096
    default_eval_samples: int = 1024
    default_shard_size: int = 512
