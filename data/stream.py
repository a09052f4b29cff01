"""The training stream: URLs -> endless, resumable batches of augmented views for one rank.

What each (rank, loader worker) pair - a *reader* - reads and produces is in
`data.reader`. Here: batches come from one reader each (the DataLoader collates
inside its worker) and are yielded round-robin over readers; a reader that runs
out leaves the rotation, and when all have run out the epoch ends and epoch e+1
starts with a fresh DataLoader, so the stream never stops and no batch mixes
epochs. The tail of a reader that does not fill a whole batch is dropped
(`drop_last`), so every batch has `batch_size` samples; the shuffle buffer
drops different samples each epoch.

The position is counted in the main process when a batch is handed to the
training loop: per reader, the stream positions consumed, plus which reader's
batch comes next. Resuming starts a DataLoader whose worker 0 plays that next
reader, with every reader skipping what was consumed, so the batches that
follow are bit-identical to an uninterrupted run.

`state_dict()` (plain Python types; torch.load(weights_only=True) reads it back):

    {"version": 1, "seed": int, "rank": int, "world_size": int,
     "num_readers": int,        # max(1, data.num_workers)
     "num_shards": int,
     "epoch": int,              # epoch of the last consumed batch
     "next_reader": int,        # reader whose batch is due next
     "positions": [int, ...],   # per reader: stream positions consumed this epoch
     "skipped": int,            # bad samples skipped so far (all epochs)
     "samples_seen": int}       # samples handed to the loop so far (all epochs)

Resuming needs the same seed, world size, num_readers and shard count (checked).
Bad samples are counted from the positions a batch spans beyond its own
samples, so the count is exact up to the last consumed batch; bad samples in an
epoch's dropped tail are logged (by the worker) but not counted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import fsspec
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from data.config import DataConfig
from data.manifest import read_manifest
from data.reader import POSITION_FIELD, READER_FIELD, ReaderStream
from data.views import build_view_transform

if TYPE_CHECKING:
    from objectives.base import DataNeeds

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def check_url(url: str) -> None:
    """Raise ValueError if `url`'s scheme is not an fsspec protocol (no I/O)."""
    for part in url.split("::"):  # fsspec chaining: "simplecache::s3://..."
        match = _SCHEME.match(part)
        # One letter before ':' is a Windows drive, not a scheme.
        scheme = match.group(1).lower() if match and len(match.group(1)) > 1 else "file"
        if scheme not in fsspec.available_protocols():
            raise ValueError(
                f"unsupported URL scheme {scheme!r} in {url!r}; use a local path or an fsspec URL "
                "(file://, s3://, gs://, https://, ...)"
            )


def resolve_urls(urls: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Shard URLs of `urls`: a manifest (`*.json`) or a brace pattern (`.../train-{000000..000099}.tar`)."""
    urls = urls.strip()
    if not urls:
        raise ValueError("data.urls is empty; give a manifest URL or a brace pattern of shard URLs")
    if urls.endswith(".json"):
        check_url(urls)
        return read_manifest(urls, storage_options).shard_urls()
    expanded = list(braceexpand(urls))
    for url in expanded:
        check_url(url)
    return expanded


class ResumableLoader:
    """Endless iterator of augmented batches with an exact, checkpointable position.

    Yields `{"views": [Tensor (B, 3, S, S)] * needs.views, "__key__": [str] * B}`.
    `state_dict()` after taking a batch covers that batch; `load_state_dict` on a
    fresh loader makes the next batch the one that would have followed.
    Skipped bad samples are counted in `skipped` (exactly, up to the last consumed
    batch; bad samples in a dropped epoch tail are logged but not counted).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        cfg: DataConfig,
        views: int,
        img_size: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        if not urls:
            raise ValueError("no shard URLs to read; check data.urls")
        if views < 1:
            raise ValueError(f"the objective asked for {views} views; need >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if cfg.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_readers = max(1, cfg.num_workers)
        if len(urls) < world_size * self.num_readers:
            raise ValueError(
                f"{len(urls)} shards cannot feed world_size {world_size} x {self.num_readers} loader workers = "
                f"{world_size * self.num_readers} readers; write more/smaller shards or lower data.num_workers"
            )
        self.urls, self.cfg, self.views = list(urls), cfg, views
        self.img_size, self.batch_size = img_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._transform = build_view_transform(cfg, img_size)
        self._epoch = 0
        self._positions = [0] * self.num_readers
        self._next_reader = 0
        self._skipped = 0
        self._samples_seen = 0
        self._active: Generator[dict[str, Any], None, None] | None = None

    @property
    def epoch(self) -> int:
        """Epoch of the most recently yielded batch."""
        return self._epoch

    @property
    def skipped(self) -> int:
        """Bad samples (no image, undecodable) skipped so far by this rank."""
        return self._skipped

    @property
    def samples_seen(self) -> int:
        """Samples handed to the training loop so far by this rank, over all epochs."""
        return self._samples_seen

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # One live iteration at a time: a new one continues from the consumed position.
        self.close()
        self._active = self._batches()
        return self._active

    def close(self) -> None:
        """Stop the live iteration (and its DataLoader workers), if any."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _epoch_loader(self) -> DataLoader:
        dataset = ReaderStream(
            self.urls,
            storage_options=dict(self.cfg.storage_options),
            seed=self.seed,
            epoch=self._epoch,
            rank=self.rank,
            world_size=self.world_size,
            num_readers=self.num_readers,
            first_reader=self._next_reader,
            skip=list(self._positions),
            buffer_size=self.cfg.shuffle_buffer,
            transform=self._transform,
            views=self.views,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
            # in_order: batches come round-robin over workers, which resume relies on.
            in_order=True,
            # The base seed comes from here, not from the global torch RNG; workers reseed per sample anyway.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        while True:
            fresh = not any(self._positions)
            delivered = 0
            for batch in self._epoch_loader():
                reader = int(batch.pop(READER_FIELD)[0])
                positions = batch.pop(POSITION_FIELD)  # (B,) stream positions within the reader
                end = int(positions[-1]) + 1
                # Positions passed without a sample in this batch were bad samples.
                self._skipped += end - self._positions[reader] - len(positions)
                self._positions[reader] = end
                self._next_reader = (reader + 1) % self.num_readers
                self._samples_seen += len(positions)
                delivered += 1
                yield batch
            if fresh and delivered == 0:
                raise RuntimeError(
                    f"epoch {self._epoch} of rank {self.rank} produced no full batch: its {self.num_readers} "
                    f"loader workers each got fewer than batch_size={self.batch_size} decodable samples from "
                    f"{len(self.urls)} shards; use more data, a smaller batch or fewer data.num_workers"
                )
            self._epoch += 1
            self._positions = [0] * self.num_readers
            self._next_reader = 0

    def state_dict(self) -> dict[str, Any]:
        """The position after the last yielded batch, as plain Python types (safe for weights_only loads)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_readers": self.num_readers,
            "num_shards": len(self.urls),
            "epoch": self._epoch,
            "next_reader": self._next_reader,
            "positions": list(self._positions),
            "skipped": self._skipped,
            "samples_seen": self._samples_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the batch at which `state` was taken (stops a live iteration)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"data position has version {got!r}; this code reads version {STATE_VERSION}")
        saved = {k: state.get(k) for k in ("seed", "rank", "world_size", "num_readers", "num_shards")}
        here = {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_readers": self.num_readers,
            "num_shards": len(self.urls),
        }
        if saved != here:
            diff = ", ".join(f"{k}: saved {saved[k]} != now {here[k]}" for k in here if saved[k] != here[k])
            raise ValueError(
                f"cannot resume the data position: {diff} (num_readers = max(1, data.num_workers)); resume "
                "with the same seed, world size, data.num_workers and shards"
            )
        positions = state["positions"]
        if len(positions) != self.num_readers or any(not isinstance(p, int) or p < 0 for p in positions):
            raise ValueError(f"data position has bad positions {positions!r}; expected {self.num_readers} ints >= 0")
        self.close()
        self._epoch = int(state["epoch"])
        self._positions = list(positions)
        self._next_reader = int(state["next_reader"]) % self.num_readers
        self._skipped = int(state["skipped"])
        self._samples_seen = int(state["samples_seen"])


def build_train_loader(
    cfg: DataConfig,
    needs: DataNeeds,
    *,
    urls: list[str],
    img_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
) -> ResumableLoader:
    """The endless, resumable stream of `needs.views` augmented views per image for one rank."""
    return ResumableLoader(
        urls,
        cfg=cfg,
        views=needs.views,
        img_size=img_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
