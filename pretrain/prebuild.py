"""Build at install time what a run would otherwise build in its first minute.

    python -m pretrain.prebuild                     # `make install` runs it
    python -m pretrain.prebuild data.default_train_samples=512   # for runs with these overrides

1. DeepSpeed's just-in-time op.

On the CPU accelerator DeepSpeed compiles its shared-memory communication op the first
time a process group starts (30-80 s on 2 cores), and compiles it again whenever another
`ninja` built what is in the cache. This builds it once, with this interpreter's bin
directory first on PATH (as `pretrain.launch` gives its local Ray workers), into this
environment's own extension cache ($TORCH_EXTENSIONS_DIR, else
~/.cache/torch_extensions/py311-<hash of the environment's path>, which every engine build
uses too); a run then only loads it. On CUDA nothing is built here (NCCL needs no op).

2. The demo dataset: the embedded default data a run without `data.urls` trains and
evaluates on (5120 generated images at the default sizes: 7.8 s on a slow 2-core host, spent
in the first run's set-up while the other worker waits). It goes where that run looks for it
($PRETRAIN_CACHE, else ~/.cache/pretrain, or `data.cache_dir`); the overrides are
`pretrain.run`'s, so a run with other `data.default_*` sizes finds its own.

Exit codes: 0 built, already built or nothing to build; 1 a build failed; 2 a bad override.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

from pretrain.hardware import use_environment_build_tools

if TYPE_CHECKING:
    from omegaconf import DictConfig

# DeepSpeed's name of the op builder its CPU accelerator uses for collectives.
SHM_BUILDER = "ShareMemCommBuilder"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from pretrain.compose import ConfigError, expand_overrides, load_config

    try:  # the overrides first: a bad one is a one-line error before anything is built
        cfg = load_config(expand_overrides(argv))
    except ConfigError as exc:
        print(exc.lines(), file=sys.stderr)
        return 2
    built, generated = build_op(), demo_dataset(cfg)  # each is worth having without the other
    return built or generated


def demo_dataset(cfg: DictConfig) -> int:
    """The default dataset of a run with this config, generated unless it exists."""
    from omegaconf import OmegaConf

    from data.default import ensure_default_dataset

    data = OmegaConf.to_object(cfg.data)
    if data.urls:
        print("prebuild: data.urls is set; no demo dataset to generate")
        return 0
    tic = time.perf_counter()
    try:
        dataset = ensure_default_dataset(data)
    except (OSError, RuntimeError, ValueError) as exc:  # a full disk, a broken earlier copy
        print(f"prebuild: the demo dataset failed: {str(exc).strip().splitlines()[-1]}")
        return 1
    print(f"prebuild: demo dataset ready in {time.perf_counter() - tic:.1f} s ({dataset.root})")
    return 0


def build_op() -> int:
    """DeepSpeed's CPU communication op, into this environment's extension cache."""
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
