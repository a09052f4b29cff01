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
from data.needs import DataNeeds, MaskSpec
from data.stream import DataError, ResumableLoader, build_train_loader, resolve_urls

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
    mask: MaskSpec | None = None,
) -> ResumableLoader:
    cfg = DataConfig(num_workers=num_workers, shuffle_buffer=shuffle_buffer)
    return build_train_loader(
        cfg,
        DataNeeds(views=views, mask=mask),
        urls=urls,
        img_size=IMG,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        patch_size=4,
    )


def samples_of(batches: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(epoch, key) of every sample in `batches`, in order."""
    return [(e, k) for b in batches for e, k in zip(b["__epoch__"], b["__key__"], strict=True)]


def until_epoch(loader: ResumableLoader, epoch: int, limit: int = 200) -> list[dict[str, Any]]:
    """Batches until every reader of the loader has reached `epoch` (from where it stands)."""
    out = []
    if loader.epoch < epoch:
        for batch in loader:
            out.append(batch)
            if loader.epoch >= epoch or len(out) >= limit:
                break
    loader.close()
    assert loader.epoch >= epoch, f"no epoch {epoch} after {limit} batches"
    return out


def take(loader: ResumableLoader, n: int) -> list[dict[str, Any]]:
    batches = list(islice(iter(loader), n))
    loader.close()
    return batches


def through_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict as a checkpoint hands it back: torch.save, then a weights_only load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["__key__"] == y["__key__"] and x["__epoch__"] == y["__epoch__"]
        assert len(x["views"]) == len(y["views"])
        for vx, vy in zip(x["views"], y["views"], strict=True):
            assert torch.equal(vx, vy)
        assert ("mask" in x) == ("mask" in y)
        if "mask" in x:
            assert torch.equal(x["mask"], y["mask"])


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
    seen: list[tuple[int, str]] = []
    shards_by_rank = []
    for rank in range(2):
        batches = until_epoch(make_loader(urls, num_workers=2, rank=rank, world_size=2), 1)
        assert all(len(b["__key__"]) == 8 and b["views"][0].shape == (8, 3, IMG, IMG) for b in batches)
        # A batch comes from one loader worker, which reads 2 of the 8 shards per epoch (plus the next epoch's).
        epoch0 = [k for e, k in samples_of(batches) if e == 0]
        shards_by_rank.append({synthetic_shards.shard_of[k] for k in epoch0})
        seen += samples_of(batches)
    # Nothing is dropped at the epoch end: every key of epoch 0 exactly once over the ranks.
    assert Counter(k for e, k in seen if e == 0) == Counter(synthetic_shards.keys)
    assert len(shards_by_rank[0]) == len(shards_by_rank[1]) == 4
    assert not shards_by_rank[0] & shards_by_rank[1]


def test_views_hold_their_own_image_normalised(solid_shards: tuple[ShardSet, dict]) -> None:
    """Uniform images in L/LA/RGBA/P/I;16 modes: every view pixel is the key's RGB, normalised."""
    shards, expected = solid_shards
    cfg = DataConfig()
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    batches = until_epoch(make_loader(resolve_urls(shards.manifest_url), num_workers=2, views=3), 1)
    assert sorted(k for e, k in samples_of(batches) if e == 0) == sorted(expected)
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


def test_masks_are_drawn_per_sample_with_the_exact_count(synthetic_shards: ShardSet) -> None:
    """MAE's random mask: (B, N) bool, N - int(N * 0.25) masked per row, a function of the sample, not the layout."""
    urls = resolve_urls(synthetic_shards.manifest_url)
    spec = MaskSpec("random", 0.75)
    wide = until_epoch(make_loader(urls, num_workers=2, mask=spec), 1)
    narrow = until_epoch(make_loader(urls, num_workers=0, mask=spec), 1)
    grid = (IMG // 4) ** 2
    masks: dict[str, torch.Tensor] = {}
    views: dict[str, torch.Tensor] = {}
    for b in wide:
        assert b["mask"].shape == (8, grid) and b["mask"].dtype == torch.bool
        assert b["mask"].sum(dim=1).tolist() == [grid - int(grid * 0.25)] * 8
        for e, k, m, v in zip(b["__epoch__"], b["__key__"], b["mask"], b["views"][0], strict=True):
            if e == 0:
                masks[k], views[k] = m, v
    # The same sample in the same epoch gets the same mask and views whoever reads it.
    for b in narrow:
        for e, k, m, v in zip(b["__epoch__"], b["__key__"], b["mask"], b["views"][0], strict=True):
            if e == 0:
                assert torch.equal(masks[k], m) and torch.equal(views[k], v)
    assert len({tuple(m.tolist()) for m in masks.values()}) > len(masks) // 2  # masks differ across samples


@pytest.fixture(scope="module")
def uninterrupted(synthetic_shards: ShardSet) -> dict[int, list[dict[str, Any]]]:
    """The first 21 batches (an epoch is 15) of an uninterrupted loader, per num_workers."""
    urls = resolve_urls(synthetic_shards.manifest_url)
    return {nw: take(make_loader(urls, num_workers=nw, mask=MaskSpec("random", 0.5)), 21) for nw in (0, 2, 3)}


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(
    ("num_workers", "consumed"),
    # With 3 workers the readers hold 3, 3 and 2 shards: the third reaches epoch 1 first.
    [(2, 3), (2, 15), (0, 5), (3, 11)],
    ids=["mid-epoch-odd", "at-epoch-end", "in-process", "readers-in-different-epochs"],
)
def test_resume_same_layout_continues_bit_identically(
    synthetic_shards: ShardSet, uninterrupted: dict[int, list[dict[str, Any]]], num_workers: int, consumed: int
) -> None:
    urls = resolve_urls(synthetic_shards.manifest_url)
    reference = uninterrupted[num_workers]
    first = make_loader(urls, num_workers=num_workers, mask=MaskSpec("random", 0.5))
    head = take(first, consumed)
    assert_same_batches(head, reference[:consumed])
    resumed = make_loader(urls, num_workers=num_workers, mask=MaskSpec("random", 0.5))
    resumed.load_state_dict(through_checkpoint(first.state_dict()))
    tail = take(resumed, 6)
    assert_same_batches(tail, reference[consumed : consumed + 6])
    assert resumed.samples_seen == 8 * (consumed + 6)


def run_layout(
    urls: list[str], world_size: int, num_workers: int, batches: int | None, states: list[dict[str, Any]] | None
) -> tuple[list[tuple[int, str]], list[dict[str, Any]], list[ResumableLoader]]:
    """Every rank of a layout: resume from `states` (if any), take `batches` each (None = to the end of epoch 1).

    Returns the (epoch, key) samples of all ranks, their states (through a checkpoint round trip), the loaders.
    """
    seen: list[tuple[int, str]] = []
    out_states, loaders = [], []
    for rank in range(world_size):
        loader = make_loader(urls, num_workers=num_workers, rank=rank, world_size=world_size)
        if states is not None:
            loader.load_state_dict(states)
        got = until_epoch(loader, 2) if batches is None else take(loader, batches)
        seen += samples_of(got)
        out_states.append(through_checkpoint(loader.state_dict()))
        loaders.append(loader)
    return seen, out_states, loaders


def assert_exactly_once(seen: list[tuple[int, str]], keys: list[str], epochs: tuple[int, ...] = (0, 1)) -> None:
    counts = Counter(seen)
    for epoch in epochs:
        per_key = {k: counts[(epoch, k)] for k in keys}
        repeated = sorted(k for k, n in per_key.items() if n > 1)
        missing = sorted(k for k, n in per_key.items() if n == 0)
        assert not repeated and not missing, f"epoch {epoch}: repeated {repeated[:5]}, missing {missing[:5]}"


@pytest.mark.parametrize(
    ("before", "after", "taken"),
    [
        ((2, 2), (1, 2), 3),  # 2 ranks -> 1, mid-epoch
        ((2, 2), (1, 0), 7),  # -> 1 rank in-process; some readers are already in epoch 1
        ((1, 2), (2, 2), 5),  # 1 rank -> 2
        ((2, 2), (2, 1), 4),  # same ranks, fewer loader workers
        ((2, 1), (2, 3), 6),  # more loader workers
    ],
    ids=["2x2->1x2", "2x2->1x0-straddling", "1x2->2x2", "2x2->2x1", "2x1->2x3"],
)
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_resume_other_layout_sees_every_sample_exactly_once(
    synthetic_shards: ShardSet, before: tuple[int, int], after: tuple[int, int], taken: int
) -> None:
    """Sample-key accounting: keys of epochs 0 and 1, before + after the resume, each exactly once."""
    urls = resolve_urls(synthetic_shards.manifest_url)
    seen_before, states, _ = run_layout(urls, *before, taken, None)
    assert len(seen_before) == before[0] * taken * 8
    seen_after, _, loaders = run_layout(urls, *after, None, states)
    assert_exactly_once(seen_before + seen_after, synthetic_shards.keys)
    # The counters carry over: rank 0 takes the old totals.
    assert sum(loader.samples_seen for loader in loaders) == len(seen_before) + len(seen_after)


def test_relayout_then_resume_again_is_exact_and_bit_identical(synthetic_shards: ShardSet) -> None:
    """2x2 -> 1x2 (exclusions in force) -> same-layout resume replays bit-identically -> 2x1: still exactly once."""
    urls = resolve_urls(synthetic_shards.manifest_url)
    seen1, states1, _ = run_layout(urls, 2, 2, 4, None)
    middle = make_loader(urls, num_workers=2)
    middle.load_state_dict(states1)
    reference = take(middle, 6)  # uninterrupted after the relayout
    replayed_head = make_loader(urls, num_workers=2)
    replayed_head.load_state_dict(states1)
    head = take(replayed_head, 2)
    replay = make_loader(urls, num_workers=2)
    replay.load_state_dict(through_checkpoint(replayed_head.state_dict()))
    tail = take(replay, 4)
    assert_same_batches(head + tail, reference)
    seen3, _, _ = run_layout(urls, 2, 1, None, [through_checkpoint(replay.state_dict())])
    assert_exactly_once(seen1 + samples_of(reference) + seen3, synthetic_shards.keys)


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
    assert [r["position"] for r in state["readers"]] == [16, 8] and state["next_reader"] == 1
    assert [r["epoch"] for r in state["readers"]] == [0, 0]
    consumed = sum(bin(int(bits, 16)).count("1") for r in state["readers"] for _, bits in r["consumed"])
    assert consumed == 24 and state["samples_seen"] == 24


def test_resume_refuses_other_data_or_missing_ranks(synthetic_shards: ShardSet) -> None:
    urls = resolve_urls(synthetic_shards.manifest_url)
    _, states, _ = run_layout(urls, 2, 2, 2, None)
    with pytest.raises(ValueError, match="needs the states of all 2 old ranks"):
        make_loader(urls, num_workers=1).load_state_dict(states[0])
    with pytest.raises(ValueError, match="num_shards saved 8 != now 7"):
        make_loader(urls[:7], num_workers=1).load_state_dict(states)
    with pytest.raises(ValueError, match="seed saved 0 != now 1"):
        make_loader(urls, num_workers=1, seed=1).load_state_dict(states)
    with pytest.raises(ValueError, match="version"):
        make_loader(urls, num_workers=1).load_state_dict({"version": 1})


def test_epochs_visit_all_keys_in_different_orders(synthetic_shards: ShardSet) -> None:
    loader = make_loader(resolve_urls(synthetic_shards.manifest_url), num_workers=2)
    seen = samples_of(until_epoch(loader, 2))
    first = [k for e, k in seen if e == 0]
    second = [k for e, k in seen if e == 1]
    assert sorted(first) == sorted(second) == sorted(synthetic_shards.keys)
    assert first != second
    assert loader.epoch == 2 and loader.samples_seen == len(seen) >= 2 * len(synthetic_shards.keys)


def test_too_few_shards_for_readers(synthetic_shards: ShardSet) -> None:
    with pytest.raises(ValueError, match="8 shards cannot feed world_size 4 x 3 loader workers"):
        make_loader(resolve_urls(synthetic_shards.manifest_url), num_workers=3, world_size=4)


def test_in_process_loading_leaves_global_rng_alone(synthetic_shards: ShardSet) -> None:
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    take(make_loader(resolve_urls(synthetic_shards.manifest_url), num_workers=0, mask=MaskSpec("random", 0.5)), 3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_samples_are_skipped_counted_and_logged(
    bad_shards: tuple[Path, list[str]], num_workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    root, good = bad_shards
    urls = resolve_urls(f"{root}/bad.manifest.json")
    loader = make_loader(urls, num_workers=num_workers, batch_size=7)
    with caplog.at_level(logging.WARNING, logger="data.reader"):
        batches = until_epoch(loader, 1)
    assert sorted(k for e, k in samples_of(batches) if e == 0) == good
    # Both bad samples of epoch 0 are counted once they were passed.
    assert loader.skipped >= 2 and loader.state_dict()["skipped"] == loader.skipped
    if num_workers == 0:  # worker processes log to their own handlers
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "'s-03'" in messages and "bad-000000.tar" in messages and "cannot decode" in messages
        assert "'s-10'" in messages and "bad-000001.tar" in messages and "no image field" in messages


def test_too_many_bad_samples_abort_with_a_clear_message(bad_shards: tuple[Path, list[str]]) -> None:
    root, _ = bad_shards
    urls = resolve_urls(f"{root}/bad.manifest.json")

    def loader_with(max_fraction: float) -> ResumableLoader:
        cfg = DataConfig(num_workers=0, max_skipped_fraction=max_fraction)
        return ResumableLoader(
            urls, cfg=cfg, views=1, img_size=IMG, batch_size=7, rank=0, world_size=1, seed=0, abort_min_samples=32
        )

    # 2 bad in 16 = 12.5% per epoch.
    with pytest.raises(DataError, match=r"rank 0: \d+ of \d+ samples read were bad .*data.max_skipped_fraction=0.1"):
        take(loader_with(0.1), 50)
    tolerant = loader_with(0.2)
    take(tolerant, 20)
    assert tolerant.skipped == 2 * tolerant.epoch or tolerant.skipped == 2 * (tolerant.epoch + 1)


def test_multi_crop_adds_smaller_local_views_after_the_global_ones(synthetic_shards: ShardSet) -> None:
    """DINO's multi-crop: 2 global views of IMG px, then 3 local views of 8 px from 5-40% of the area;
    the global views are those of a loader without local views (the same seeded draws come first)."""
    urls = resolve_urls(synthetic_shards.manifest_url)
    cfg = DataConfig(num_workers=1, shuffle_buffer=16)

    def loader(needs: DataNeeds) -> ResumableLoader:
        return build_train_loader(
            cfg, needs, urls=urls, img_size=IMG, batch_size=4, rank=0, world_size=1, seed=3, patch_size=4
        )

    multi = take(loader(DataNeeds(views=2, local_views=3, local_size=8, local_scale=(0.05, 0.4))), 2)
    plain = take(loader(DataNeeds(views=2)), 2)
    for with_local, without in zip(multi, plain, strict=True):
        assert [tuple(v.shape) for v in with_local["views"]] == [(4, 3, IMG, IMG)] * 2 + [(4, 3, 8, 8)] * 3
        assert with_local["__key__"] == without["__key__"]
        for a, b in zip(with_local["views"][:2], without["views"], strict=True):
            assert torch.equal(a, b)
        assert not torch.equal(with_local["views"][2], with_local["views"][3])  # independent local crops
    with pytest.raises(ValueError, match="local_size >= 1"):
        loader(DataNeeds(views=2, local_views=2))
