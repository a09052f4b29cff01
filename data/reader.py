"""One reader's samples: the shards a (rank, loader worker) reads, shuffled, decoded, augmented.

Who reads what, in epoch `e` (pure functions of the seed, so every rank agrees
without talking):

    order = permutation(shards, seed, e)
    rank r, loader worker k   reads   order[r::world_size][k::max(1, num_workers)]

A reader streams its shards' raw bytes through a shuffle buffer seeded by
(seed, e, r, k); only then does it decode and augment, seeding torch per sample
from (seed, e, r, k, position). Its output is therefore a fixed sequence, and
skipping its first `n` positions on resume costs tar reading only, no decoding.
Bad samples (no image, undecodable) are logged with shard URL and key and
skipped; the positions they occupied reveal them to the counting side
(`data.stream`).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2

from data.decode import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_rgb, image_extension
from data.shards import KEY_FIELD, URL_FIELD, iter_shard
from data.views import make_views

logger = logging.getLogger(__name__)

# Tags keep the seeds of the different random choices independent of each other.
_SHARD_ORDER, _SHUFFLE, _AUGMENT = 0, 1, 2
# Hidden per-sample fields: which reader produced it, at which stream position.
READER_FIELD, POSITION_FIELD = "__worker__", "__pos__"

T = TypeVar("T")


def derive_seed(*parts: int) -> int:
    """A 64-bit seed that is a pure function of the non-negative ints `parts`."""
    words = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def reader_shards(
    urls: list[str], *, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_readers: int
) -> list[str]:
    """The shards that loader worker `worker` of rank `rank` reads in `epoch`, in reading order."""
    order = list(urls)
    random.Random(derive_seed(seed, epoch, _SHARD_ORDER)).shuffle(order)
    return order[rank::world_size][worker::num_readers]


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Approximate shuffle with a buffer of `size` items: emit a random buffered item per arrival."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class ReaderStream(IterableDataset):
    """One epoch of samples for one rank; each DataLoader worker plays one reader.

    first_reader: the reader DataLoader worker 0 plays (worker k plays first_reader + k).
    skip: per reader, how many leading stream positions were already consumed.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        storage_options: dict[str, Any],
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        num_readers: int,
        first_reader: int,
        skip: list[int],
        buffer_size: int,
        transform: v2.Compose,
        views: int,
    ) -> None:
        super().__init__()
        self.urls, self.storage_options = urls, storage_options
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.num_readers, self.first_reader, self.skip = num_readers, first_reader, skip
        self.buffer_size, self.transform, self.views = buffer_size, transform, views

    def _raw(self, shards: list[str]) -> Iterator[dict[str, Any]]:
        for url in shards:
            # Only image bytes are kept: pretraining never reads labels.
            yield from iter_shard(url, self.storage_options, keep=IMAGE_EXTENSIONS)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # DataLoader worker k plays reader first_reader + k, so that worker 0 (the
        # first polled) is the reader whose batch is due next.
        reader = (self.first_reader + (0 if info is None else info.id)) % self.num_readers
        shards = reader_shards(
            self.urls,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=reader,
            num_readers=self.num_readers,
        )
        rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, reader, _SHUFFLE))
        shuffled = shuffle_buffer(self._raw(shards), self.buffer_size, rng)
        for position, sample in itertools.islice(enumerate(shuffled), self.skip[reader], None):
            key, url = sample[KEY_FIELD], sample[URL_FIELD]
            ext = image_extension(sample)
            if ext is None:
                logger.warning("skipping sample %r in %s: no image field (%s)", key, url, "/".join(IMAGE_EXTENSIONS))
                continue
            try:
                image = decode_rgb(sample[ext])
            except DECODE_ERRORS as e:
                logger.warning("skipping sample %r in %s: cannot decode its .%s (%s)", key, url, ext, e)
                continue
            seed = derive_seed(self.seed, self.epoch, self.rank, reader, position, _AUGMENT)
            yield {
                "views": make_views(image, self.transform, self.views, seed),
                KEY_FIELD: key,
                READER_FIELD: reader,
                POSITION_FIELD: position,
            }
