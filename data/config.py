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
    # Size of the embedded default dataset (procedural shapes).
    default_train_samples: int = 4096
    default_eval_samples: int = 1024
    default_shard_size: int = 512


def data_problems(d: DataConfig) -> list[tuple[str, str]]:
    """Config mistakes of the `data` node that need no I/O: (key, message) pairs, in order."""
    checks = []
    for key in ("urls", "eval_urls"):
        url = getattr(d, key)
        bad_url = unsupported_scheme(url, DATA_SCHEMES) if url else None
        checks.append((bad_url is None, f"data.{key}", bad_url or ""))
    checks += [
        (d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}"),
        (d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {d.shuffle_buffer}"),
        (0.0 < d.crop_scale_min <= 1.0, "data.crop_scale_min", f"must be in (0, 1], got {d.crop_scale_min}"),
        (len(d.mean) == 3 and len(d.std) == 3, "data.mean", "data.mean and data.std need 3 values (RGB)"),
        (d.io_retries >= 0, "data.io_retries", f"must be >= 0, got {d.io_retries}"),
        (d.io_retry_wait_s >= 0, "data.io_retry_wait_s", f"must be >= 0, got {d.io_retry_wait_s}"),
        (
            0.0 <= d.max_skipped_fraction <= 1.0,
            "data.max_skipped_fraction",
            f"must be in [0, 1], got {d.max_skipped_fraction}",
        ),
        (d.default_shard_size >= 1, "data.default_shard_size", f"must be >= 1, got {d.default_shard_size}"),
    ]
    return [(key, message) for holds, key, message in checks if not holds]
