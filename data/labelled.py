"""Labelled evaluation images: shards with `.cls` -> centre-cropped, normalised tensors and int labels.

The evaluation transform is the usual one for frozen-feature protocols (timm/DeiT
eval, DINO's kNN): resize the short side to `img_size / crop_pct` (bicubic,
antialiased), centre-crop `img_size`, scale to [0, 1], normalise per channel.

Samples are read in shard order (deterministic); shards are split over DataLoader
workers. A bad sample (damaged shard, no image, undecodable, no or non-integer
`.cls`) is skipped, logged with shard and key, and counted (each batch says how many).
`holdout_split` assigns a sample to the held-out part by a hash of its key, so a
split is the same on every machine and for every model.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from data.decode import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_pixels, image_extension
from data.shards import ERROR_FIELD, KEY_FIELD, URL_FIELD, iter_shard

logger = logging.getLogger(__name__)

LABEL_FIELD = "cls"


def holdout_split(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether sample `key` belongs to the held-out `fraction` (a stable hash of seed and key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def eval_transform(pixels: torch.Tensor, img_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float]):
    """(3, H, W) uint8 -> (3, img_size, img_size) float32: resize short side to img_size/crop_pct, centre crop, normalise."""
    resize = max(img_size, math.floor(img_size / crop_pct))
    x = TF.resize(pixels, [resize], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [img_size, img_size])
    x = x.float().div_(255.0).clamp_(0.0, 1.0)
    return TF.normalize(x, list(mean), list(std))


class _LabelledStream(IterableDataset):
    def __init__(
        self,
        urls: Sequence[str],
        storage_options: dict[str, Any] | None,
        *,
        img_size: int,
        crop_pct: float,
        mean: Sequence[float],
        std: Sequence[float],
        holdout: tuple[float, bool, int] | None,
        io_retries: int,
        io_retry_wait_s: float,
    ) -> None:
        self.urls = list(urls)
        self.storage_options = storage_options or {}
        self.img_size, self.crop_pct, self.mean, self.std = img_size, crop_pct, list(mean), list(std)
        self.holdout = holdout  # (fraction, keep_held_out, seed) or None = every sample
        self.io_retries, self.io_retry_wait_s = io_retries, io_retry_wait_s

    def _sample(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int] | None:
        key, url = sample[KEY_FIELD], sample[URL_FIELD]
        if ERROR_FIELD in sample:
            logger.warning("skipping sample %r in %s: %s", key, url, sample[ERROR_FIELD])
            return None
        ext = image_extension(sample)
        raw_label = sample.get(LABEL_FIELD)
        try:
            label = int(raw_label.decode()) if raw_label is not None else None
        except (UnicodeDecodeError, ValueError):
            label = None
        if ext is None or label is None or label < 0:
            what = "no image field" if ext is None else f"no integer .{LABEL_FIELD} label (got {raw_label!r:.40})"
            logger.warning("skipping sample %r in %s: %s", key, url, what)
            return None
        try:
            pixels = decode_pixels(sample[ext])
        except DECODE_ERRORS as e:
            logger.warning("skipping sample %r in %s: cannot decode its .%s (%s)", key, url, ext, e)
            return None
        return eval_transform(pixels, self.img_size, self.crop_pct, self.mean, self.std), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, bool]]:
        info = get_worker_info()
        shards = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for url in shards:
            for sample in iter_shard(
                url,
                self.storage_options,
                keep=(*IMAGE_EXTENSIONS, LABEL_FIELD),
                retries=self.io_retries,
                retry_wait_s=self.io_retry_wait_s,
            ):
                if self.holdout is not None and sample[KEY_FIELD]:
                    fraction, keep_held_out, seed = self.holdout
                    if holdout_split(sample[KEY_FIELD], fraction, seed) != keep_held_out:
                        continue
                item = self._sample(sample)
                # A bad sample is passed on as a marker so the main process can count it.
                yield (item[0], item[1], True) if item is not None else (torch.empty(0), -1, False)


def _collate(items: list[tuple[torch.Tensor, int, bool]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [(x, y) for x, y, ok in items if ok]
    images = torch.stack([x for x, _ in good]) if good else torch.empty(0)
    return images, torch.tensor([y for _, y in good], dtype=torch.int64), len(items) - len(good)


@dataclass
class LabelledSource:
    """Where a labelled set is and how to read it (see `labelled_batches`)."""

    urls: Sequence[str]
    storage_options: dict[str, Any] | None = None
    # (fraction, keep_held_out, seed): keep the held-out `fraction` of keys (True) or the rest.
    holdout: tuple[float, bool, int] | None = None
    max_samples: int = 0  # 0 = all
    io_retries: int = 6
    io_retry_wait_s: float = 0.5


def labelled_batches(
    source: LabelledSource,
    *,
    img_size: int,
    crop_pct: float,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    num_workers: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Batches (images (B, 3, S, S), labels (B,), bad samples skipped) of `source`, in shard order.

    Stops after `source.max_samples` good samples (0 = all). Images are streamed, never
    all held in memory, so a caller can keep only their features.
    """
    stream = _LabelledStream(
        source.urls,
        source.storage_options,
        img_size=img_size,
        crop_pct=crop_pct,
        mean=mean,
        std=std,
        holdout=source.holdout,
        io_retries=source.io_retries,
        io_retry_wait_s=source.io_retry_wait_s,
    )
    workers = min(num_workers, len(stream.urls))
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    left = source.max_samples or -1
    for images, labels, bad in loader:
        if left >= 0 and images.shape[0] >= left:
            yield images[:left], labels[:left], bad
            return
        left -= images.shape[0] if left >= 0 else 0
        yield images, labels, bad


def empty_message(source: LabelledSource, skipped: int) -> str:
    """The one-line error for a labelled set without one good sample."""
    first = source.urls[0] if source.urls else "-"
    return (
        f"no labelled samples in {len(source.urls)} shard(s) starting {first!r} ({skipped} skipped); "
        f"evaluation needs shards whose samples have an image and an integer .{LABEL_FIELD} label"
    )
