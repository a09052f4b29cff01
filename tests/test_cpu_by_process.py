"""scripts/cpu_by_process.py: names processes as Ray and Python show them, and counts a child's CPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cpu_by_process.py"
sys.path.insert(0, str(SCRIPT.parent))
from cpu_by_process import process_kind  # noqa: E402


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["ray::RayTrainWorker.init_train_context", "", ""], "ray::RayTrainWorker"),
        (["ray::TrainController.__init__"], "ray::TrainController"),
        (["ray-dashboard-NodeHead-0 (/venv/bin/python -B -c ...)"], "ray dashboard module"),
        (["/venv/bin/python", "-m", "pretrain.run", "objective=mae"], "python -m pretrain.run"),
        (["/venv/bin/python", "-u", "-c", "import sys;exec(eval(sys.stdin.readline()))"], "pytest-xdist worker"),
        (["/venv/bin/python", "/venv/bin/ray", "job", "submit", "--", "python"], "ray"),
        (["/venv/bin/python", "-u", "/venv/lib/ray/_private/log_monitor.py", "--session-dir=/tmp"], "log_monitor.py"),
        (["/venv/lib/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/x"], "raylet"),
        ([], "?"),
    ],
)
def test_process_kinds(argv: list[str], kind: str) -> None:
    assert process_kind(argv) == kind


def test_a_busy_child_is_counted_and_the_exit_status_passed_on() -> None:
    # A child that burns at least 0.5 s of CPU, then sleeps (readings every 0.1 s see all of it
    # however loaded the machine), then the command exits 3.
    burn = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\ntime.sleep(0.6)"
    command = (
        f"import subprocess, sys; subprocess.run([sys.executable, '-m', 'timeit', '-n1', '-r1', {burn!r}]); sys.exit(3)"
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--interval", "0.1", "--", sys.executable, "-c", command],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    rows = dict(re.findall(r"^\| (python -m timeit) \| ([0-9.]+) \| 1 \|$", done.stderr, re.M))
    assert float(rows["python -m timeit"]) >= 0.45, done.stderr
