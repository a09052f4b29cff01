"""Build DeepSpeed's just-in-time ops at install time, not in a run's first minute.

    python -m pretrain.prebuild        # `make install` runs it

On the CPU accelerator DeepSpeed compiles its shared-memory communication op the first
time a process group starts (30-80 s on 2 cores), and compiles it again whenever another
`ninja` built what is in the cache. This builds it once, with this interpreter's bin
directory first on PATH (as `pretrain.launch` gives its local Ray workers), into this
environment's own extension cache ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions/py311-<hash of the environment's path>, which every engine build
uses too); a run then only loads it. On CUDA nothing is built here (NCCL needs no op).
Exit codes: 0 built, already built or nothing to build; 1 the build failed.
"""

from __future__ import annotations

import os
import sys
import time

from pretrain.hardware import use_environment_build_tools

# DeepSpeed's name of the op builder its CPU accelerator uses for collectives.
SHM_BUILDER = "ShareMemCommBuilder"


def main() -> int:
    use_environment_build_tools()
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        print("prebuild: CUDA accelerator; no op to build")
        return 0
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is None or not builder.is_compatible(verbose=False):
        print(f"prebuild: {SHM_BUILDER} is not used on this machine; nothing to build")
        return 0
    tic = time.perf_counter()
    try:
        module = builder.load(verbose=False)
    except Exception as exc:  # noqa: BLE001 - a compiler error: the run would build (and fail) the same way
        print(f"prebuild: building {builder.absolute_name()} failed: {str(exc).strip().splitlines()[-1]}")
        return 1
    print(f"prebuild: {builder.absolute_name()} ready in {time.perf_counter() - tic:.1f} s ({module.__file__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
