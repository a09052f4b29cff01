"""Where a command's CPU goes, by kind of process: run it, read every process's CPU from /proc.

    python scripts/cpu_by_process.py [--interval 1] [--top 20] -- make test

Runs the command and, every `--interval` seconds until it ends, reads the user + system CPU of
every process on the machine from /proc. Processes that start while the command runs count
whole; processes that were already running count their growth, on one line. Each process is
named by what it is at its last reading (Ray renames its workers: `ray::RayTrainWorker`,
`ray::TrainController`; a Python program by its `-m` module or script; a binary by itself), and
the table sums CPU seconds and counts per name. A process that lives less than one interval
may never be read: what the machine's total (/proc/stat) shows beyond the processes read is
printed as "not read". The suite's end-to-end runs are bound by CPU on 2 cores, so this table,
not the wall time of one test, shows what a change saves (docs/benchmarks.md). Linux only.
Exits with the command's exit status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


def process_kind(argv: list[str]) -> str:
    """A short name for what a process is, from its command line (argv as /proc gives it)."""
    if not argv or not argv[0]:
        return "?"
    first = argv[0]
    if first.startswith("ray::"):  # ray::RayTrainWorker.init_train_context -> ray::RayTrainWorker
        return first.split()[0].split(".")[0]
    if first.startswith("ray-dashboard-"):  # ray-dashboard-NodeHead-0 (a dashboard module)
        return "ray dashboard module"
    flags = {a: argv[i + 2] if i + 2 < len(argv) else "" for i, a in enumerate(argv[1:]) if a in ("-m", "-c")}
    if "-m" in flags:
        return f"python -m {flags['-m'] or '?'}"
    if "-c" in flags:
        code = flags["-c"]
        if "forkserver" in code:
            return "python forkserver"
        if "sys.stdin" in code:  # execnet's bootstrap: a pytest-xdist worker
            return "pytest-xdist worker"
        return "python -c"
    script = next((a for a in argv[1:] if not a.startswith("-") and (a.endswith(".py") or "/bin/" in a)), "")
    if script and Path(first).name.startswith("python"):
        return Path(script).name
    return Path(first).name


def read_argv(pid: str) -> list[str]:
    try:
        raw = (PROC / pid / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def read_ticks(pid: str) -> int | None:
    try:
        fields = (PROC / pid / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def machine_ticks() -> int:
    """Busy ticks of the whole machine: user, nice, system, irq, softirq."""
    fields = (PROC / "stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6))


class Sampler:
    def __init__(self) -> None:
        self.before: dict[str, int] = {}  # pid -> ticks at the first reading (processes running already)
        self.last: dict[str, int] = {}
        self.kind: dict[str, str] = {}
        self.first = True

    def read(self) -> None:
        for entry in os.listdir(PROC):
            if not entry.isdigit():
                continue
            ticks = read_ticks(entry)
            if ticks is None:
                continue
            if self.first:
                self.before[entry] = ticks
            self.last[entry] = max(ticks, self.last.get(entry, 0))
            kind = self.kind.get(entry)
            # Ray names its workers once they run an actor or task; a fresh fork has no argv yet.
            if kind is None or kind in ("?", "ray::IDLE", "default_worker.py", "setup_worker.py"):
                self.kind[entry] = process_kind(read_argv(entry))
        self.first = False

    def table(self) -> tuple[dict[str, list[float]], float]:
        """{kind: [cpu seconds, processes]} of the processes started since the first reading, and
        the growth of those that were running already."""
        kinds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        earlier = 0.0
        for pid, ticks in self.last.items():
            if pid in self.before:
                earlier += (ticks - self.before[pid]) / TICK
                continue
            row = kinds[self.kind.get(pid, "?")]
            row[0] += ticks / TICK
            row[1] += 1
        return dict(kinds), earlier


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    parser.add_argument("--top", type=int, default=20, help="kinds of process to list")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if not PROC.joinpath("stat").exists():
        parser.error("this reads /proc: Linux only")

    sampler = Sampler()
    sampler.read()
    busy_start, started = machine_ticks(), time.monotonic()
    child = subprocess.Popen(command)
    while child.poll() is None:
        sampler.read()
        time.sleep(args.interval)
    sampler.read()
    wall = time.monotonic() - started
    busy = (machine_ticks() - busy_start) / TICK

    kinds, earlier = sampler.table()
    read_total = sum(cpu for cpu, _ in kinds.values()) + earlier
    cores = os.cpu_count() or 1
    rows = sorted(kinds.items(), key=lambda item: -item[1][0])
    shown = " ".join(shlex.join(command).split())
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    print(f"\n{shown}: exit {child.returncode}, {wall:.0f} s wall, machine busy {busy:.1f} cpu-s "
          f"({100 * busy / wall / cores:.0f}% of {cores} cores)", file=sys.stderr)  # fmt: skip
    print("| process | cpu-s | processes |\n|---|---|---|", file=sys.stderr)
    for kind, (cpu, count) in rows[: args.top]:
        print(f"| {kind} | {cpu:.1f} | {count:.0f} |", file=sys.stderr)
    rest = rows[args.top :]
    if rest:
        cpu, count = sum(r[1][0] for r in rest), sum(r[1][1] for r in rest)
        print(f"| {len(rest)} more kinds | {cpu:.1f} | {count:.0f} |", file=sys.stderr)
    print(f"| processes running before the command | {earlier:.1f} | - |", file=sys.stderr)
    print(f"| not read (lived less than an interval) | {max(busy - read_total, 0.0):.1f} | - |", file=sys.stderr)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode  # a signal: as a shell says


if __name__ == "__main__":
    sys.exit(main())
