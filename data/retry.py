"""Retrying reads from object storage: which errors are transient, and the backoff between attempts.

Used by `data.shards.iter_shard` and `data.manifest.read_manifest`. Through
s3fs an endpoint that is down surfaces as `botocore.exceptions.EndpointConnectionError`
(its chain: `aiohttp.ClientConnectorError`, `ConnectionRefusedError`), also when
it goes away in the middle of a read: s3fs retries the dropped read itself, then
fails to reconnect (seen against moto behind a TCP proxy on 127.0.0.1). Also
transient: botocore's and aiohttp's other connection and timeout errors, and
throttling and 5xx, which s3fs raises as OSError(EBUSY) (SlowDown,
ServiceUnavailable), OSError(EREMOTEIO) (InternalError) or OSError(EIO) caused
by the ClientError. Before an error gets here botocore has retried the
connection (5 attempts, 5-10 s against a closed port with its default settings).
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import logging
import sys
import time

logger = logging.getLogger(__name__)

MAX_WAIT_S = 30.0

# Retries made by this process so far (every Backoff); the loader reports them as data/io_retries.
_retries_made = 0


def retries_made() -> int:
    """Storage retries (sleeps before another attempt) made in this process so far."""
    return _retries_made


# errnos of an OSError that mean "try again later": network failures, and what s3fs
# maps throttling (SlowDown, ServiceUnavailable -> EBUSY) and InternalError (-> EREMOTEIO) to.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "ECONNABORTED",
        "ECONNREFUSED",
        "ECONNRESET",
        "EHOSTUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "ENETUNREACH",
        "EPIPE",
        "EREMOTEIO",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)
# Definitive answers from the store, even when their cause chain holds a network error.
_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)
_THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeout"}
)

_BUILTIN_TRANSIENT: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncio.IncompleteReadError,
    http.client.IncompleteRead,
)


def _transient_types() -> tuple[type[BaseException], ...]:
    """Transient error types, including those of botocore and aiohttp if loaded (an error from
    a library that was never imported cannot occur, so neither is imported here)."""
    types = _BUILTIN_TRANSIENT
    boto = sys.modules.get("botocore.exceptions")
    if boto is not None:
        # EndpointConnectionError and ConnectTimeoutError are botocore's own ConnectionError;
        # ConnectionClosedError, ReadTimeoutError and ResponseStreamingError are HTTPClientErrors.
        types += (boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        types += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    return types


def _status(error: BaseException) -> tuple[int, str]:
    """HTTP status and error code of a botocore ClientError or aiohttp ClientResponseError (else 0, "")."""
    boto = sys.modules.get("botocore.exceptions")
    if boto is not None and isinstance(error, boto.ClientError):
        meta = error.response.get("ResponseMetadata", {})
        return int(meta.get("HTTPStatusCode") or 0), str(error.response.get("Error", {}).get("Code", ""))
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(error, aiohttp.ClientResponseError):
        return error.status, ""
    return 0, ""


def is_transient(error: BaseException) -> bool:
    """Whether `error` (or an error in its cause chain) is worth retrying: network, timeout, throttling, 5xx."""
    if isinstance(error, _PERMANENT):
        return False
    transient_types = _transient_types()
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, transient_types):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        status, code = _status(current)
        if status >= 500 or status == 429 or code in _THROTTLING_CODES:
            return True
        current = current.__cause__ or current.__context__
    return False


def one_line(error: BaseException) -> str:
    """`Type: message` on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Backoff:
    """Failed attempts in a row at one object: log and sleep before each retry, say when to give up.

    The k-th retry waits `first_wait_s * 2**(k-1)` seconds, capped at 30 s.
    """

    def __init__(self, what: str, retries: int, first_wait_s: float) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if first_wait_s < 0:
            raise ValueError(f"retry wait must be >= 0 s, got {first_wait_s}")
        self.what, self.retries, self.first_wait_s = what, retries, first_wait_s
        self.failures = 0
        self._first_failure = 0.0

    def reset(self) -> None:
        """The last attempt made progress: the next failure starts a fresh series."""
        self.failures = 0

    def wait(self, error: BaseException) -> bool:
        """After a transient `error`: log and sleep, then True; False once the retries are spent."""
        if self.failures == 0:
            self._first_failure = time.monotonic()
        self.failures += 1
        if self.failures > self.retries:
            return False
        wait_s = min(self.first_wait_s * 2 ** (self.failures - 1), MAX_WAIT_S)
        global _retries_made
        _retries_made += 1
        logger.warning(
            "%s: %s (attempt %d of %d); retrying in %.2f s",
            self.what,
            one_line(error),
            self.failures,
            self.retries + 1,
            wait_s,
        )
        time.sleep(wait_s)
        return True

    def give_up_message(self, error: BaseException) -> str:
        """One line: what failed, how often, for how long, and the last error."""
        seconds = time.monotonic() - self._first_failure
        attempts = f"{self.failures} attempt{'s' if self.failures != 1 else ''}"
        return f"{self.what}: gave up after {attempts} in a row over {seconds:.1f} s; last error {one_line(error)}"
