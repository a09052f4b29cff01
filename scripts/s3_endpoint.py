"""A real S3 HTTP endpoint on 127.0.0.1 for local runs and tests (moto's server mode).

    python scripts/s3_endpoint.py [--port 9000] [--bucket pretrain]

starts `moto_server` (from the same virtual environment as this Python) bound to
127.0.0.1 only, waits until it answers, creates the bucket and prints the
environment to export, one `export` line each:

    export AWS_ENDPOINT_URL=http://127.0.0.1:9000
    export AWS_ACCESS_KEY_ID=testing
    export AWS_SECRET_ACCESS_KEY=testing
    export AWS_DEFAULT_REGION=us-east-1

It then runs in the foreground until Ctrl-C or SIGTERM, and stops moto on the
way out. Everything is in memory: the data is gone when it stops.

boto3/s3fs honour AWS_ENDPOINT_URL, so with those variables exported,
`s3://pretrain/...` URLs (shard writer, data.urls) go to this endpoint; code that
passes storage_options explicitly uses
`{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "key": "testing", "secret": "testing"}`.

Real object storage instead:
- AWS S3: `unset AWS_ENDPOINT_URL` and export real credentials
  (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and AWS_DEFAULT_REGION.
- MinIO (or any S3-compatible store): `export AWS_ENDPOINT_URL=http://minio-host:9000`
  with that server's access key and secret in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import IO

logger = logging.getLogger("s3_endpoint")

HOST = "127.0.0.1"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def moto_executable() -> str:
    """`moto_server` next to this Python (same venv), else on PATH."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:
        raise FileNotFoundError(
            f"no moto_server beside {sys.executable} nor on PATH; install it with pip install 'moto[server]'"
        )
    return found


class MotoServer:
    """One `moto_server` process on 127.0.0.1:port: start, wait until it answers, stop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint_url = f"http://{HOST}:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start moto and return once it answers HTTP (raises if it exits or stays silent)."""
        # moto logs every request to stderr: a file, not a pipe nobody drains (a full pipe blocks it).
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [moto_executable(), "-H", HOST, "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
                raise RuntimeError(
                    f"moto_server exited with code {self.process.returncode} on port {self.port} "
                    f"(port taken? pick another with --port): {err.strip()[-500:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"moto_server did not answer on {self.endpoint_url} within {timeout_s:.0f} s")
            time.sleep(0.1)

    def create_bucket(self, bucket: str) -> None:
        """Create `bucket` on this endpoint (boto3 comes with moto)."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=bucket)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate moto (SIGTERM, then SIGKILL after `timeout_s`) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("moto_server (pid %d) ignored SIGTERM; killing it", self.process.pid)
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--bucket", default="pretrain", help="bucket to create (default: pretrain)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # SIGTERM takes the same way out as Ctrl-C, so moto is always stopped. SIGINT too, also
    # when the script was started with SIGINT ignored (as `cmd &` in a non-interactive shell
    # does, and then Python installs no Ctrl-C handler).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    server = MotoServer(args.port or free_port())
    try:
        server.start()
        server.create_bucket(args.bucket)
        env = {"AWS_ENDPOINT_URL": server.endpoint_url, **CREDENTIALS}
        assert server.process is not None
        for name, value in env.items():
            print(f"export {name}={value}")
        # A comment line, so the output stays `eval`-able; tests use it to check moto is gone.
        print(f"# bucket s3://{args.bucket}, moto_server pid {server.process.pid}; Ctrl-C to stop", flush=True)
        while server.process.poll() is None:
            time.sleep(0.5)
        logger.error("moto_server exited on its own with code %d", server.process.returncode)
        return 1
    except KeyboardInterrupt:
        logger.info("stopping moto_server on %s", server.endpoint_url)
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
