"""Damaged shards and an unreliable S3 endpoint: what `iter_shard` and `read_manifest` make of them.

The endpoint faults are real: a TCP proxy on 127.0.0.1 in front of the moto
endpoint is stopped (listener closed, live connections reset) and restarted.
"""

from __future__ import annotations

import errno
import logging
import random
import tarfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from data.manifest import read_manifest
from data.retry import is_transient
from data.shards import ERROR_FIELD, KEY_FIELD, URL_FIELD, ShardReadError, iter_shard, manifest_url, write_shards

BLOCK = 512


# ---------------------------------------------------------------- damaged shard files


def two_member_samples(n: int) -> list[dict[str, Any]]:
    """Samples of two members (`bin`, then `json`) with sizes that leave padding in most blocks."""
    rng = random.Random(0)
    return [
        {KEY_FIELD: f"d{i:03d}", "bin": rng.randbytes(300 + 397 * i), "json": b"%d" % i * (100 + 130 * i)}
        for i in range(n)
    ]


def padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def layout(samples: list[dict[str, Any]]) -> tuple[list[list[tuple[int, int]]], int]:
    """Per sample, per member in tar order: (header offset, data size); and where the payload ends."""
    offset, members = 0, []
    for sample in samples:
        rows = []
        for ext in ("bin", "json"):  # the writer sorts extensions
            rows.append((offset, len(sample[ext])))
            offset += BLOCK + padded(len(sample[ext]))
        members.append(rows)
    return members, offset


def expected_outcome(samples: list[dict[str, Any]], cut: int) -> tuple[int, str | None]:
    """(how many samples come out whole, marker key or None) for the shard cut to `cut` bytes.

    A sample counts as whole once the next sample's first header (or, after the
    last sample, the first end-of-archive zero block) lies complete before the cut.
    """
    members, payload_end = layout(samples)
    ends = [rows[0][0] + BLOCK for rows in members[1:]] + [payload_end + BLOCK]
    whole = sum(1 for end in ends if cut >= end)
    if whole == len(samples):
        return whole, None
    first_header_read = cut >= members[whole][0][0] + BLOCK
    return whole, samples[whole][KEY_FIELD] if first_header_read else ""


@pytest.fixture(scope="module")
def damaged_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], bytes]:
    """Six two-member samples in one shard, and the shard's bytes."""
    root = tmp_path_factory.mktemp("damaged")
    samples = two_member_samples(6)
    write_shards(samples, str(root), prefix="d", shard_size=len(samples))
    data = (root / "d-000000.tar").read_bytes()
    assert layout(samples)[1] + 2 * BLOCK <= len(data)  # the layout model matches the file
    return samples, data


def cut_points(samples: list[dict[str, Any]]) -> dict[str, int]:
    members, payload_end = layout(samples)
    (s2_bin, _), (s2_json, _) = members[2]
    (s5_bin, s5_bin_size), (s5_json, s5_json_size) = members[5]
    s1_json, s1_json_size = members[1][1]
    return {
        "mid-header-first-member": s2_bin + 100,
        "mid-header-second-member": s2_json + 300,
        "mid-data-last-member": s5_json + BLOCK + s5_json_size // 2,
        "mid-data-first-member-of-last-sample": s5_bin + BLOCK + s5_bin_size // 2,
        "in-padding": s1_json + BLOCK + s1_json_size + 7,
        "member-boundary-inside-sample": members[3][1][0],  # after d003.bin, before d003.json
        "sample-boundary": members[4][0][0],
        "payload-end-no-marker": payload_end,
        "inside-end-marker": payload_end + 100,
        "after-first-zero-block": payload_end + BLOCK,
    }


@pytest.mark.parametrize("keep", [None, ()], ids=["read-all", "read-none"])
@pytest.mark.parametrize(
    "where",
    [
        "mid-header-first-member",
        "mid-header-second-member",
        "mid-data-last-member",
        "mid-data-first-member-of-last-sample",
        "in-padding",
        "member-boundary-inside-sample",
        "sample-boundary",
        "payload-end-no-marker",
        "inside-end-marker",
        "after-first-zero-block",
    ],
)
def test_truncated_shard_yields_whole_samples_then_one_marker(
    damaged_source: tuple[list[dict[str, Any]], bytes], where: str, keep: tuple[str, ...] | None, tmp_path: Path
) -> None:
    samples, data = damaged_source
    cut = cut_points(samples)[where]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    whole, marker_key = expected_outcome(samples, cut)

    out = list(iter_shard(str(path), keep=keep))

    good = [s for s in out if ERROR_FIELD not in s]
    assert len(good) == whole
    for got, written in zip(good, samples, strict=False):
        fields = {ext: value for ext, value in written.items() if ext != KEY_FIELD and (keep is None or ext in keep)}
        assert got == {KEY_FIELD: written[KEY_FIELD], URL_FIELD: str(path), **fields}
    if marker_key is None:
        assert len(out) == whole
    else:
        assert len(out) == whole + 1  # one marker, last
        assert set(out[-1]) == {KEY_FIELD, URL_FIELD, ERROR_FIELD}
        assert out[-1][KEY_FIELD] == marker_key and out[-1][URL_FIELD] == str(path)
        assert "\n" not in out[-1][ERROR_FIELD] and out[-1][ERROR_FIELD]


def test_expected_outcome_model_on_hand_picked_cuts(damaged_source: tuple[list[dict[str, Any]], bytes]) -> None:
    samples, _ = damaged_source
    # d000: bin 300 B (1 block), json 100 B -> members at 0 and 1024; d001 starts at 2048
    # with bin 697 B (2 blocks), json at 2048 + 512 + 1024.
    assert layout(samples)[0][:2] == [[(0, 300), (1024, 100)], [(2048, 697), (3584, 230)]]
    assert expected_outcome(samples, 2048 + 511) == (0, "d000")  # d001's header cut: d000 unconfirmed
    assert expected_outcome(samples, 2048 + 512) == (1, "d001")
    assert expected_outcome(samples, 100) == (0, "")


def test_corrupt_header_mid_shard_is_not_a_silent_end(
    damaged_source: tuple[list[dict[str, Any]], bytes], tmp_path: Path
) -> None:
    samples, data = damaged_source
    header = layout(samples)[0][3][0][0]  # d003.bin's header: d002 is then unconfirmed
    corrupt = bytearray(data)
    corrupt[header : header + 100] = b"x" * 100  # name and mode garbled: the checksum no longer matches
    path = tmp_path / "corrupt.tar"
    path.write_bytes(bytes(corrupt))
    out = list(iter_shard(str(path)))
    assert [s[KEY_FIELD] for s in out] == ["d000", "d001", "d002"]
    assert ERROR_FIELD not in out[1] and "corrupt member header" in out[2][ERROR_FIELD]


@pytest.mark.parametrize("content", [b"", random.Random(1).randbytes(5000)], ids=["zero-bytes", "random-bytes"])
def test_not_a_tar_yields_one_marker(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(content)
    (marker,) = list(iter_shard(str(path)))
    assert marker[KEY_FIELD] == "" and marker[URL_FIELD] == str(path)
    assert "not a readable tar" in marker[ERROR_FIELD]


def test_missing_shard_is_an_error_not_a_marker(tmp_path: Path) -> None:
    url = str(tmp_path / "nope.tar")
    with pytest.raises(ShardReadError, match="does not exist") as info:
        list(iter_shard(url))
    assert url in str(info.value)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs: SlowDown
        (TimeoutError("read timed out"), True),
        (OSError(errno.EIO, "boom"), False),
        (tarfile.ReadError("unexpected end of data"), False),
        (PermissionError(errno.EACCES, "Access Denied"), False),
    ],
)
def test_is_transient_by_type_and_errno(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_is_transient_follows_the_cause_chain() -> None:
    def client_error(status: int, code: str) -> OSError:
        # What s3fs raises for an unmapped error code: OSError(EIO) caused by the ClientError.
        wrapped = OSError(errno.EIO, code)
        wrapped.__cause__ = ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Get"
        )
        return wrapped

    assert is_transient(client_error(503, "ServiceUnavailable"))
    assert is_transient(client_error(500, "WeirdBackendError"))
    assert not is_transient(client_error(400, "InvalidArgument"))
    missing = FileNotFoundError("NoSuchKey")
    missing.__context__ = ConnectionResetError()  # a definitive answer wins over its history
    assert not is_transient(missing)


# ---------------------------------------------------------------- an unreliable endpoint

SAMPLES, PAYLOAD = 24, 40_000


@pytest.fixture(scope="module")
def s3_shard(s3_endpoint: Any) -> tuple[str, str]:
    """One 24-sample shard (40 KB of random bytes each) on the endpoint: (shard URL, manifest URL)."""
    out = f"s3://{s3_endpoint.bucket}/faults-{uuid.uuid4().hex[:8]}"
    rng = random.Random(2)
    samples = [{KEY_FIELD: f"f{i:03d}", "bin": rng.randbytes(PAYLOAD), "cls": i} for i in range(SAMPLES)]
    manifest = write_shards(samples, out, prefix="f", shard_size=SAMPLES, storage_options=s3_endpoint.storage_options)
    return manifest.shard_urls()[0], manifest_url(out, "f")


@pytest.fixture
def proxy(s3_proxy: Any) -> Any:
    return s3_proxy


def through(proxy: Any, s3_endpoint: Any) -> dict[str, Any]:
    """Options that reach the endpoint via the proxy, read in 32 KiB requests (so a shard takes
    many), with botocore's own retries off so an outage reaches iter_shard quickly (s3fs still
    retries 5 times within ~1.5 s)."""
    return {
        "client_kwargs": {"endpoint_url": proxy.url},
        "key": s3_endpoint.env["AWS_ACCESS_KEY_ID"],
        "secret": s3_endpoint.env["AWS_SECRET_ACCESS_KEY"],
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 5, "read_timeout": 10},
        "default_block_size": 32 * 1024,
        "skip_instance_cache": True,
    }


def retry_warnings(caplog: pytest.LogCaptureFixture, url: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and url in r.getMessage()]


def test_outage_mid_shard_resumes_without_loss_or_repeat(
    s3_endpoint: Any, s3_shard: tuple[str, str], proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = s3_shard[0]
    clean = list(iter_shard(url, s3_endpoint.storage_options))
    assert [s[KEY_FIELD] for s in clean] == [f"f{i:03d}" for i in range(SAMPLES)]

    got: list[dict[str, Any]] = []
    restart = threading.Timer(3.0, proxy.start)
    try:
        with caplog.at_level(logging.WARNING, logger="data.retry"):
            for sample in iter_shard(url, through(proxy, s3_endpoint), retries=5, retry_wait_s=0.25):
                got.append(sample)
                if len(got) == 5:  # the endpoint goes away for 3 s, mid-shard
                    proxy.stop()
                    restart.start()
    finally:
        if restart.is_alive():
            restart.join()

    assert [s[KEY_FIELD] for s in got] == [s[KEY_FIELD] for s in clean]  # each sample once, in order
    assert got == clean  # and byte for byte
    warnings = retry_warnings(caplog, url)
    assert warnings and "attempt 1 of 6" in warnings[0]  # the outage really hit the stream


def test_outage_longer_than_the_budget_raises_one_line(
    s3_endpoint: Any, s3_shard: tuple[str, str], proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = s3_shard[0]
    got = []
    with caplog.at_level(logging.WARNING, logger="data.retry"), pytest.raises(ShardReadError) as info:
        for sample in iter_shard(url, through(proxy, s3_endpoint), retries=2, retry_wait_s=0.05):
            got.append(sample[KEY_FIELD])
            if len(got) == 3:
                proxy.stop()  # for good
    message = str(info.value)
    assert "\n" not in message and url in message and "3 attempts" in message
    assert "EndpointConnectionError" in message  # what s3fs raises for a refused connection
    assert got == ["f000", "f001", "f002"]
    assert len(retry_warnings(caplog, url)) == 2


def test_missing_object_fails_at_once(
    s3_endpoint: Any, s3_shard: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url = s3_shard[0].replace("f-000000.tar", "f-000099.tar")
    with caplog.at_level(logging.WARNING, logger="data.retry"), pytest.raises(ShardReadError, match="does not exist"):
        list(iter_shard(url, s3_endpoint.storage_options))
    assert not retry_warnings(caplog, url)


class OnFirstWarning(logging.Handler):
    """Runs `action` when the first warning is logged: an outage that lasts until a retry noticed it."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.action, self.fired = action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.fired:
            self.fired = True
            self.action()


def test_manifest_read_rides_out_an_outage(
    s3_endpoint: Any, s3_shard: tuple[str, str], proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = s3_shard[1]
    expected = read_manifest(url, s3_endpoint.storage_options)
    proxy.stop()
    restart = OnFirstWarning(proxy.start)
    retry_logger = logging.getLogger("data.retry")
    retry_logger.addHandler(restart)
    try:
        with caplog.at_level(logging.WARNING, logger="data.retry"):
            manifest = read_manifest(url, through(proxy, s3_endpoint), retries=4, retry_wait_s=0.2)
    finally:
        retry_logger.removeHandler(restart)
    assert restart.fired and len(retry_warnings(caplog, url)) == 1
    assert manifest == expected and manifest.shard_urls() == expected.shard_urls()

    proxy.stop()
    with pytest.raises(OSError, match="gave up after 1 attempt in a row") as info:
        read_manifest(url, through(proxy, s3_endpoint), retries=0)
    assert url in str(info.value) and "\n" not in str(info.value)
