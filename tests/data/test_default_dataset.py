"""The embedded default dataset: one complete copy under concurrency, held-out eval split."""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from data.config import DataConfig
from data.default import EVAL_SEED, DefaultDataset, ensure_default_dataset
from data.manifest import read_manifest
from data.shards import iter_shard
from data.synthetic import render_sample


def small_config(cache: str, train: int = 48) -> DataConfig:
    return DataConfig(cache_dir=cache, default_train_samples=train, default_eval_samples=20, default_shard_size=16)


def _generate_after_barrier(cfg: DataConfig, barrier: Any, results: Any) -> None:
    barrier.wait()
    results.put(ensure_default_dataset(cfg))


@pytest.mark.parametrize("locking", [True, False], ids=["with-lock", "rename-race-only"])
def test_two_processes_produce_one_complete_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locking: bool
) -> None:
    if not locking:  # e.g. a filesystem without flock: both generate, the atomic rename decides
        monkeypatch.setattr("data.default._lock", lambda f: None)
    cfg = small_config(str(tmp_path))
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_generate_after_barrier, args=(cfg, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got[0] == got[1]
    # Exactly one dataset folder and no leftover temp folder (the lock file may stay).
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [Path(got[0].root).name]
    for url, total in ((got[0].train_url, 48), (got[0].eval_url, 20)):
        manifest = read_manifest(url)
        assert manifest.total_samples == total
        for info, shard_url in zip(manifest.shards, manifest.shard_urls(), strict=True):
            shard_bytes = Path(shard_url).read_bytes()
            assert hashlib.sha256(shard_bytes).hexdigest() == info.sha256
            assert sum(1 for _ in iter_shard(shard_url)) == info.num_samples


def _keys_and_digests(url: str) -> tuple[list[str], set[str], list[dict]]:
    samples = [s for shard in read_manifest(url).shard_urls() for s in iter_shard(shard)]
    return [s["__key__"] for s in samples], {hashlib.sha256(s["png"]).hexdigest() for s in samples}, samples


def test_eval_split_is_held_out_and_labelled(tmp_path: Path) -> None:
    dataset = ensure_default_dataset(small_config(str(tmp_path)))
    train_keys, train_images, _ = _keys_and_digests(dataset.train_url)
    eval_keys, eval_images, eval_samples = _keys_and_digests(dataset.eval_url)
    assert len(train_keys) == 48 and len(eval_keys) == 20
    assert not set(train_keys) & set(eval_keys)
    assert not train_images & eval_images  # different pixels, not just different names
    # Labels and pixels are those of the generator at the eval seed.
    for index in (0, 7, 19):
        sample = eval_samples[index]
        image, label = render_sample(index, EVAL_SEED)
        assert int(sample["cls"]) == label
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), np.asarray(image))


def test_reuse_and_regenerate_on_size_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRETRAIN_CACHE", str(tmp_path))
    cfg = small_config("")  # empty cache_dir: falls back to $PRETRAIN_CACHE
    first = ensure_default_dataset(cfg)
    assert Path(first.root).parent == tmp_path
    stamp = Path(first.train_url).stat().st_mtime_ns
    again = ensure_default_dataset(cfg)
    assert again == first and Path(again.train_url).stat().st_mtime_ns == stamp
    bigger = ensure_default_dataset(small_config("", train=64))
    assert isinstance(bigger, DefaultDataset) and bigger.root != first.root
    assert read_manifest(bigger.train_url).total_samples == 64
