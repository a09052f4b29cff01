"""CPU that Ray's own processes take while one Ray Train worker sleeps, by process and by thread.

    python scripts/ray_overhead.py [--seconds 30] [--settle 25] [--top 25] [--cluster-helpers]

Starts a local Ray as `pretrain.run` does (dashboard on 127.0.0.1), runs the runs' TorchTrainer
(`pretrain.launch.torch_trainer_class`: on a local instance without Ray Train's Ray Data actor,
placement-group cleaner, autoscaling coordinator and preemption watcher; `--cluster-helpers`
keeps the last three, as on a cluster)
with one worker that only sleeps, waits `--settle` seconds for the worker group to come up, then
reads every process's and every thread's CPU ticks of the driver and its descendants (all of the
local Ray's processes) from /proc twice, `--seconds` apart. Prints the share of one core taken
by each process and, summed over processes, by each thread name. On a 2-core node with both
cores training, whose two intra-op threads wait for each other (a core taken stalls both),
the full stack runs at about 1 - total / 100 of a plain loop (docs/benchmarks.md). Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TICK = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """{thread id: (thread name, user + system ticks)} of one process; empty if it is gone."""
    out: dict[int, tuple[str, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return out


def process_name(pid: int) -> str:
    """What the process is, named as scripts/cpu_by_process.py names it."""
    from cpu_by_process import process_kind, read_argv

    return process_kind(read_argv(str(pid)))


def sample(seconds: float) -> tuple[list[tuple[float, int, str]], dict[str, float]]:
    """Shares of one core over `seconds`: per process and per thread name, for this process
    and its descendants (a local Ray's processes are all children of the driver)."""
    import psutil  # a dependency of Ray

    me = psutil.Process()
    pids = [me.pid, *(child.pid for child in me.children(recursive=True))]
    before = {pid: thread_ticks(pid) for pid in pids}
    time.sleep(seconds)
    per_process, per_thread = [], defaultdict(float)
    for pid in pids:
        after = thread_ticks(pid)
        total = 0
        for tid, (name, ticks) in after.items():
            delta = ticks - before[pid].get(tid, (name, 0))[1]
            total += delta
            per_thread[name] += delta
        if total:
            per_process.append((100.0 * total / TICK / seconds, pid, process_name(pid)))
    return sorted(per_process, reverse=True), {name: 100.0 * t / TICK / seconds for name, t in per_thread.items() if t}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="sampling window")
    parser.add_argument("--settle", type=float, default=25.0, help="wait before sampling")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument(
        "--cluster-helpers",
        action="store_true",
        help="keep Ray Train's placement-group cleaner, autoscaling coordinator and preemption watcher (as on a cluster)",
    )
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig

    import pretrain.launch as launch
    from pretrain.launch import start_local_ray, torch_trainer_class

    sleep_s = args.settle + args.seconds + 5
    result: dict = {}

    def sleeper(config: dict) -> None:
        time.sleep(config["seconds"])

    def measure() -> None:
        time.sleep(args.settle)
        result["rows"] = sample(args.seconds)

    start_local_ray()
    # The runs' trainer gives its controller the runs' settings (a 0.5 s poll; no preemption
    # watcher on a local instance: pretrain.launch.controller_settings).
    if args.cluster_helpers:
        launch._started_gcs_address = None  # as if attached to a cluster: the trainer keeps its helpers
    sampler = threading.Thread(target=measure)
    sampler.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            torch_trainer_class()(
                sleeper,
                train_loop_config={"seconds": sleep_s},
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(storage_path=tmp, name="ray-overhead"),
            ).fit()
            sampler.join()
    finally:
        ray.shutdown()

    per_process, per_thread = result["rows"]
    print(f"\nCPU over {args.seconds:.0f} s, one Ray Train worker asleep (% of one core)\n")
    print("| % | pid | process |\n|---|---|---|")
    for share, pid, name in per_process[: args.top]:
        print(f"| {share:.2f} | {pid} | {name} |")
    print(f"\ntotal, the driver and Ray's processes: {sum(s for s, _, _ in per_process):.1f}% of one core")
    print("\n| % | thread name (summed over processes) |\n|---|---|")
    for name, share in sorted(per_thread.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {share:.2f} | {name} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
