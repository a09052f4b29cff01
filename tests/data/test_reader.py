"""Reader-level pieces: shard partition over ranks/workers, the shuffle buffer."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data.reader import reader_shards, shuffle_buffer


@pytest.mark.parametrize(("num_shards", "world_size", "num_readers"), [(8, 2, 2), (10, 2, 2), (13, 3, 4), (5, 1, 5)])
def test_every_shard_goes_to_exactly_one_reader_per_epoch(num_shards: int, world_size: int, num_readers: int) -> None:
    urls = [f"s3://b/train-{i:06d}.tar" for i in range(num_shards)]
    orders = []
    for epoch in range(3):
        parts = [
            reader_shards(urls, seed=7, epoch=epoch, rank=r, world_size=world_size, worker=k, num_readers=num_readers)
            for r in range(world_size)
            for k in range(num_readers)
        ]
        assert Counter(u for part in parts for u in part) == Counter(urls)
        sizes = [len(p) for p in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1  # balanced to within one shard
        orders.append(parts)
    assert orders[0] != orders[1]  # reshuffled every epoch
    again = reader_shards(urls, seed=7, epoch=1, rank=0, world_size=world_size, worker=0, num_readers=num_readers)
    assert again == orders[1][0]


def test_shuffle_buffer_is_a_seeded_permutation_that_mixes() -> None:
    items = list(range(500))
    out = list(shuffle_buffer(items, 64, random.Random(1)))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_buffer(items, 64, random.Random(1)))
    # An item cannot leave before it arrives: output i comes from the first i + 64 inputs.
    assert all(x < i + 64 for i, x in enumerate(out[: len(items) - 64]))
    assert list(shuffle_buffer(items, 0, random.Random(1))) == items
