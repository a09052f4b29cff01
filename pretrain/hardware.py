"""Can this hardware run a precision natively? Checked before anything starts, in milliseconds.

bf16 without native support is emulated: on an AVX2-only CPU a bf16 matmul runs ~300x
slower than fp32 (docs/benchmarks.md), and GPUs before compute capability 8.0 (V100, T4)
have no bf16 units. The config check reads the CPU's flags (no torch import); each worker
checks its own device again when it builds the engine, since on a cluster the workers'
hosts need not be the driver's.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

# x86: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX-BF16 (Sapphire Rapids and later).
# Arm: FEAT_BF16 (Armv8.6), listed as "bf16" in /proc/cpuinfo's Features.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
FORCE_KEY = "deepspeed.force_precision"


def cpu_flags_have_bf16(flags: set[str] | frozenset[str]) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags computes bf16 natively."""
    return bool(BF16_CPU_FLAGS & set(flags))


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags (Linux /proc/cpuinfo), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def cpu_bf16_problem() -> str:
    """Why bf16 would be emulated on this host's CPU ("" = native, or unknown: not refused)."""
    flags = cpu_flags()
    if flags is None or cpu_flags_have_bf16(flags):
        return ""
    cpu = platform.processor() or platform.machine()
    return (
        f"bf16 is not native on this CPU ({cpu}: no avx512_bf16, amx_bf16 or Arm bf16), so it is emulated "
        f"and far slower than fp32; use deepspeed.precision=fp32, or {FORCE_KEY}=true to run bf16 anyway"
    )


def device_precision_problem(precision: str, device: Any) -> str:
    """Why `precision` is not native on a torch device ("" = it is); imports torch."""
    import torch

    if precision != "bf16":
        return ""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            name = torch.cuda.get_device_name(device)
            return (
                f"bf16 is not native on {name} (compute capability {major}.{minor}, bf16 needs 8.0+); use "
                f"deepspeed.precision=fp16 (or fp32), or {FORCE_KEY}=true to run bf16 anyway"
            )
        return ""
    if device.type == "cpu":
        return cpu_bf16_problem()
    return ""


EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def extension_cache_dir(prefix: str = sys.prefix) -> str:
    """torch's JIT extension cache for one Python environment (a venv, a conda env).

    torch's default, ~/.cache/torch_extensions/py311_cpu, is shared by every environment of a
    user: two checkouts with their own venvs (or a venv and the cluster image's Python) each
    rebuild DeepSpeed's CPU op the other built, 30-80 s per turn, because each builds with its
    own `ninja`. Keyed by the environment's real path, every environment keeps its own build.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1(os.path.realpath(prefix).encode()).hexdigest()[:10]
    return os.path.join(cache, "torch_extensions", f"py{sys.version_info[0]}{sys.version_info[1]}-{digest}")


def interpreter_first_on_path(path: str, executable: str) -> str:
    """PATH with this interpreter's bin directory first.

    DeepSpeed JIT-builds its CPU communication op with the first `ninja` on PATH and builds it
    again whenever that changes: `make demo` (the venv not activated: /usr/bin/ninja) and an
    activated venv (.venv/bin/ninja) rebuilt it in turn, 30-80 s each time. Local Ray workers
    inherit this PATH (`pretrain.launch`), and every engine build sets it again
    (`use_environment_build_tools`), so every process of one interpreter finds the same ninja.
    """
    bin_dir = os.path.dirname(executable)
    parts = [p for p in path.split(os.pathsep) if p]
    return os.pathsep.join([bin_dir, *[p for p in parts if p != bin_dir]])


def use_environment_build_tools() -> str:
    """This environment's ninja and extension cache for DeepSpeed's JIT ops; returns the cache.

    Its bin directory first on PATH, and $TORCH_EXTENSIONS_DIR where the user set it, else this
    environment's own cache (set here). Called before DeepSpeed loads an op: by
    `pretrain.prebuild` and by every engine build (in Ray workers, and in processes a test or a
    notebook starts with another PATH), so the install step and every run share one build.
    """
    os.environ["PATH"] = interpreter_first_on_path(os.environ.get("PATH", ""), sys.executable)
    return os.environ.setdefault(EXTENSIONS_ENV, extension_cache_dir())
