"""The local service stack: S3 endpoint, MLflow tracking server and a Ray head, all on 127.0.0.1.

    scripts/stack.sh up        # start the three, print the environment to export
    scripts/stack.sh status    # what runs, where, and whether it answers
    scripts/stack.sh env       # print the exports again
    scripts/stack.sh down      # stop exactly what `up` started (by pid), nothing else

What `up` starts, in this order (each waits until the previous one answers):

1. `moto_server`: a real S3 HTTP endpoint (in memory) with the bucket `--bucket`.
2. `mlflow server`: sqlite backend (tracking + model registry) in the stack directory,
   artifacts proxied by the server (`--serve-artifacts`) into s3://<bucket>/mlflow.
3. `ray start --head --block`: GCS, raylet, dashboard and job server. Token
   authentication stays on (Ray's default): clients set RAY_AUTH_MODE=token and read
   the token from ~/.ray/auth_token. The head inherits the stack's environment, so
   jobs and their workers reach S3 and MLflow without credentials in any job config.

The exports (`eval "$(scripts/stack.sh env)"`): RAY_API_SERVER_ADDRESS (the job server,
read first by `ray job ...`), RAY_ADDRESS (the GCS, for ray.init / `python -m
pretrain.run` run directly), RAY_AUTH_MODE=token, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL
with the endpoint's dummy credentials, and PRETRAIN_STORAGE_PATH=s3://<bucket>/runs.

Each component runs in a session of its own; the three start side by side. `down`
signals those sessions, all at once (SIGTERM, then SIGKILL after --stop-timeout), after
checking that each leader pid is still the process `up` started. State, logs and the MLflow database live in --dir (default
.stack/ in the working directory; Ray's session files in <dir>/ray, or in
/tmp/pretrain-stack-<hash> where <dir> is too long for unix sockets); the S3 data is in memory, so the stack is
ephemeral: `up` starts from an empty directory, and everything is gone after `down`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_endpoint import CREDENTIALS, HOST  # noqa: E402 - beside this script, not a package

STATE_FILE = "stack.json"
LEADER_GRACE_S = 8.0
BIN = Path(sys.executable).parent


class StackError(Exception):
    """Something the user can fix; printed as one line."""


@dataclass
class Component:
    name: str
    pid: int
    start_ticks: int  # /proc/<pid>/stat start time: tells a recycled pid from ours
    url: str
    log: str


@dataclass
class Stack:
    dir: str
    ray_temp: str = ""  # Ray's session files and logs
    env: dict[str, str] = field(default_factory=dict)
    components: list[Component] = field(default_factory=list)

    def save(self) -> None:
        Path(self.dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> Stack | None:
        path = directory / STATE_FILE
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        components = [Component(**c) for c in raw.pop("components")]
        return cls(**raw, components=components)


# --- processes ----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def start_ticks(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[19]) if fields else 0


def is_ours(c: Component) -> bool:
    """Whether the component's leader still runs and is the process `up` started."""
    fields = _stat(c.pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == c.start_ticks


def session_members(sid: int) -> list[int]:
    """Live pids in session `sid` (every process a component started stays in it)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
                members.append(int(entry.name))
    return members


def spawn(name: str, argv: list[str], env: dict[str, str], directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = directory / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=directory,
            start_new_session=True,  # own session: `down` finds every descendant by its session id
        )
    return process, log


def wait_until(ready, what: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise StackError(f"{what} exited with code {process.returncode}: {tail[0][:300]} (log: {log})")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer within {timeout_s:.0f} s (log: {log})")
        time.sleep(0.25)


def unclaimed_port(taken: set[int]) -> int:
    """A free TCP port on 127.0.0.1 that no other process is handed in the meantime.

    A port the OS picks (bind to 0) comes from its ephemeral range, where every Ray process of
    another instance on this machine also gets its gRPC ports: one took the dashboard's port
    between this pick and the head's start (seen with two test workers). Below that range and
    above Ray's worker ports (10002-19999), only a process that asks for the number binds it.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, max(low, 20001))
        if port not in taken and port_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all tried were taken: the OS's pick
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    """Any HTTP response (401 included: Ray's token auth) means the server is up."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError):
        return False  # not up yet, or not an HTTP server on that port


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def executable(name: str) -> str:
    beside = BIN / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"no {name} beside {sys.executable} nor on PATH; run `make install` first")
    return found


# --- up / down / status -----------------------------------------------------------


def up(args: argparse.Namespace) -> Stack:
    directory = Path(args.dir).resolve()
    existing = Stack.load(directory)
    if existing is not None and any(is_ours(c) for c in existing.components):
        raise StackError(f"a stack already runs from {directory}; `scripts/stack.sh down` first")
    ray_temp = ray_temp_dir(directory)
    for old in (directory, ray_temp):
        if old.exists():
            shutil.rmtree(old)
    directory.mkdir(parents=True)
    ports = {
        "s3": args.s3_port,
        "mlflow": args.mlflow_port,
        "ray": args.ray_port,
        "dashboard": args.dashboard_port,
        "client": args.ray_client_port,
        "agent": args.dashboard_agent_port,
    }
    for key, port in ports.items():
        if port == 0:
            ports[key] = unclaimed_port(set(ports.values()))
        elif not port_free(port):
            flag = {"client": "ray-client", "agent": "dashboard-agent"}.get(key, key)
            raise StackError(f"port {port} on {HOST} is taken; pick another with --{flag}-port (0 = a free one)")

    s3_url = f"http://{HOST}:{ports['s3']}"
    mlflow_url = f"http://{HOST}:{ports['mlflow']}"
    stack = Stack(
        dir=str(directory),
        ray_temp=str(ray_temp),
        env={
            # The GCS address is filled in once the head runs (Ray binds it to the node's IP).
            "RAY_ADDRESS": "",
            # `ray job ...` and the job SDK read this first, then RAY_ADDRESS.
            "RAY_API_SERVER_ADDRESS": f"http://{HOST}:{ports['dashboard']}",
            "RAY_AUTH_MODE": "token",
            "MLFLOW_TRACKING_URI": mlflow_url,
            "AWS_ENDPOINT_URL": s3_url,
            # Fresh credentials per stack (moto takes any): a leak of them is findable, and
            # no fixed secret is shared between stacks.
            "AWS_ACCESS_KEY_ID": f"stack{secrets.token_hex(6)}",
            "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(24),
            "AWS_DEFAULT_REGION": CREDENTIALS["AWS_DEFAULT_REGION"],
            "PRETRAIN_STORAGE_PATH": f"s3://{args.bucket}/runs",
        },
    )
    # What every component (and through the Ray head, every job and worker) sees.
    client_only = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    base = {k: v for k, v in os.environ.items() if k not in client_only}
    service_env = {
        **base,
        **{k: v for k, v in stack.env.items() if k not in client_only},
        "PATH": f"{python_shims(directory)}{os.pathsep}{base.get('PATH', '')}",
        "MLFLOW_S3_ENDPOINT_URL": s3_url,
        "PYTHONUNBUFFERED": "1",
        # MLflow 3's server also starts a job runner (eight processes of huey consumers, for its
        # GenAI jobs) that nothing here uses: 19 cpu-s more to start (docs/cluster.md). An
        # exported value wins.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": base.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    }
    # The three start side by side (none needs another to start; the bucket waits for S3), then
    # each is awaited in turn: up takes about as long as the slowest, the Ray head.
    mlflow_argv = [
        executable("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(ports["mlflow"]),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{directory / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        f"s3://{args.bucket}/mlflow",
    ]
    options = {
        "--node-ip-address": HOST,
        "--port": ports["ray"],
        "--ray-client-server-port": ports["client"],
        "--dashboard-host": HOST,
        "--dashboard-port": ports["dashboard"],
        "--dashboard-agent-listen-port": ports["agent"],
        "--temp-dir": ray_temp,
    }
    ray_argv = [executable("ray"), "start", "--head", "--block", "--disable-usage-stats"]
    ray_argv += [part for flag, value in options.items() for part in (flag, str(value))]
    if args.num_cpus:
        ray_argv += ["--num-cpus", str(args.num_cpus)]
    dashboard = stack.env["RAY_API_SERVER_ADDRESS"]
    services = [  # (name, argv, url, what, ready)
        ("s3", [executable("moto_server"), "-H", HOST, "-p", str(ports["s3"])], s3_url, "moto_server",
         lambda: answers(f"{s3_url}/moto-api/")),
        ("mlflow", mlflow_argv, mlflow_url, "mlflow server", lambda: answers(f"{mlflow_url}/health")),
        ("ray", ray_argv, dashboard, "ray head", lambda: _jobs_answer(dashboard)),
    ]  # fmt: skip
    try:
        _ensure_ray_token(service_env)
        started = []
        for name, argv, url, what, ready in services:
            process, log = spawn(name, argv, service_env, directory)
            stack.components.append(Component(name, process.pid, start_ticks(process.pid), url, str(log)))
            stack.save()
            started.append((name, what, ready, process, log))
        for name, what, ready, process, log in started:
            wait_until(ready, what, process, log, args.start_timeout)
            if name == "s3":
                _create_bucket(s3_url, args.bucket, stack.env)
        # Ray resolves 127.0.0.1 to the machine's address for its GCS: ray.init() must use that one.
        from ray._private.services import get_node_ip_address

        stack.env["RAY_ADDRESS"] = f"{get_node_ip_address()}:{ports['ray']}"
        stack.save()
    except BaseException:
        down_stack(stack, args.stop_timeout)
        raise
    return stack


def python_shims(directory: Path) -> Path:
    """<dir>/bin with `python`/`python3` running this interpreter: a job's `python -m ...` gets this
    virtual environment. Only those two: putting the venv's bin/ first on PATH would also swap
    tools such as `ninja`, and a different ninja rebuilds DeepSpeed's JIT ops (~45 s each time)."""
    shims = directory / "bin"
    shims.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        shim = shims / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    return shims


def ray_temp_dir(directory: Path) -> Path:
    """Ray's session files: <dir>/ray, or /tmp/pretrain-stack-<hash> where that path is too long
    for the unix sockets Ray makes in it (AF_UNIX paths are limited to 107 bytes)."""
    inside = directory / "ray"
    if len(str(inside)) <= 40:  # + /session_<date>_<time>_<pid>/sockets/plasma_store
        return inside
    return Path("/tmp") / f"pretrain-stack-{hashlib.sha256(str(directory).encode()).hexdigest()[:10]}"


def _create_bucket(endpoint_url: str, bucket: str, env: dict[str, str]) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=bucket)


def _ensure_ray_token(env: dict[str, str]) -> None:
    """Create ~/.ray/auth_token if there is none (`ray start` with RAY_AUTH_MODE=token needs one)."""
    # The command prints the token: captured and dropped, never shown or logged.
    done = subprocess.run([executable("ray"), "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise StackError(f"ray get-auth-token --generate failed: {(done.stderr.strip().splitlines() or [''])[-1]}")


def _jobs_answer(dashboard: str) -> bool:
    """The job server lists jobs with the token (the dashboard answers before it is ready)."""
    if not answers(f"{dashboard}/api/version"):
        return False
    token_file = Path.home() / ".ray" / "auth_token"
    token = os.environ.get("RAY_AUTH_TOKEN") or (token_file.read_text().strip() if token_file.is_file() else "")
    request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def down_stack(stack: Stack, timeout_s: float) -> list[str]:
    """Stop the components, all at once; returns one line per component (last started first).

    Each leader gets SIGTERM: `ray start --block` and `mlflow server` stop their own children
    (an idle Ray head in ~6 s). What a component left after LEADER_GRACE_S gets SIGTERM, and
    SIGKILL at the timeout (after jobs ran, Ray's GCS and raylet can sit on SIGTERM). The
    components share these deadlines, so down takes as long as the slowest, not their sum.
    """
    started = time.monotonic()
    states = []  # (component, leader, members): a session keeps its id after its leader exits,
    for c in reversed(stack.components):  # so leftovers of a crashed component are found too
        leader = is_ours(c)
        members = set(session_members(c.pid)) | ({c.pid} if leader else set())
        if leader:
            _signal({c.pid}, signal.SIGTERM)
        states.append((c, leader, members))
    lines = []
    for c, leader, members in states:
        if not members:
            lines.append(f"{c.name}: not running (pid {c.pid})")
            continue
        left = members
        if leader:
            left = _wait_empty(c.pid, LEADER_GRACE_S - (time.monotonic() - started))
        if left:
            _signal(left, signal.SIGTERM)
            left = _wait_empty(c.pid, timeout_s - (time.monotonic() - started))
        killed = sorted(_name(pid) for pid in left)
        if left:
            _signal(left, signal.SIGKILL)
            _wait_empty(c.pid, 5.0)
        how = "stopped" if leader else "leader gone, stopped what it left"
        if killed:
            how += f"; SIGKILL after {timeout_s:.0f} s for {len(killed)} that ignored SIGTERM ({', '.join(killed)})"
        lines.append(f"{c.name}: {how} (pid {c.pid}, {len(members)} processes)")
    return lines


def _wait_empty(sid: int, timeout_s: float) -> set[int]:
    """Wait until session `sid` has no live process; returns those still running at the timeout."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    while (left := set(session_members(sid))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def status_lines(stack: Stack) -> tuple[list[str], bool]:
    lines, healthy = [], True
    probes = {"s3": "/moto-api/", "mlflow": "/health", "ray": "/api/version"}
    for c in stack.components:
        if not is_ours(c):
            lines.append(f"{c.name:<7} stopped   (pid {c.pid})  {c.url}")
            healthy = False
            continue
        ok = answers(c.url + probes[c.name])
        healthy &= ok
        state = "running" if ok else "silent"
        lines.append(f"{c.name:<7} {state:<9} (pid {c.pid}, {len(session_members(c.pid))} processes)  {c.url}")
    return lines, healthy


def print_env(stack: Stack) -> None:
    for key, value in stack.env.items():
        print(f"export {key}={value}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--dir", default=os.environ.get("PRETRAIN_STACK_DIR", ".stack"), help="state directory")
    parser.add_argument("--bucket", default="pretrain")
    parser.add_argument("--s3-port", type=int, default=9000)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard + job server")
    parser.add_argument("--ray-client-port", type=int, default=10001)
    parser.add_argument("--dashboard-agent-port", type=int, default=52365)
    parser.add_argument("--free-ports", action="store_true", help="free ports instead of the defaults (tests)")
    parser.add_argument("--num-cpus", type=int, default=0, help="CPUs the Ray head offers (0 = all)")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--stop-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.free_ports:
        for name in ("s3_port", "mlflow_port", "ray_port", "dashboard_port", "ray_client_port", "dashboard_agent_port"):
            setattr(args, name, 0)
    directory = Path(args.dir).resolve()
    try:
        if args.command == "up":
            # SIGTERM during start-up takes the KeyboardInterrupt path: what started is stopped.
            signal.signal(signal.SIGTERM, _interrupt)
            stack = up(args)
            print_env(stack)
            pids = ", ".join(f"{c.name} {c.pid}" for c in stack.components)
            print(f"# stack up from {stack.dir} (pids: {pids}); stop it with scripts/stack.sh down", flush=True)
            return 0
        stack = Stack.load(directory)
        if stack is None:
            print(f"no stack in {directory} (start one with scripts/stack.sh up)", file=sys.stderr)
            return 0 if args.command == "down" else 1
        if args.command == "env":
            print_env(stack)
            return 0
        if args.command == "status":
            lines, healthy = status_lines(stack)
            print("\n".join(lines))
            return 0 if healthy else 1
        print("\n".join(down_stack(stack, args.stop_timeout)))
        (directory / STATE_FILE).unlink()
        return 0
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; what had started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
