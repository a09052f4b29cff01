"""The resumable training stream: sharding, determinism, exact resume, bad samples."""

from __future__ import annotations

import io
import logging
import random
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from data.config import DataConfig
from data.stream import ResumableLoader, build_train_loader, resolve_urls
from objectives.base import DataNeeds

if TYPE_CHECKING:
    from conftest import ShardSet

IMG = 16  # small views keep the suite fast; the pipeline is size-agnostic


def make_loader(
    urls: list[str],
    *,
    num_workers: int = 2,
    views: int = 2,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer: int = 16,
) -> ResumableLoader:
    cfg = DataConfig(num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    return build_train_loader(
        cfg,
        DataNeeds(views=views),
        urls=urls,
        img_size=IMG,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )


def epoch_batches(loader: ResumableLoader, epoch: int = 0) -> list[dict[str, Any]]:
    """The batches of one epoch (the loader must be at its start)."""
    out = []
    for batch in loader:
        if loader.epoch != epoch:
            break
        out.append(batch)
    loader.close()
    return out


def take(loader: ResumableLoader, n: int) -> list[dict[str, Any]]:
    batches = list(islice(iter(loader), n))
    loader.close()
    return batches


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["__key__"] == y["__key__"]
        assert len(x["views"]) == len(y["views"])
        for vx, vy in zip(x["views"], y["views"], strict=True):
            assert torch.equal(vx, vy)


def test_resolve_urls_manifest_brace_and_bad_scheme(synthetic_shards: ShardSet) -> None:
    on_disk = sorted(str(p) for p in synthetic_shards.root.glob("syn-*.tar"))
    assert len(on_disk) == 8
    assert resolve_urls(synthetic_shards.manifest_url) == on_disk
    assert resolve_urls(f"{synthetic_shards.root}/syn-{{000000..000007}}.tar") == on_disk
    assert resolve_urls(f"file://{synthetic_shards.root}/syn-{{000003..000004}}.tar") == [
        f"file://{p}" for p in on_disk[3:5]
    ]
    with pytest.raises(ValueError, match="'nosuchfs'"):
        resolve_urls("nosuchfs://bucket/train-{0..3}.tar")
    with pytest.raises(ValueError, match="'pipe'"):
        resolve_urls("pipe:curl -s http://x/train.tar")
    with pytest.raises(ValueError, match="empty"):
        resolve_urls("  ")


def test_each_key_once_per_epoch_across_ranks_and_workers(synthetic_shards: ShardSet) -> None:
    urls = resolve_urls(synthetic_shards.manifest_url)
    keys_by_rank = []
    for rank in range(2):
        loader = make_loader(urls, num_workers=2, rank=rank, world_size=2)
        batches = epoch_batches(loader)
        assert all(len(b["__key__"]) == 8 and b["views"][0].shape == (8, 3, IMG, IMG) for b in batches)
        keys_by_rank.append([k for b in batches for k in b["__key__"]])
        # A batch comes from one loader worker, which reads 2 of the 8 shards.
        for b in batches:
            assert len({synthetic_shards.shard_of[k] for k in b["__key__"]}) <= 2
    all_keys = keys_by_rank[0] + keys_by_rank[1]
    assert Counter(all_keys) == Counter(synthetic_shards.keys)  # every key exactly once
    shards_by_rank = [{synthetic_shards.shard_of[k] for k in keys} for keys in keys_by_rank]
    assert len(shards_by_rank[0]) == len(shards_by_rank[1]) == 4
    assert not shards_by_rank[0] & shards_by_rank[1]


def test_views_hold_their_own_image_normalised(solid_shards: tuple[ShardSet, dict]) -> None:
    """Uniform images in L/LA/RGBA/P/I;16 modes: every view pixel is the key's RGB, normalised."""
    shards, expected = solid_shards
    cfg = DataConfig()
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    loader = make_loader(resolve_urls(shards.manifest_url), num_workers=2, views=3)
    batches = epoch_batches(loader)
    assert sorted(k for b in batches for k in b["__key__"]) == sorted(expected)
    for b in batches:
        for view in b["views"]:
            for key, image in zip(b["__key__"], view, strict=True):
                want = (torch.tensor(expected[key], dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std
                torch.testing.assert_close(image, want.expand(3, IMG, IMG), atol=1e-5, rtol=0)


def test_same_seed_same_tensors_other_seed_differs(synthetic_shards: ShardSet) -> None:
    urls = resolve_urls(synthetic_shards.manifest_url)
    a = take(make_loader(urls, seed=5), 5)
    b = take(make_loader(urls, seed=5), 5)
    c = take(make_loader(urls, seed=6), 5)
    assert_same_batches(a, b)
    assert [x["__key__"] for x in a] != [x["__key__"] for x in c]
    # Views of one image are independent augmentations, not copies.
    assert not torch.equal(a[0]["views"][0], a[0]["views"][1])


@pytest.fixture(scope="module")
def uninterrupted(synthetic_shards: ShardSet) -> dict[int, list[dict[str, Any]]]:
    """The first 21 batches (an epoch is 15) of an uninterrupted loader, per num_workers."""
    urls = resolve_urls(synthetic_shards.manifest_url)
    return {nw: take(make_loader(urls, num_workers=nw), 21) for nw in (0, 2, 3)}


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(
    ("num_workers", "consumed"),
    # With 3 workers the third runs dry after batch 9 (it reads 2 of the 8 shards),
    # so after batch 11 the batch due next is from an exhausted worker.
    [(2, 3), (2, 15), (0, 5), (3, 11)],
    ids=["mid-epoch-odd", "at-epoch-end", "in-process", "next-worker-exhausted"],
)
def test_resume_continues_bit_identically(
    synthetic_shards: ShardSet, uninterrupted: dict[int, list[dict[str, Any]]], num_workers: int, consumed: int
) -> None:
    urls = resolve_urls(synthetic_shards.manifest_url)
    reference = uninterrupted[num_workers]
    first = make_loader(urls, num_workers=num_workers)
    head = take(first, consumed)
    assert_same_batches(head, reference[:consumed])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = make_loader(urls, num_workers=num_workers)
    resumed.load_state_dict(state)
    tail = take(resumed, 6)
    assert_same_batches(tail, reference[consumed : consumed + 6])
    assert resumed.samples_seen == 8 * (consumed + 6)


def test_state_dict_is_plain_python(synthetic_shards: ShardSet) -> None:
    loader = make_loader(resolve_urls(synthetic_shards.manifest_url))
    take(loader, 3)
    state = loader.state_dict()

    def plain(x: Any) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return isinstance(x, (int, str, float, bool)) or x is None

    assert plain(state)
    # 3 batches of 8 taken round-robin from readers 0, 1, 0 (no bad samples): 16 and 8 positions.
    assert state["positions"] == [16, 8] and state["next_reader"] == 1 and state["epoch"] == 0


def test_resume_refuses_other_topology(synthetic_shards: ShardSet) -> None:
    urls = resolve_urls(synthetic_shards.manifest_url)
    loader = make_loader(urls, num_workers=2)
    take(loader, 2)
    with pytest.raises(ValueError, match="num_readers: saved 2 != now 1"):
        make_loader(urls, num_workers=1).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="world_size: saved 1 != now 2"):
        make_loader(urls, num_workers=2, world_size=2).load_state_dict(loader.state_dict())


def test_epochs_visit_all_keys_in_different_orders(synthetic_shards: ShardSet) -> None:
    loader = make_loader(resolve_urls(synthetic_shards.manifest_url), num_workers=2)
    batches = take(loader, 30)  # 15 batches per epoch
    first = [k for b in batches[:15] for k in b["__key__"]]
    second = [k for b in batches[15:] for k in b["__key__"]]
    assert sorted(first) == sorted(second) == sorted(synthetic_shards.keys)
    assert first != second
    assert loader.epoch == 1 and loader.samples_seen == 2 * len(synthetic_shards.keys)


def test_too_few_shards_for_readers(synthetic_shards: ShardSet) -> None:
    with pytest.raises(ValueError, match="8 shards cannot feed world_size 4 x 3 loader workers"):
        make_loader(resolve_urls(synthetic_shards.manifest_url), num_workers=3, world_size=4)


def test_in_process_loading_leaves_global_rng_alone(synthetic_shards: ShardSet) -> None:
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    take(make_loader(resolve_urls(synthetic_shards.manifest_url), num_workers=0), 3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_samples_are_skipped_counted_and_logged(
    bad_shards: tuple[Path, list[str]], num_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    root, good = bad_shards
    urls = resolve_urls(f"{root}/bad.manifest.json")
    # No shuffle, so the stream ends on a good sample and the count is exact at the epoch end.
    loader = make_loader(urls, num_workers=num_workers, batch_size=7, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        batches = take(loader, 2)  # the 14 good samples of epoch 0 make exactly 2 batches of 7
    assert sorted(k for b in batches for k in b["__key__"]) == good
    assert loader.epoch == 0
    assert loader.skipped == 2 and loader.state_dict()["skipped"] == 2
    if num_workers == 0:  # worker processes log to their own handlers
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "'s-03'" in messages and "bad-000000.tar" in messages and "cannot decode" in messages
        assert "'s-10'" in messages and "bad-000001.tar" in messages and "no image field" in messages
