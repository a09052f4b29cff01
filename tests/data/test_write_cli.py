"""The shard writer CLI (`python -m data.write`) on local folders: every source kind, errors, re-sharding."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.manifest import read_manifest
from data.shards import KEY_FIELD, URL_FIELD, iter_shard, manifest_url
from data.write import main

REPO = Path(__file__).resolve().parents[2]


def read_all(manifest: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of every sample of a written dataset, in manifest order."""
    out: dict[str, dict[str, bytes]] = {}
    for url in read_manifest(manifest).shard_urls():
        for sample in iter_shard(url):
            key = sample.pop(KEY_FIELD)
            sample.pop(URL_FIELD)
            assert key not in out, f"duplicate key {key}"
            out[key] = sample
    return out


def image_bytes(colour: tuple[int, int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """sklearn:digits written with --shard-size 500: (manifest URL, the CLI's summary line)."""
    out = tmp_path_factory.mktemp("digits")
    capture = io.StringIO()
    stdout, sys.stdout = sys.stdout, capture
    try:
        assert main(["sklearn:digits", str(out), "--shard-size", "500", "--prefix", "digits"]) == 0
    finally:
        sys.stdout = stdout
    return manifest_url(str(out), "digits"), capture.getvalue().strip()


def test_digits_counts_labels_and_pixels(digits_dataset: tuple[str, str]) -> None:
    from sklearn.datasets import load_digits

    url, summary = digits_dataset
    manifest = read_manifest(url)
    assert manifest.total_samples == 1797
    assert [s.num_samples for s in manifest.shards] == [500, 500, 500, 297]
    assert manifest.extensions == ("cls", "png")
    assert summary == (
        f"wrote 4 shards, 1797 samples, {sum(s.bytes for s in manifest.shards)} bytes; "
        f"manifest {url} (hash {manifest.manifest_hash})"
    )

    digits = load_digits()
    samples = read_all(url)
    assert len(samples) == 1797
    for index in (0, 7, 1000, 1796):
        sample = samples[f"digits-{index:05d}"]
        assert int(sample["cls"]) == digits.target[index]
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))  # (32, 32, 3)
        assert pixels.shape == (32, 32, 3)
        # Each digit pixel v in 0..16 is a uniform 4x4 block of grey round(v / 16 * 255).
        expected = np.repeat(np.repeat(np.round(digits.images[index] / 16 * 255), 4, axis=0), 4, axis=1)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[..., channel], expected)


def test_reshard_keeps_keys_and_bytes(digits_dataset: tuple[str, str], tmp_path: Path) -> None:
    url, _ = digits_dataset
    original = read_all(url)

    assert main([url, str(tmp_path / "by_manifest"), "--shard-size", "700"]) == 0
    resharded = read_manifest(manifest_url(str(tmp_path / "by_manifest"), "train"))
    assert [s.num_samples for s in resharded.shards] == [700, 700, 397]
    again = read_all(resharded.url)
    assert list(again) == list(original)  # same keys, same order
    assert again == original  # every field's bytes

    root = url.rsplit("/", 1)[0]
    pattern = f"{root}/digits-{{000001..000002}}.tar"
    assert main([pattern, str(tmp_path / "by_pattern"), "--shard-size", "300", "--limit", "750"]) == 0
    partial = read_all(manifest_url(str(tmp_path / "by_pattern"), "train"))
    assert list(partial) == [f"digits-{i:05d}" for i in range(500, 1250)]
    assert all(partial[key] == original[key] for key in partial)

    # Onto its own names it would overwrite shards before reading them: refused, nothing touched.
    assert main([url, root, "--prefix", "digits", "--shard-size", "100"]) == 2
    assert read_all(url) == original


def test_folder_labels_by_sorted_class_name(tmp_path: Path) -> None:
    src = tmp_path / "images"
    # Created in non-sorted order; labels must follow the sorted names: ant=0, zebra=1.
    files = {
        "zebra/b.png": image_bytes((200, 10, 10), "PNG"),
        "zebra/a.jpg": image_bytes((10, 200, 10), "JPEG"),
        "ant/nested/c.png": image_bytes((10, 10, 200), "PNG"),
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    (src / "zebra" / "notes.txt").write_text("not an image")

    assert main([str(src), str(tmp_path / "out"), "--shard-size", "2"]) == 0
    samples = read_all(manifest_url(str(tmp_path / "out"), "train"))
    got = sorted((int(s["cls"]), ext, s[ext]) for s in samples.values() for ext in s if ext != "cls")
    expected = sorted(
        [(1, "png", files["zebra/b.png"]), (1, "jpg", files["zebra/a.jpg"]), (0, "png", files["ant/nested/c.png"])]
    )
    assert got == expected


def test_file_list_without_labels(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    first, second = image_bytes((1, 2, 3), "PNG"), image_bytes((4, 5, 6), "JPEG")
    (tmp_path / "imgs" / "one.png").write_bytes(first)
    (tmp_path / "two.jpeg").write_bytes(second)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\nimgs/one.png\n\n{tmp_path / 'two.jpeg'}\n")

    assert main([f"@{listing}", str(tmp_path / "out"), "--no-shuffle"]) == 0
    samples = read_all(manifest_url(str(tmp_path / "out"), "train"))
    assert list(samples.values()) == [{"png": first}, {"jpeg": second}]


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("nope:3", "'nope'"),
        ("/no/such/folder", "'/no/such/folder'"),
        ("sklearn:iris", "'sklearn:iris'"),
        ("synthetic:0", "'synthetic:0'"),
        ("/no/such/train.manifest.json", "/no/such/train.manifest.json"),
    ],
)
def test_bad_source_is_one_line_exit_2(
    source: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([source, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert named in err and "sklearn:digits" in err  # the bad value and the valid kinds
    assert not (tmp_path / "out").exists()


def test_bad_source_exit_code_from_the_shell(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data.write", "imagenet:1k", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown source kind 'imagenet'"), result.stderr


def test_shard_bytes_bound_matches_the_files(digits_dataset: tuple[str, str], tmp_path: Path) -> None:
    import tarfile

    from data.shards import tar_archive_bytes, tar_member_bytes

    # Hand-computed tar sizes: header 512 + data padded to 512; archive + 1024, padded to 10240.
    assert tar_member_bytes(1) == 1024 and tar_member_bytes(512) == 1024 and tar_member_bytes(513) == 1536
    assert tar_archive_bytes(0) == 10240 and tar_archive_bytes(9216) == 10240 and tar_archive_bytes(9217) == 20480

    url, _ = digits_dataset
    original = read_all(url)
    limit = 40 * 1024
    assert main([url, str(tmp_path / "by_bytes"), "--shard-bytes", str(limit), "--shard-size", "100000"]) == 0
    manifest = read_manifest(manifest_url(str(tmp_path / "by_bytes"), "train"))
    assert len(manifest.shards) > 1 and sum(s.num_samples for s in manifest.shards) == len(original)
    for shard in manifest.shards:
        path = tmp_path / "by_bytes" / shard.name
        assert shard.bytes == path.stat().st_size <= limit
        with tarfile.open(path) as tar:
            payload = sum(tar_member_bytes(m.size) for m in tar.getmembers())
        assert tar_archive_bytes(payload) == shard.bytes
    assert read_all(manifest.url) == original
    assert main([url, str(tmp_path / "x"), "--shard-bytes", "100"]) == 2


def test_reshard_leaves_out_the_damaged_sample_of_a_truncated_shard(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tarfile

    from data.shards import write_shards

    samples = [{"__key__": f"k{i}", "png": image_bytes((i, 2 * i, 3 * i), "PNG"), "cls": i} for i in range(5)]
    write_shards(samples, str(tmp_path / "src"), prefix="src", shard_size=10)
    shard = tmp_path / "src" / "src-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("k3.png")
    shard.write_bytes(shard.read_bytes()[: member.offset_data + 10])  # cut inside k3's image
    with caplog.at_level("WARNING", logger="data.sources"):
        assert main([str(shard), str(tmp_path / "out"), "--prefix", "out"]) == 0
    copied = read_all(manifest_url(str(tmp_path / "out"), "out"))
    assert sorted(copied) == ["k0", "k1", "k2"]  # k3 damaged, k4 unreadable behind it
    assert all(set(fields) == {"cls", "png"} for fields in copied.values())  # no marker member written
    assert "'k3'" in caplog.text and "left out 1 damaged sample" in caplog.text


@pytest.mark.parametrize("options", ['{"key": "AKIAX", "secret": "s3cr3t"', '["AKIAX", "s3cr3t"]'])
def test_bad_storage_options_are_one_line_and_not_echoed(
    options: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["synthetic:4", str(tmp_path / "out"), "--storage-options", options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --storage-options ")
    assert "AKIAX" not in err and "s3cr3t" not in err  # what is passed there is usually a credential
    assert not (tmp_path / "out").exists()


def class_folder(root: Path, classes: int, per_class: int) -> dict[str, tuple[int, bytes]]:
    """An ImageNet-like folder: class sub-folders of distinct PNGs; returns key -> (label, bytes)
    with the keys the writer gives (the place in the sorted listing)."""
    out = {}
    for label in range(classes):
        for j in range(per_class):
            data = image_bytes((label * 40, j * 20, 7), "PNG")
            path = root / f"class{label}" / f"{j:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            out[f"img-{label * per_class + j:08d}"] = (label, data)
    return out


def shard_classes(manifest: str) -> list[set[int]]:
    return [{int(s["cls"]) for s in iter_shard(url)} for url in read_manifest(manifest).shard_urls()]


def test_a_folder_is_written_shuffled_seeded_and_every_image_once(tmp_path: Path) -> None:
    """Class order (one class per shard here) made contrastive batches of one or two classes."""
    from data.sources import shuffled_order

    expected = class_folder(tmp_path / "images", classes=4, per_class=8)

    def write(name: str, *flags: str) -> str:
        assert main([str(tmp_path / "images"), str(tmp_path / name), "--shard-size", "8", *flags]) == 0
        return manifest_url(str(tmp_path / name), "train")

    in_order = write("ordered", "--no-shuffle")
    assert shard_classes(in_order) == [{0}, {1}, {2}, {3}]
    shuffled = write("shuffled")  # the default for folders, seed 0
    samples = read_all(shuffled)
    # Every image exactly once, its key naming the same file as without shuffling.
    assert {k: (int(v["cls"]), v["png"]) for k, v in samples.items()} == expected
    assert list(samples) == [f"img-{i:08d}" for i in shuffled_order(32, 0)] != sorted(samples)
    assert sum(len(c) for c in shard_classes(shuffled)) > 4  # shards now mix classes
    # Seeded: the same seed writes the same shards (same manifest hash); another seed another order.
    again, other = write("again", "--seed", "0", "--workers", "1"), write("other", "--seed", "1")
    assert read_manifest(again).manifest_hash == read_manifest(shuffled).manifest_hash
    assert list(read_all(other)) != list(samples) and sorted(read_all(other)) == sorted(samples)


def test_shuffled_order_is_a_permutation() -> None:
    from data.sources import shuffled_order

    for count in (0, 1, 7, 1000):
        order = shuffled_order(count, 3)
        assert sorted(order) == list(range(count)) and order == shuffled_order(count, 3)


def test_parallel_reads_keep_the_order_and_raise_the_first_error() -> None:
    import random
    import time

    from data.sources import ordered_map

    def slow(i: int) -> dict:
        time.sleep(random.random() / 200)  # out-of-order completion
        return {"i": i}

    order = [5, 3, 9, 0, 1, 8, 2, 7, 6, 4] * 3
    assert [s["i"] for s in ordered_map(slow, order, workers=4)] == order

    def broken(i: int) -> dict:
        if i == 7:
            raise FileNotFoundError(f"image #{i + 1} does not exist")
        return {"i": i}

    got = []
    with pytest.raises(FileNotFoundError, match="image #8 does not exist"):
        for sample in ordered_map(broken, range(20), workers=3):
            got.append(sample["i"])
    assert got == list(range(7))  # everything before the bad image, in order


def test_shuffle_of_a_streamed_source_is_one_line_exit_2(
    digits_dataset: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, _ = digits_dataset
    assert main([manifest, str(tmp_path / "out"), "--shuffle"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --shuffle: ") and err.endswith(
        "is read as a stream, in its own order; drop --shuffle"
    )
    assert "\n" not in err
