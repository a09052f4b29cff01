"""The training stream: URLs -> endless, resumable batches of what the objective needs, for one rank.

What each (rank, loader worker) pair - a *reader* - reads and produces is in
`data.reader`. Here: each reader's samples are batched inside its DataLoader
worker and batches are taken round-robin over readers (`in_order`). Readers
never stop: a reader that finishes its shards of epoch `e` goes on with its
shards of `e + 1`, so a batch may hold the end of one epoch and the start of the
next, nothing is dropped, and every sample of an epoch reaches the training loop
exactly once. `epoch` is the oldest epoch some reader of this rank is still in.

The position is counted in the main process as a batch is handed to the
training loop: per reader, its epoch, the stream positions consumed in it, and
the identities (shard, index) of the samples consumed in it (a bit mask per
shard), plus which reader's batch comes next.

Resuming with the same layout (world size and loader workers) replays: every
reader re-reads its epoch's tars and skips what was consumed without decoding,
so the batches that follow are bit-identical to an uninterrupted run. Resuming
with another layout needs the state of every old rank: the consumed samples of
all old readers become the `excluded` map of each epoch still in progress, and
the new readers start at the oldest such epoch, each skipping the excluded
samples of its (newly assigned) shards. Either way every sample of the epoch is
seen once: none repeated, none skipped.

`state_dict()` (plain Python types; torch.load(weights_only=True) reads it back):

    {"version": 2, "seed": int, "rank": int, "world_size": int,
     "num_readers": int,          # max(1, data.num_workers)
     "num_shards": int, "shards_id": str,   # hash of the shard file names
     "next_reader": int,          # reader whose batch is due next
     "readers": [{"epoch": int, "position": int,
                  "consumed": [[shard, "hex bit mask"], ...]}, ...],
     "excluded": [[epoch, shard, "hex bit mask" or "" (whole shard)], ...],
     "skipped": int,              # bad samples met so far (all epochs)
     "samples_seen": int}         # samples handed to the loop so far (all epochs)
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader

from data.config import DATA_SCHEMES, DataConfig, unsupported_scheme
from data.manifest import read_manifest
from data.masks import mask_generator
from data.needs import DataNeeds
from data.reader import (
    BAD_FIELD,
    EPOCH_FIELD,
    INDEX_FIELD,
    POSITION_FIELD,
    READER_FIELD,
    RETRIES_FIELD,
    SHARD_FIELD,
    Excluded,
    ReaderStream,
    reader_shards,
)
from data.shards import KEY_FIELD
from data.views import ToNormalizedFloat, build_view_transform, draft_min_size

logger = logging.getLogger(__name__)

STATE_VERSION = 2
# The skipped-fraction abort is checked only once a rank has read this many samples,
# so that one bad shard early on does not stop a run whose data is mostly fine.
ABORT_MIN_SAMPLES = 1000


class DataError(RuntimeError):
    """The data is too broken to train on (too many bad samples)."""


def check_url(url: str) -> None:
    """Raise ValueError if `url`'s scheme is not one of the accepted fsspec protocols (no I/O)."""
    problem = unsupported_scheme(url, DATA_SCHEMES)
    if problem is not None:
        raise ValueError(f"{problem} (a plain path is a local file)")


def resolve_urls(
    urls: str, storage_options: dict[str, Any] | None = None, *, retries: int = 6, retry_wait_s: float = 0.5
) -> list[str]:
    """Shard URLs of `urls`: a manifest (`*.json`, read with retries) or a brace pattern (`.../train-{0..99}.tar`)."""
    urls = urls.strip()
    if not urls:
        raise ValueError("data.urls is empty; give a manifest URL or a brace pattern of shard URLs")
    if urls.endswith(".json"):
        check_url(urls)
        return read_manifest(urls, storage_options, retries=retries, retry_wait_s=retry_wait_s).shard_urls()
    expanded = list(braceexpand(urls))
    for url in expanded:
        check_url(url)
    return expanded


def shards_id(urls: Sequence[str]) -> str:
    """Identity of a shard list by file names (not location: data may move from disk to S3)."""
    names = "\n".join(posixpath.basename(url.rstrip("/")) for url in urls)
    return hashlib.sha256(names.encode()).hexdigest()[:16]


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one reader's samples into a batch; bookkeeping fields stay per-sample lists."""
    batch: dict[str, Any] = {
        "views": [torch.stack([s["views"][v] for s in samples]) for v in range(len(samples[0]["views"]))],
    }
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([s["mask"] for s in samples])  # (B, N) bool
    for name in (
        KEY_FIELD,
        READER_FIELD,
        EPOCH_FIELD,
        POSITION_FIELD,
        SHARD_FIELD,
        INDEX_FIELD,
        BAD_FIELD,
        RETRIES_FIELD,
    ):
        batch[name] = [s[name] for s in samples]
    return batch


class _ReaderPosition:
    """What the main process knows about one reader: its epoch, consumed positions and samples."""

    def __init__(self, epoch: int = 0, position: int = 0, consumed: dict[int, int] | None = None) -> None:
        self.epoch, self.position = epoch, position
        self.consumed: dict[int, int] = dict(consumed or {})  # shard -> bit mask of sample indices

    def mark(self, epoch: int, shard: int, index: int) -> None:
        if epoch > self.epoch:  # the reader moved on: its old epoch is done
            self.epoch, self.position, self.consumed = epoch, 0, {}
        elif epoch < self.epoch:
            raise RuntimeError(f"reader went back from epoch {self.epoch} to {epoch}; the data stream is corrupt")
        self.consumed[shard] = self.consumed.get(shard, 0) | 1 << index

    def to_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "consumed": [[shard, format(bits, "x")] for shard, bits in sorted(self.consumed.items())],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _ReaderPosition:
        consumed = {int(shard): int(bits, 16) for shard, bits in state["consumed"]}
        return cls(int(state["epoch"]), int(state["position"]), consumed)


def _excluded_to_state(excluded: Excluded) -> list[list[Any]]:
    return [
        [epoch, shard, "" if bits is None else format(bits, "x")]
        for epoch, shards in sorted(excluded.items())
        for shard, bits in sorted(shards.items())
    ]


def _exclude(excluded: Excluded, epoch: int, shard: int, bits: int | None) -> None:
    """Add samples (`bits`, None = whole shard) of `shard` in `epoch` to `excluded`."""
    shards = excluded.setdefault(epoch, {})
    if bits is None or shards.get(shard, 0) is None:
        shards[shard] = None
    else:
        shards[shard] = shards.get(shard, 0) | bits


def merge_positions(states: Sequence[dict[str, Any]]) -> tuple[int, Excluded]:
    """Every old rank's state -> (epoch to start at, samples of each unfinished epoch already consumed).

    Reader k of old rank r in epoch E has read all its shards of epochs before E
    (whole shards excluded), the `consumed` samples of E, and nothing later.
    """
    first = states[0]
    seed, num_shards = int(first["seed"]), int(first["num_shards"])
    start = min(int(reader["epoch"]) for state in states for reader in state["readers"])
    excluded: Excluded = {}
    for state in states:
        for epoch, shard, bits in state["excluded"]:
            if epoch >= start:
                _exclude(excluded, int(epoch), int(shard), int(bits, 16) if bits else None)
        for k, reader in enumerate(state["readers"]):
            for epoch in range(start, int(reader["epoch"])):
                for shard in reader_shards(
                    list(range(num_shards)),
                    seed=seed,
                    epoch=epoch,
                    rank=int(state["rank"]),
                    world_size=int(state["world_size"]),
                    worker=k,
                    num_readers=int(state["num_readers"]),
                ):
                    _exclude(excluded, epoch, shard, None)
            for shard, bits in reader["consumed"]:
                _exclude(excluded, int(reader["epoch"]), int(shard), int(bits, 16))
    return start, excluded


class ResumableLoader:
    """Endless iterator of batches with an exact, checkpointable position.

    Yields `{"views": [Tensor (B, 3, S, S)] * views (+ [Tensor (B, 3, s, s)] * local_views),
    "__key__": [str] * B,
    "__epoch__": [int] * B}` plus `"mask": BoolTensor (B, N)` (True = masked) when
    the objective asked for one. `state_dict()` after taking a batch covers that
    batch; `load_state_dict` on a fresh loader makes the next batch the one that
    would have followed (same layout) or continues the epoch exactly-once (other layout).
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
        mask: tuple[Any, tuple[int, int]] | None = None,
        abort_min_samples: int = ABORT_MIN_SAMPLES,
        local_views: int = 0,
        local_size: int = 0,
        local_scale: tuple[float, float] = (0.05, 0.4),
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
        if not 0.0 <= cfg.max_skipped_fraction <= 1.0:
            raise ValueError(f"data.max_skipped_fraction must be in [0, 1], got {cfg.max_skipped_fraction}")
        self.num_readers = max(1, cfg.num_workers)
        if len(urls) < world_size * self.num_readers:
            raise ValueError(
                f"{len(urls)} shards cannot feed world_size {world_size} x {self.num_readers} loader workers = "
                f"{world_size * self.num_readers} readers; write more/smaller shards or lower data.num_workers"
            )
        self.urls, self.cfg, self.views = list(urls), cfg, views
        self._shards_id = shards_id(self.urls)  # part of every saved position: hash once
        self.img_size, self.batch_size = img_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.mask, self.abort_min_samples = mask, abort_min_samples
        self._transform = build_view_transform(cfg, img_size)
        if local_views and local_size < 1:
            raise ValueError(f"{local_views} local views need a local_size >= 1, got {local_size}")
        self._local = (
            ((build_view_transform(cfg, local_size, scale=local_scale), local_views),) if local_views > 0 else ()
        )
        # Decoded large enough that neither a global nor a local crop is upscaled (see draft_min_size).
        self._min_decode = max(
            draft_min_size(img_size, cfg.crop_scale_min),
            draft_min_size(local_size, local_scale[0]) if local_views > 0 else 0,
        )
        self._normalize = ToNormalizedFloat(list(cfg.mean), list(cfg.std))
        self._readers = [_ReaderPosition() for _ in range(self.num_readers)]
        self._excluded: Excluded = {}
        self._next_reader = 0
        self._skipped = 0
        self._skipped_by_epoch: dict[int, int] = {}
        self._samples_seen = 0
        self._io_retries = 0
        self._active: Generator[dict[str, Any], None, None] | None = None

    @property
    def epoch(self) -> int:
        """The oldest epoch a reader of this rank is still in (all earlier ones are fully consumed)."""
        return min(reader.epoch for reader in self._readers)

    @property
    def skipped(self) -> int:
        """Bad samples (no image, undecodable, damaged shard) this rank met so far."""
        return self._skipped

    @property
    def skipped_per_epoch(self) -> dict[int, int]:
        """Bad samples met per epoch by this loader object (not carried through checkpoints)."""
        return dict(self._skipped_by_epoch)

    @property
    def io_retries(self) -> int:
        """Storage retries this rank's loader workers made so far (this loader object, not carried through
        checkpoints): nonzero means the endpoint failed and recovered."""
        return self._io_retries

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

    def _loader(self) -> DataLoader:
        dataset = ReaderStream(
            self.urls,
            storage_options=dict(self.cfg.storage_options),
            io_retries=self.cfg.io_retries,
            io_retry_wait_s=self.cfg.io_retry_wait_s,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_readers=self.num_readers,
            first_reader=self._next_reader,
            starts=[(reader.epoch, reader.position) for reader in self._readers],
            excluded=self._excluded,
            buffer_size=self.cfg.shuffle_buffer,
            transform=self._transform,
            views=self.views,
            min_decode_size=self._min_decode if self.cfg.fast_decode else None,
            mask=self.mask,
            local=self._local,
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.cfg.num_workers,
            collate_fn=collate,
            # in_order: batches come round-robin over workers, which resume relies on.
            in_order=True,
            # The base seed comes from here, not from the global torch RNG; workers reseed per sample anyway.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _account(self, batch: dict[str, Any]) -> int:
        """Record a batch as consumed; returns the reader it came from."""
        reader = batch[READER_FIELD][0]
        position = self._readers[reader]
        for bad, epoch, shard, index, pos in zip(
            batch[BAD_FIELD],
            batch[EPOCH_FIELD],
            batch[SHARD_FIELD],
            batch[INDEX_FIELD],
            batch[POSITION_FIELD],
            strict=True,
        ):
            for bad_epoch, bad_shard, bad_index in bad:
                position.mark(bad_epoch, bad_shard, bad_index)
                self._skipped_by_epoch[bad_epoch] = self._skipped_by_epoch.get(bad_epoch, 0) + 1
            position.mark(epoch, shard, index)
            position.position = pos + 1
            self._skipped += len(bad)
        self._samples_seen += len(batch[KEY_FIELD])
        self._io_retries += sum(batch[RETRIES_FIELD])
        self._next_reader = (reader + 1) % self.num_readers
        # Exclusions of epochs every reader has left are no longer needed.
        for epoch in [e for e in self._excluded if e < self.epoch]:
            del self._excluded[epoch]
        return reader

    def _check_skipped(self) -> None:
        read = self._samples_seen + self._skipped
        if read >= self.abort_min_samples and self._skipped > self.cfg.max_skipped_fraction * read:
            raise DataError(
                f"rank {self.rank}: {self._skipped} of {read} samples read were bad "
                f"({self._skipped / read:.1%} > data.max_skipped_fraction={self.cfg.max_skipped_fraction}); "
                "the warnings above name the shards and keys - fix or rewrite them, or raise data.max_skipped_fraction"
            )

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        for batch in self._loader():
            self._account(batch)
            self._check_skipped()
            views = [self._normalize(v) for v in batch["views"]]  # uint8 from the workers -> normalised float
            out = {"views": views, KEY_FIELD: batch[KEY_FIELD], EPOCH_FIELD: batch[EPOCH_FIELD]}
            if "mask" in batch:
                out["mask"] = batch["mask"]
            yield out

    def _layout(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_readers": self.num_readers,
            "num_shards": len(self.urls),
            "shards_id": self._shards_id,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last yielded batch, as plain Python types (safe for weights_only loads)."""
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "next_reader": self._next_reader,
            "readers": [reader.to_state() for reader in self._readers],
            "excluded": _excluded_to_state(self._excluded),
            "skipped": self._skipped,
            "samples_seen": self._samples_seen,
        }

    def load_state_dict(self, state: dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Continue after the batch at which `state` was taken (stops a live iteration).

        `state`: this rank's saved state, or the saved states of all old ranks (in
        rank order), which is needed when the world size or data.num_workers changed.
        """
        states = [state] if isinstance(state, dict) else list(state)
        if not states:
            raise ValueError("no data position to resume from")
        for s in states:
            got = s.get("version") if isinstance(s, dict) else type(s).__name__
            if got != STATE_VERSION:
                raise ValueError(f"data position has version {got!r}; this code reads version {STATE_VERSION}")
        here = self._layout()
        for key in ("seed", "num_shards", "shards_id"):
            if states[0][key] != here[key]:
                raise ValueError(
                    f"cannot resume the data position: {key} saved {states[0][key]} != now {here[key]}; "
                    "resume with the same seed and shards"
                )
        same_layout = all(states[0][k] == here[k] for k in ("world_size", "num_readers"))
        mine = [s for s in states if s["rank"] == self.rank]
        self.close()
        if same_layout and mine:
            self._replay(mine[0])
            return
        old_world = int(states[0]["world_size"])
        if sorted(s["rank"] for s in states) != list(range(old_world)):
            raise ValueError(
                f"the data position was saved by {old_world} ranks x {states[0]['num_readers']} loader workers; "
                f"resuming with {self.world_size} x {self.num_readers} needs the states of all {old_world} old ranks"
            )
        start, excluded = merge_positions(states)
        self._readers = [_ReaderPosition(start) for _ in range(self.num_readers)]
        self._excluded = excluded
        self._next_reader = 0
        # Totals over the old ranks go to rank 0 (the logged metrics are sums over ranks).
        self._skipped = sum(int(s["skipped"]) for s in states) if self.rank == 0 else 0
        self._samples_seen = sum(int(s["samples_seen"]) for s in states) if self.rank == 0 else 0
        logger.info(
            "rank %d: data position re-laid out from %d x %d to %d x %d readers; epoch %d continues with %d samples "
            "already consumed",
            self.rank,
            old_world,
            states[0]["num_readers"],
            self.world_size,
            self.num_readers,
            start,
            sum(bin(b).count("1") if b is not None else 0 for b in excluded.get(start, {}).values()),
        )

    def _replay(self, state: dict[str, Any]) -> None:
        readers = state["readers"]
        if len(readers) != self.num_readers:
            raise ValueError(f"data position has {len(readers)} readers; expected {self.num_readers}")
        self._readers = [_ReaderPosition.from_state(reader) for reader in readers]
        self._excluded = {}
        for epoch, shard, bits in state["excluded"]:
            _exclude(self._excluded, int(epoch), int(shard), int(bits, 16) if bits else None)
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
    patch_size: int = 16,
) -> ResumableLoader:
    """The endless, resumable stream of what `needs` asks for (views, masks) for one rank."""
    mask = None
    if needs.mask is not None:
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        grid = (img_size // patch_size, img_size // patch_size)
        mask = (mask_generator(needs.mask, patch_size), grid)
    return ResumableLoader(
        urls,
        cfg=cfg,
        views=needs.views,
        img_size=img_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        mask=mask,
        local_views=needs.local_views,
        local_size=needs.local_size,
        local_scale=needs.local_scale,
    )
