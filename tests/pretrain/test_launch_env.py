"""The environment local Ray workers inherit: one ninja for every run of one interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pretrain.launch import interpreter_first_on_path


def test_the_interpreters_bin_comes_first_once() -> None:
    sep = os.pathsep
    assert interpreter_first_on_path(sep.join(["/usr/bin", "/bin"]), "/v/bin/python") == sep.join(
        ["/v/bin", "/usr/bin", "/bin"]
    )
    # Already there (an activated venv): moved to the front, not repeated.
    assert interpreter_first_on_path(sep.join(["/usr/bin", "/v/bin", ""]), "/v/bin/python") == sep.join(
        ["/v/bin", "/usr/bin"]
    )
    assert interpreter_first_on_path("", "/v/bin/python") == "/v/bin"


def test_activated_or_not_the_same_ninja_is_found() -> None:
    """What `make demo` (venv not activated) and an activated venv each resolve `ninja` to."""
    venv_bin = str(Path(sys.executable).parent)
    system = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    found = {
        shutil.which("ninja", path=interpreter_first_on_path(path, sys.executable))
        for path in (system, os.pathsep.join([venv_bin, system]))
    }
    assert len(found) == 1
    if (Path(venv_bin) / "ninja").exists():  # the venv's own (pip's ninja, a DeepSpeed dependency)
        assert found == {str(Path(venv_bin) / "ninja")}
        version = subprocess.run([found.pop(), "--version"], capture_output=True, text=True, check=True)
        assert version.stdout.strip()


def test_prebuild_leaves_the_op_a_run_loads_and_a_second_call_only_loads_it() -> None:
    """`python -m pretrain.prebuild` (run by `make install`): the CPU communication op is built
    with this interpreter's ninja, so that a run's first process group only loads it."""
    not_activated = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if p != str(Path(sys.executable).parent)
    )

    def prebuild() -> str:
        out = subprocess.run(
            [sys.executable, "-m", "pretrain.prebuild"],
            env={**os.environ, "PATH": not_activated},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip().splitlines()[-1]

    first = prebuild()
    if first.endswith(("nothing to build", "no op to build")):
        return  # another accelerator: nothing to prebuild
    assert first.startswith("prebuild: deepspeed.ops.comm.deepspeed_shm_comm_op ready in ")
    library = Path(first.rsplit("(", 1)[1].rstrip(")"))
    assert library.is_file() and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    # Called again, from an activated venv's PATH this time: loaded, not compiled again.
    second = subprocess.run(
        [sys.executable, "-m", "pretrain.prebuild"], capture_output=True, text=True, timeout=600
    ).stdout.strip()
    assert second.endswith(f"({library})") and library.stat().st_mtime_ns == built
