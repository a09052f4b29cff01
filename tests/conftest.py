"""A real S3 endpoint on 127.0.0.1 for the tests: scripts/s3_endpoint.py run as a subprocess."""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "s3_endpoint.py"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0

# The tests start their own services: what a developer exported for a stack or a cluster
# (`eval "$(scripts/stack.sh env)"`) must not send test runs there.
for _name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "PRETRAIN_STORAGE_PATH"):
    os.environ.pop(_name, None)


# `make test` runs the suite on 2 pytest-xdist workers, a test file to a worker at a time
# (--dist loadfile, --no-loadscope-reorder: files go out in the order below, not by their test
# count, which put the single-test end-to-end files last and left one worker idle for minutes at
# the end). The end-to-end files go first, longest first; the many short unit-test files after
# them fill the gaps, so the two workers end together.
LONGEST_FIRST = (
    "test_cluster_job.py",
    "test_more_objectives.py",
    "test_train.py",
    "test_node_loss.py",
    "test_pipeline.py",
    "test_storage_outage.py",
    "test_nonfinite.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return (
            LONGEST_FIRST.index(name)
            if item.path.parent.name == "e2e" and name in LONGEST_FIRST
            else len(LONGEST_FIRST)
        )

    items.sort(key=rank)  # stable: the order within a file, and of the unit tests, is kept


# The project's loggers as the session found them, before any run configured them.
_PROJECT_LOGGERS = [logging.getLogger(name) for name in ("pretrain", "data", "objectives")]
_PROJECT_LOGGING = [(logger.level, list(logger.handlers), logger.propagate) for logger in _PROJECT_LOGGERS]


@pytest.fixture(autouse=True)
def _project_logging_restored() -> Iterator[None]:
    """After each test the project's loggers are as the session found them: a run in this process
    (`pretrain.run.main`, also from a module-scoped fixture) sends their INFO lines to stderr from
    then on, which would reach a later test's captured output."""
    yield
    for logger, (level, handlers, propagate) in zip(_PROJECT_LOGGERS, _PROJECT_LOGGING, strict=True):
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty sqlite MLflow store, created once per session (by MLflow, in the session's working
    directory)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def empty_mlflow_store(_migrated_mlflow_db: Path) -> Callable[[Path], str]:
    """`make(path)`: the URI of a new, empty sqlite MLflow store at `path`, a copy of the session's.

    A store MLflow creates runs its Alembic migrations: 2.1-2.4 cpu-s each on the 2-core VM. The
    copy is the same database; only its Default experiment's artifact path names the session's
    working directory, and the tests that use this make experiments of their own."""

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_migrated_mlflow_db, path)
        return f"sqlite:///{path}"

    return make


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie counts as gone: it runs no code)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state != "Z"


@dataclass
class S3EndpointProcess:
    """`python scripts/s3_endpoint.py --bucket B` running, with what it printed."""

    bucket: str = "pretrain"
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # the exported AWS_* variables
    moto_pid: int = 0

    @property
    def endpoint_url(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "client_kwargs": {"endpoint_url": self.endpoint_url},
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
        }

    def start(self) -> S3EndpointProcess:
        """Start the script (on a free port) and return once it printed its exports."""
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--bucket", self.bucket], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline, pending = time.monotonic() + START_TIMEOUT_S, b""
        # Raw os.read, not readline: a buffered reader can hold lines that select() no longer sees.
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while not self.moto_pid:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    self.stop()
                    raise TimeoutError(f"{SCRIPT.name} printed no exports within {START_TIMEOUT_S:.0f} s")
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self.process.wait()
                    raise RuntimeError(f"{SCRIPT.name} exited with code {code} before printing its exports")
                *lines, pending = (pending + chunk).split(b"\n")
                for line in (raw.decode() for raw in lines):
                    if line.startswith("export "):
                        name, _, value = line.removeprefix("export ").partition("=")
                        self.env[name] = value
                    elif "moto_server pid" in line:
                        self.moto_pid = int(line.rsplit("pid", 1)[1].split(";")[0])
        return self

    def moto_alive(self) -> bool:
        """Whether the moto_server the script started still runs."""
        return pid_alive(self.moto_pid)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` to the script, wait for it, and return its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
        return code


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3EndpointProcess]:
    """A moto S3 endpoint with bucket `pretrain`, its AWS_* variables set in os.environ for the session."""
    endpoint = S3EndpointProcess().start()
    saved = {name: os.environ.get(name) for name in endpoint.env}
    os.environ.update(endpoint.env)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        code = endpoint.stop()
        assert code == 0, f"{SCRIPT.name} exited with code {code} on SIGTERM"
        assert not endpoint.moto_alive(), f"moto_server (pid {endpoint.moto_pid}) outlived {SCRIPT.name}"


@pytest.fixture(scope="session")
def s3_launcher() -> type[S3EndpointProcess]:
    """The launcher class, for tests that start and stop an endpoint of their own."""
    return S3EndpointProcess


class TcpProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port; `stop()` is an outage, `start()` ends it."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, 0
        self.downstream_bytes = 0  # bytes passed from the endpoint to clients so far
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (on the same port as before, if any) and forward in a thread."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port, self._listener = listener.getsockname()[1], listener
        self._stopping.clear()
        self._thread = threading.Thread(target=self._forward, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener (new connections are refused) and reset every live connection."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _forward(self) -> None:
        assert self._listener is not None
        listener, peers, clients = self._listener, {}, set()
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=0.02):
                    sock = key.fileobj
                    if sock is listener:
                        client, _ = listener.accept()
                        try:
                            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                        except OSError:
                            client.close()
                            continue
                        peers[client], peers[upstream] = upstream, client
                        clients.add(client)
                        sel.register(client, selectors.EVENT_READ)
                        sel.register(upstream, selectors.EVENT_READ)
                        continue
                    if sock not in peers:  # closed along with its peer earlier in this batch
                        continue
                    try:
                        data = sock.recv(1 << 16)
                        if data:
                            peers[sock].sendall(data)
                            if sock not in clients:
                                self.downstream_bytes += len(data)
                            continue
                    except OSError:
                        pass
                    other = peers.pop(sock)
                    del peers[other]
                    clients.difference_update((sock, other))
                    for end in (sock, other):
                        sel.unregister(end)
                        end.close()
            for sock in peers:  # SO_LINGER 0: close() sends RST, as a crashed endpoint would
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            listener.close()


@pytest.fixture
def s3_proxy(s3_endpoint: S3EndpointProcess) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the session's S3 endpoint, started: `stop()` is an outage."""
    proxy = TcpProxy(int(s3_endpoint.endpoint_url.rsplit(":", 1)[1]))
    proxy.start()
    yield proxy
    proxy.stop()


# --- forked gloo ranks: the distributed code paths (all-reduce, gather, ZeRO) in one test ------------

GlooRanks = Callable[..., None]


def _gloo_rank(target: Callable[..., None], port: int, rank: int, world: int, args: tuple[Any, ...]) -> None:
    """Body of one rank: the env DeepSpeed reads, a gloo group on `port`, `target(rank, *args)`."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # a forked child must not use the parent's (copied, dead) OpenMP pool
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target(rank, *args)
    finally:
        dist.destroy_process_group()


def _backward_in_a_child() -> None:
    import torch

    torch.ones(1, requires_grad=True).sum().backward()


def _fork_keeps_autograd() -> bool:
    """Whether a forked child of this process can still run autograd.

    Once this process has started autograd's worker threads (torch.export does, e.g. when a test
    logs an MLflow pt2 model), torch refuses autograd in forked children ("Unable to handle
    autograd's threading in combination with fork-based multiprocessing"). One tiny forked
    backward (a few ms) tells.
    """
    import multiprocessing as mp

    probe = mp.get_context("fork").Process(target=_backward_in_a_child)
    probe.start()
    probe.join()
    return probe.exitcode == 0


def run_gloo_ranks(target: Callable[..., None], world: int, *args: Any, timeout: float = 300.0) -> None:
    """Run `target(rank, *args)` on `world` processes in one gloo group; assert all exit 0.

    Forked (fast), unless an earlier test in this process left autograd unusable in forked
    children (see `_fork_keeps_autograd`): then spawned, `target` importable by name. A rank that
    fails ends the run at once (the others would wait in a collective until the timeout): the
    survivors are killed and the assertion names every rank's exit code.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork" if _fork_keeps_autograd() else "spawn")
    procs = [ctx.Process(target=_gloo_rank, args=(target, port, rank, world, args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        running = {proc.sentinel: proc for proc in procs}
        while running and (left := deadline - time.monotonic()) > 0:
            ended = [running.pop(sentinel) for sentinel in wait(list(running), timeout=left)]
            for proc in ended:
                proc.join()  # its sentinel is ready: reap it, so exitcode is set (not None)
            if any(proc.exitcode != 0 for proc in ended):
                break  # the survivors are killed below
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    assert codes == [0] * world, f"gloo ranks' exit codes {codes} (negative: killed by that signal)"


@pytest.fixture
def gloo_ranks() -> GlooRanks:
    """`gloo_ranks(target, world, *args, timeout=300)`: see `run_gloo_ranks`."""
    return run_gloo_ranks
