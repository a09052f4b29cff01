"""One reader's samples: the shards a (rank, loader worker) reads, shuffled, decoded, augmented.

Who reads what, in epoch `e` (pure functions of the seed, so every rank agrees
without talking):

    order = permutation(shard indices, seed, e)
    rank r, loader worker k   reads   order[r::world_size][k::max(1, num_workers)]

A sample's identity is (shard index in the URL list, index of the sample in its
shard) - independent of who reads it. A reader runs through its shards of epoch
`e`, then of `e + 1`, and so on without end; it leaves out the samples the
`excluded` map lists for an epoch (consumed before a resume that changed the
number of readers, see `data.stream`). The raw bytes pass a shuffle buffer seeded
by (seed, e, rank, reader); only then are they decoded and augmented, with torch
seeded from the sample's identity and epoch, so a sample gets the same views in
epoch `e` whoever reads it. A reader's output is thus a fixed sequence of stream
positions per epoch, and skipping the first `n` positions on resume costs tar
reading only, no decoding.

Bad samples (no image, undecodable, the marker of a truncated or empty shard)
are logged with shard URL and key and not yielded; their identities ride along
with the next good sample (`BAD_FIELD`) so the counting side (`data.stream`)
knows them exactly. So do the storage retries a reader's process made before a
sample (`RETRIES_FIELD`), which the loop logs as `data/io_retries`.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms import v2

from data.decode import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_pixels, image_extension
from data.retry import retries_made
from data.shards import ERROR_FIELD, KEY_FIELD, URL_FIELD, iter_shard
from data.views import make_views

logger = logging.getLogger(__name__)

# Tags keep the seeds of the different random choices independent of each other.
_SHARD_ORDER, _SHUFFLE, _AUGMENT, _MASK = 0, 1, 2, 3
# Hidden per-sample fields: who produced it, where it sits in the reader's stream,
# which sample it is, and the bad samples met since the previous one.
READER_FIELD, EPOCH_FIELD, POSITION_FIELD = "__reader__", "__epoch__", "__pos__"
SHARD_FIELD, INDEX_FIELD, BAD_FIELD = "__shard__", "__index__", "__bad__"
RETRIES_FIELD = "__retries__"  # storage retries this reader's process made since its previous sample

# epoch -> shard index -> bit mask of excluded sample indices (None = the whole shard).
Excluded = dict[int, dict[int, int | None]]

# A reader may draw only bad shards in an epoch and go on to the next; this many
# epochs in a row without one good sample means the data is unusable.
MAX_EMPTY_EPOCHS = 10

T = TypeVar("T")


def derive_seed(*parts: int) -> int:
    """A 64-bit seed that is a pure function of the non-negative ints `parts`."""
    words = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def reader_shards(
    shards: list[T], *, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_readers: int
) -> list[T]:
    """The shards that loader worker `worker` of rank `rank` reads in `epoch`, in reading order."""
    order = list(shards)
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


def is_excluded(excluded: dict[int, int | None], shard: int, index: int) -> bool:
    """Whether sample `index` of `shard` is in an epoch's exclusion map."""
    if shard not in excluded:
        return False
    bits = excluded[shard]
    return bits is None or bool(bits >> index & 1)


class ReaderStream(IterableDataset):
    """Endless samples for one rank; each DataLoader worker plays one reader.

    first_reader: the reader DataLoader worker 0 plays (worker k plays first_reader + k).
    starts: per reader, (epoch, stream positions of that epoch already consumed).
    excluded: per epoch, samples no reader may yield (consumed under another layout).
    mask: None, or `(make_mask, grid)` with `make_mask(grid, generator) -> (N,) bool`.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        storage_options: dict[str, Any],
        io_retries: int,
        io_retry_wait_s: float,
        seed: int,
        rank: int,
        world_size: int,
        num_readers: int,
        first_reader: int,
        starts: list[tuple[int, int]],
        excluded: Excluded,
        buffer_size: int,
        transform: v2.Compose,
        views: int,
        min_decode_size: int | None,
        mask: tuple[Any, tuple[int, int]] | None,
        local: tuple[tuple[v2.Compose, int], ...] = (),
    ) -> None:
        super().__init__()
        self.urls, self.storage_options = urls, storage_options
        self.io_retries, self.io_retry_wait_s = io_retries, io_retry_wait_s
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_readers, self.first_reader, self.starts, self.excluded = num_readers, first_reader, starts, excluded
        self.buffer_size, self.transform, self.views = buffer_size, transform, views
        self.min_decode_size, self.mask, self.local = min_decode_size, mask, local
        self._retries_reported = 0

    def _raw(self, shards: list[int], excluded: dict[int, int | None]) -> Iterator[tuple[int, int, dict[str, Any]]]:
        for shard in shards:
            if shard in excluded and excluded[shard] is None:
                continue
            # Only image bytes are kept: pretraining never reads labels.
            samples = iter_shard(
                self.urls[shard],
                self.storage_options,
                keep=IMAGE_EXTENSIONS,
                retries=self.io_retries,
                retry_wait_s=self.io_retry_wait_s,
            )
            for index, sample in enumerate(samples):
                if not is_excluded(excluded, shard, index):
                    yield shard, index, sample

    def _decode(self, sample: dict[str, Any]) -> Any:
        """The sample's RGB image, or None (after a warning naming shard and key) if it is bad."""
        key, url = sample[KEY_FIELD], sample[URL_FIELD]
        if ERROR_FIELD in sample:
            logger.warning("skipping sample %r in %s: %s", key, url, sample[ERROR_FIELD])
            return None
        ext = image_extension(sample)
        if ext is None:
            logger.warning("skipping sample %r in %s: no image field (%s)", key, url, "/".join(IMAGE_EXTENSIONS))
            return None
        try:
            return decode_pixels(sample[ext], min_size=self.min_decode_size)
        except DECODE_ERRORS as e:
            logger.warning("skipping sample %r in %s: cannot decode its .%s (%s)", key, url, ext, e)
            return None

    def _epoch(self, reader: int, epoch: int, skip: int, bad: list[tuple[int, int, int]]) -> Iterator[dict[str, Any]]:
        """Reader `reader`'s samples of `epoch` after its first `skip` stream positions."""
        shards = reader_shards(
            list(range(len(self.urls))),
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=reader,
            num_readers=self.num_readers,
        )
        excluded = self.excluded.get(epoch, {})
        rng = random.Random(derive_seed(self.seed, epoch, self.rank, reader, _SHUFFLE))
        shuffled = shuffle_buffer(self._raw(shards, excluded), self.buffer_size, rng)
        for position, (shard, index, sample) in itertools.islice(enumerate(shuffled), skip, None):
            image = self._decode(sample)
            if image is None:
                bad.append((epoch, shard, index))
                continue
            item = {
                "views": make_views(
                    image,
                    self.transform,
                    self.views,
                    derive_seed(self.seed, epoch, shard, index, _AUGMENT),
                    extra=self.local,
                ),
                KEY_FIELD: sample[KEY_FIELD],
                READER_FIELD: reader,
                EPOCH_FIELD: epoch,
                POSITION_FIELD: position,
                SHARD_FIELD: shard,
                INDEX_FIELD: index,
                BAD_FIELD: list(bad),
                RETRIES_FIELD: retries_made() - self._retries_reported,
            }
            bad.clear()
            self._retries_reported += item[RETRIES_FIELD]
            if self.mask is not None:
                make_mask, grid = self.mask
                generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, shard, index, _MASK))
                item["mask"] = make_mask(grid, generator)
            yield item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        # DataLoader worker k plays reader first_reader + k, so that worker 0 (the
        # first polled) is the reader whose batch is due next.
        reader = (self.first_reader + (0 if info is None else info.id)) % self.num_readers
        epoch, skip = self.starts[reader]
        self._retries_reported = retries_made()
        bad: list[tuple[int, int, int]] = []  # (epoch, shard, index) of bad samples not yet reported
        empty = 0  # consecutive epochs without a good sample
        while True:
            produced = False
            for item in self._epoch(reader, epoch, skip, bad):
                produced = True
                yield item
            empty = 0 if produced else empty + 1
            if empty >= MAX_EMPTY_EPOCHS:
                # Without this the reader would cycle through epochs forever and the
                # DataLoader, polling workers in turn, would wait on it for good.
                raise RuntimeError(
                    f"loader worker {reader} of rank {self.rank} found no decodable sample in its shards of "
                    f"{empty} epochs in a row ({len(bad)} bad samples); check the data"
                )
            epoch, skip = epoch + 1, 0
