"""Typed configuration of the data pipeline (the `data` config group)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# fsspec protocols accepted for shard URLs (the caching ones only in a chain such as
# "simplecache::s3://...") and for the checkpoint storage path.
DATA_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs", "http", "https", "hf", "simplecache", "filecache")
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "az", "abfs")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def url_scheme(url: str) -> str:
    """fsspec protocol of a URL ("s3://b/x" -> "s3", "pipe:cmd" -> "pipe"); plain paths are "file"."""
    match = _SCHEME.match(url)
    # One letter before ':' is a Windows drive, not a scheme.
    return match.group(1).lower() if match and len(match.group(1)) > 1 else "file"


def unsupported_scheme(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why `url` (possibly an fsspec chain "a::b://...") is refused, or None if every scheme is allowed."""
    for part in url.split("::"):
        scheme = url_scheme(part)
        if scheme not in allowed:
            return f"unsupported scheme {scheme!r} in {url!r}; valid schemes: {', '.join(allowed)}"
    return None


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
    # Transient storage errors (connection refused/reset, timeouts, throttling, 5xx)
    # are retried up to this many times in a row (every sample read refills the
    # budget) with exponential backoff from io_retry_wait_s (doubling, capped at
    # 30 s), re-opening the shard where it broke; then the run stops with an error
    # naming the URL. 6 retries from 0.5 s wait 31.5 s, plus botocore's own attempts.
    io_retries: int = 6
    io_retry_wait_s: float = 0.5
    # Bad samples (undecodable, no image, truncated or empty shard) are skipped,
    # counted (data/skipped) and logged; the run aborts once more than this fraction
    # of the samples read by a rank were bad (checked once 1000 samples were read).
    max_skipped_fraction: float = 0.05
    # JPEG fast path: decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when an
    # image is so large that every possible crop still has >= img_size pixels on each
    # side (no resolution loss; see docs/data.md).
    fast_decode: bool = True
    default_train_samples: int = 4096
    default_eval_samples: int = 1024
    default_shard_size: int = 512
