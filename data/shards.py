"""WebDataset tar shards on any fsspec URL: write them (with a manifest) and stream them back.

Format (the WebDataset convention): a sample is the run of consecutive tar
members sharing a key; a member is named `<key>.<ext>`, the key being the path
up to the first dot of the basename. Values are raw bytes: images as encoded
files (`png`, `jpg`, ...), ints and strings as UTF-8 text (`cls` -> b"7").

Shards are written to a temporary name and moved into place once complete, so
a crash never leaves a partial shard under a final name; the manifest is moved
into place last, so its presence means the whole write finished. Tar headers
are normalised (mtime 0, uid/gid 0, mode 0644), so the same samples always
give byte-identical shards and the same manifest hash.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import fsspec

from data.manifest import MANIFEST_SUFFIX, Manifest, ShardInfo, make_manifest, manifest_to_json
from data.progress import Progress
from data.retry import Backoff, is_transient, one_line

logger = logging.getLogger(__name__)

KEY_FIELD = "__key__"
URL_FIELD = "__url__"  # set by iter_shard: the shard a sample came from
ERROR_FIELD = "__error__"  # set by iter_shard on the one marker that ends a damaged shard
SHARD_NAME_DIGITS = 6


class ShardReadError(RuntimeError):
    """A shard is missing or unreadable, or storage stayed unavailable past the retries."""


def shard_name(prefix: str, index: int) -> str:
    """File name of shard `index` of a dataset written with `prefix`."""
    return f"{prefix}-{index:0{SHARD_NAME_DIGITS}d}.tar"


def manifest_url(out_url: str, prefix: str) -> str:
    """Where `write_shards(..., out_url, prefix=prefix)` puts the manifest."""
    return f"{out_url.rstrip('/')}/{prefix}{MANIFEST_SUFFIX}"


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.seg.png` -> (`dir/abc`, `seg.png`): key up to the basename's first dot."""
    dirname, basename = posixpath.split(name)
    stem, dot, ext = basename.partition(".")
    return posixpath.join(dirname, stem) if dirname else stem, ext if dot else ""


def _encode(value: Any, key: str, ext: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):  # bool is an int; refuse the ambiguity
        raise TypeError(f"sample {key!r} field {ext!r}: bool is not supported; store an int")
    if isinstance(value, (int, str)):
        return str(value).encode()
    raise TypeError(f"sample {key!r} field {ext!r}: {type(value).__name__} is not bytes, int or str")


def _members(sample: dict[str, Any], position: int) -> list[tuple[str, bytes]]:
    """(member name, bytes) of one sample, in sorted extension order."""
    key = sample.get(KEY_FIELD)
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample #{position} has no string {KEY_FIELD!r}; got {key!r}")
    if split_member_name(key + ".x") != (key, "x") or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"sample key {key!r} must not contain '.' in its basename, nor start or end with '/'")
    fields = {ext: value for ext, value in sample.items() if ext != KEY_FIELD}
    if not fields:
        raise ValueError(f"sample {key!r} has no fields besides {KEY_FIELD!r}")
    for ext in fields:
        if not ext or "/" in ext or ext.startswith("."):
            raise ValueError(f"sample {key!r}: bad field name {ext!r} (use a plain extension such as 'png' or 'cls')")
    return [(f"{key}.{ext}", _encode(fields[ext], key, ext)) for ext in sorted(fields)]


class _HashingWriter:
    """Write-through file wrapper that hashes and counts what passes."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_member_bytes(size: int) -> int:
    """Bytes one member takes in a tar: a 512-byte header plus data padded to 512."""
    return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def tar_archive_bytes(payload: int) -> int:
    """Size of a finished tar stream: members + two zero blocks, padded to a 10 KiB record."""
    return -(-(payload + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardWriter:
    """Writes numbered shards of at most `shard_size` samples (and, if set, at most
    `shard_bytes` bytes unless a single sample is larger), each via a temp name."""

    def __init__(
        self, fs: fsspec.AbstractFileSystem, root: str, prefix: str, shard_size: int, shard_bytes: int | None = None
    ) -> None:
        self.fs, self.root, self.prefix, self.shard_size = fs, root, prefix, shard_size
        self.shard_bytes = shard_bytes
        self._payload = 0  # tar bytes of the members added to the open shard
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._file: BinaryIO | None = None
        self._hasher: _HashingWriter | None = None
        self._tmp_path = ""
        self._count = 0
        self._keys: set[str] = set()

    def add(self, members: list[tuple[str, bytes]], key: str) -> None:
        size = sum(tar_member_bytes(len(data)) for _, data in members)
        if (
            self._tar is not None
            and self.shard_bytes is not None
            and self._count > 0
            and tar_archive_bytes(self._payload + size) > self.shard_bytes
        ):
            self.finish()
        if self._tar is None:
            self._open()
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {shard_name(self.prefix, len(self.shards))}")
        self._keys.add(key)
        assert self._tar is not None
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._payload += size
        self._count += 1
        if self._count == self.shard_size:
            self.finish()

    def _open(self) -> None:
        final = shard_name(self.prefix, len(self.shards))
        self._tmp_path = f"{self.root}/.{final}.tmp-{uuid.uuid4().hex}"
        self._file = self.fs.open(self._tmp_path, "wb")
        self._hasher = _HashingWriter(self._file)
        # "w|": a pure stream, so remote stores get one sequential upload.
        self._tar = tarfile.open(fileobj=self._hasher, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - closed in finish()/abort()
        self._count, self._keys, self._payload = 0, set(), 0

    def finish(self) -> None:
        """Close the open shard (if any) and move it under its final name."""
        if self._tar is None:
            return
        assert self._file is not None and self._hasher is not None
        self._tar.close()
        self._file.close()
        name = shard_name(self.prefix, len(self.shards))
        self.fs.mv(self._tmp_path, f"{self.root}/{name}")
        self.shards.append(ShardInfo(name, self._count, self._hasher.bytes, self._hasher.sha256.hexdigest()))
        self._tar = self._file = self._hasher = None

    def abort(self) -> None:
        """Drop the open shard's temp file after a failure."""
        if self._tar is not None:
            try:
                # Close the tar stream now, or its finaliser writes into the closed file later.
                self._tar.close()
            except OSError as e:
                logger.warning("while aborting shard %s: %s", self._tmp_path, e)
        if self._file is not None:
            self._file.close()
            if self.fs.exists(self._tmp_path):
                self.fs.rm(self._tmp_path)
        self._tar = self._file = self._hasher = None


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_url: str,
    *,
    prefix: str,
    shard_size: int,
    shard_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Write `samples` as `out_url/{prefix}-NNNNNN.tar` shards plus `out_url/{prefix}.manifest.json`.

    `progress` (data.progress) counts the samples written.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if shard_bytes is not None and shard_bytes < tarfile.RECORDSIZE:
        raise ValueError(f"shard_bytes must be >= {tarfile.RECORDSIZE} (one tar record), got {shard_bytes}")
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix {prefix!r} must be a non-empty name without '/' or '.'")
    fs, root = fsspec.core.url_to_fs(out_url, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    writer = _ShardWriter(fs, root, prefix, shard_size, shard_bytes)
    extensions: set[str] = set()
    try:
        for position, sample in enumerate(samples):
            members = _members(sample, position)
            extensions.update(split_member_name(name)[1] for name, _ in members)
            writer.add(members, sample[KEY_FIELD])
            if progress is not None:
                progress.update()
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    if not writer.shards:
        raise ValueError(f"no samples to write to {out_url!r}")

    url = manifest_url(out_url, prefix)
    manifest = make_manifest(prefix, writer.shards, extensions, url=url)
    tmp = f"{root}/.{prefix}{MANIFEST_SUFFIX}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "w") as f:
        f.write(manifest_to_json(manifest))
    fs.mv(tmp, f"{root}/{prefix}{MANIFEST_SUFFIX}")
    logger.info(
        "wrote %d samples in %d shards to %s (manifest %s)",
        manifest.total_samples,
        len(manifest.shards),
        out_url,
        manifest.manifest_hash[:12],
    )
    return manifest


class _HeaderTrackingTarInfo(tarfile.TarInfo):
    """Records on its `_ShardTar` why reading a member header failed."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            if isinstance(tar, _ShardTar):
                tar.header_error = e
            raise


class _ShardTar(tarfile.TarFile):
    """A tar stream that can tell a real end (a zero block) from a cut one.

    tarfile ends iteration silently when the next header is missing, cut short or
    garbage; only an all-zero block is the end-of-archive marker.
    """

    tarinfo = _HeaderTrackingTarInfo
    header_error: tarfile.HeaderError | None = None

    def ended_cleanly(self) -> bool:
        return isinstance(self.header_error, tarfile.EOFHeaderError)


_END_REASONS = {
    tarfile.EmptyHeaderError: "ends without the end-of-archive marker (truncated at a member boundary)",
    tarfile.TruncatedHeaderError: "truncated inside a member header",
    tarfile.InvalidHeaderError: "has a corrupt member header",
}


class _Cursor:
    """Where a shard read stands: `resume` = tar members before the first member of
    the sample being assembled (all earlier samples were yielded)."""

    def __init__(self) -> None:
        self.resume = 0


def _read_samples(url: str, f: BinaryIO, wanted: frozenset[str] | None, cursor: _Cursor) -> Iterator[dict[str, Any]]:
    """One pass over an opened shard from member `cursor.resume`; damage ends it with one error marker."""
    current: dict[str, Any] | None = None
    try:
        with _ShardTar.open(fileobj=f, mode="r|*") as tar:
            for index, member in enumerate(tar):
                if index < cursor.resume or not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if current is not None and current[KEY_FIELD] != key:
                    # A header of the next sample was read whole: `current` is complete.
                    done, current, cursor.resume = current, None, index
                    yield done
                if current is None:
                    current = {KEY_FIELD: key, URL_FIELD: url}
                if wanted is None or ext in wanted:
                    data = tar.extractfile(member)
                    assert data is not None  # regular file
                    current[ext] = data.read()
            if not tar.ended_cleanly():
                reason = _END_REASONS.get(type(tar.header_error), f"stopped early ({tar.header_error})")
                yield _error_marker(url, current, f"shard {reason}")
                return
    except (tarfile.TarError, EOFError) as e:
        if is_transient(e):  # asyncio.IncompleteReadError is an EOFError
            raise
        where = "is not a readable tar stream" if cursor.resume == 0 and current is None else "is truncated or corrupt"
        yield _error_marker(url, current, f"shard {where} ({e})")
        return
    if current is not None:
        yield current


def _error_marker(url: str, damaged: dict[str, Any] | None, reason: str) -> dict[str, Any]:
    return {KEY_FIELD: "" if damaged is None else damaged[KEY_FIELD], URL_FIELD: url, ERROR_FIELD: reason}


def iter_shard(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    keep: Iterable[str] | None = None,
    retries: int = 6,
    retry_wait_s: float = 0.5,
) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar shard as `{"__key__", "__url__", ext: bytes}` dicts.

    Every yielded dict has KEY_FIELD and URL_FIELD. A dict with ERROR_FIELD is a
    bad sample the caller must skip and count: a truncated, empty or non-tar shard
    yields its complete samples, then one such marker (key of the damaged sample,
    "" if unknown), and ends. A sample is complete only once the next sample's
    header or the end-of-archive marker was read, so a cut-off sample is never
    yielded as whole.

    keep: extensions whose bytes to read (None = all); other members are skipped
    unread, but a sample whose members were all skipped is still yielded (keyed,
    without fields) so the caller can count it.

    Transient storage errors (see `data.retry.is_transient`) are retried up to
    `retries` times in a row, waiting `retry_wait_s` doubling up to 30 s; each
    retry re-opens the shard and resumes at the first sample not yet yielded (by
    skipping the members before it), and a yielded sample refills the budget.
    Then ShardReadError. So the yielded sequence is a deterministic function of
    the shard's bytes, retries included: callers may index samples by position.
    A missing shard or another storage error raises ShardReadError at once.
    """
    wanted = None if keep is None else frozenset(keep)
    backoff = Backoff(f"shard {url}", retries, retry_wait_s)
    cursor = _Cursor()
    while True:
        resume_at = cursor.resume
        try:
            with fsspec.open(url, "rb", **(storage_options or {})) as f:
                for sample in _read_samples(url, f, wanted, cursor):
                    if cursor.resume != resume_at:
                        backoff.reset()
                    yield sample
            return
        except FileNotFoundError as e:
            raise ShardReadError(f"shard {url!r} does not exist; check data.urls or the manifest") from e
        except Exception as e:
            if not is_transient(e):
                if isinstance(e, OSError):
                    raise ShardReadError(f"shard {url!r} cannot be read: {one_line(e)}") from e
                raise
            if not backoff.wait(e):
                raise ShardReadError(backoff.give_up_message(e)) from e
