"""Checkpoints: DeepSpeed state (model, optimizer, scheduler) plus step, RNG and data position.

Layout of one checkpoint directory (every rank writes its own files into it, Ray
Train merges them in `storage_path`):

    state/...            DeepSpeed's files (engine.save_checkpoint, tag "state")
    latest               DeepSpeed's pointer to the tag
    rank_<r>.pt          this rank's step, RNG states and data-loader position

Every load uses `torch.load(weights_only=True)`; DeepSpeed's own loader is replaced
by one that does the same, with an explicit allow-list of the few plain-data types
DeepSpeed stores.

A checkpoint written by a different number of workers at ZeRO stage 1-3 (whose
optimizer state is split per worker) is first converted into DeepSpeed's universal
checkpoint format (one file per parameter and state: fp32 weights, Adam moments), which
any number of workers can load; see `universal_copy`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import tempfile
import time
from argparse import Namespace
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pretrain.trainer.hooks import TrainerHook

# The names these lines carried before the module moved into pretrain.trainer.
log = logging.getLogger("pretrain.checkpoint")
worker_log = logging.getLogger("pretrain.worker")

TAG = "state"


def _deepspeed_safe_globals() -> list[Any]:
    """Plain-data classes found in DeepSpeed checkpoints (enums and small records)."""
    allowed: list[Any] = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover - older DeepSpeed layouts
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return allowed


_allowed_depth = 0
_allowed_before: list[Any] = []


@contextlib.contextmanager
def _deepspeed_globals_allowed() -> Iterator[None]:
    """torch's weights_only allow-list extended by DeepSpeed's records, re-entrantly.

    torch.serialization.safe_globals is not: the inner block's exit removes what an outer
    block still relies on (a universal load nests our checkpoint engine's loads in it).
    """
    global _allowed_depth, _allowed_before
    if _allowed_depth == 0:
        _allowed_before = torch.serialization.get_safe_globals()
        torch.serialization.add_safe_globals(_deepspeed_safe_globals())
    _allowed_depth += 1
    try:
        yield
    finally:
        _allowed_depth -= 1
        if _allowed_depth == 0:  # back to exactly the list found on entry
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(_allowed_before)


def safe_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """torch.load restricted to tensors and plain data (no arbitrary pickle)."""
    with _deepspeed_globals_allowed():
        return torch.load(path, map_location=map_location, weights_only=True)


def install_safe_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed load its checkpoints with weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location=map_location)

    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise RuntimeError(
            f"unexpected DeepSpeed checkpoint engine {type(current).__name__}; cannot make it weights_only"
        )
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    if current is not None:
        safe.__dict__.update(current.__dict__)
    else:
        safe.__init__(None)
    engine.checkpoint_engine = safe


def rng_state() -> dict[str, Any]:
    """Python and torch RNG states as tensors/plain data (weights_only-loadable)."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Any, directory: Path, *, rank: int, step: int, data_state: dict[str, Any]) -> None:
    """All ranks: write this rank's part of the checkpoint into `directory`."""
    engine.save_checkpoint(str(directory), tag=TAG, client_state={"step": step})
    extra = {"step": step, "rng": rng_state(), "data": data_state}
    tmp = directory / f".rank_{rank}.pt.tmp"
    torch.save(extra, tmp)
    os.replace(tmp, directory / f"rank_{rank}.pt")  # never a half-written file under the final name


def _rank_files(directory: Path) -> list[Path]:
    """rank_0.pt ... rank_<n-1>.pt of a checkpoint, in rank order (refuses gaps)."""
    found = {int(p.stem.split("_", 1)[1]): p for p in directory.glob("rank_*.pt") if p.stem.split("_", 1)[1].isdigit()}
    if not found or sorted(found) != list(range(len(found))):
        raise FileNotFoundError(
            f"checkpoint {directory} has no complete set of rank_<r>.pt files (found {sorted(found)})"
        )
    return [found[r] for r in range(len(found))]


@contextlib.contextmanager
def checkpoint_files(checkpoint: Any, rank: int) -> Iterator[Path]:
    """A Ray Train checkpoint as a local directory this rank alone reads.

    A local checkpoint is read where it is. A remote one (S3) is downloaded into a directory of
    this rank's own: Ray's shared `as_directory()` download lets the first rank to finish delete
    the directory while a later rank still reads it (seen: "PytorchStreamReader failed reading
    file", a resume on 2 workers from S3 after the driver was stopped). Every rank downloads the
    whole checkpoint.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix=f"restore-rank{rank}-") as tmp:
        yield Path(checkpoint.to_directory(tmp))


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load in this block is weights_only=True, whatever its caller passes.

    DeepSpeed's universal-checkpoint converter and loader turn torch's weights-only mode off in
    their own loads; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides that per call, and the
    allow-list admits the few DeepSpeed records those files hold.
    """
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with _deepspeed_globals_allowed():
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


@contextlib.contextmanager
def universal_copy(directory: Path, rank: int) -> Iterator[Path]:
    """DeepSpeed's universal form of checkpoint `directory`, in a temporary directory of this rank's own.

    DeepSpeed's ZeRO 1-3 files hold each rank's slice of flattened, padded fp32 weights and
    Adam moments; `deepspeed.checkpoint.ds_to_universal` reassembles them into whole tensors
    per parameter, and a `load_universal` engine cuts those into its own partitions. Every
    rank converts for itself (no shared file system is assumed), in this process (the
    converter's process pools are not used), at a cost of reading the whole checkpoint once
    per rank - only when the worker count changed. The universal tag is `state`, as in a
    normal checkpoint.
    """
    from deepspeed.checkpoint import ds_to_universal

    with tempfile.TemporaryDirectory(prefix=f"universal-rank{rank}-") as tmp:
        out = Path(tmp) / TAG
        args = Namespace(
            input_folder=str(directory / TAG),
            output_folder=str(out),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our engines do not record the Megatron-style layout info
        )
        chatter = io.StringIO()  # the converter prints its phases and progress bars
        with weights_only_loads(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
        yield Path(tmp)


def _load_universal(engine: Any, directory: Path) -> tuple[Any, dict[str, Any]]:
    """engine.load_checkpoint of a universal checkpoint (tag `state` in `directory`)."""
    config = engine._config  # DeepSpeed reads this flag at load time only (engine.load_universal_checkpoint())
    if not hasattr(config, "load_universal_checkpoint"):
        raise RuntimeError(
            "this DeepSpeed version has no universal checkpoint loading; resume with the original trainer.num_workers"
        )
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with weights_only_loads():
            loaded = engine.load_checkpoint(str(directory), tag=TAG)
    finally:
        config.load_universal_checkpoint = before
    if int(engine.zero_optimization_stage()) == 3:
        _repair_zero3_universal_load(engine, directory / TAG / "zero" / "optimizer_state.pt")
    return loaded


def _repair_zero3_universal_load(engine: Any, optimizer_state: Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19.8, runtime/zero/stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3), found by tests/pretrain/test_world_size_change.py:

    - every parameter group gets the first group's hyperparameters: weight decay would reach the
      norms and biases of the no-decay group. Each group gets its own saved ones back.
    - one `step` tensor is shared by the state of every group, and torch's AdamW increments it in
      place once per group: Adam's bias correction would run ahead. Each group gets its own copy.
    """
    saved = safe_load(optimizer_state)["optimizer_state_dict"]["param_groups"]
    optimizer = engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO-3 wrapper
    groups = optimizer.param_groups
    if len(saved) != len(groups):
        raise RuntimeError(f"checkpoint has {len(saved)} optimizer parameter groups, this model {len(groups)}")
    for group, hyper in zip(groups, saved, strict=True):
        group.update({key: value for key, value in hyper.items() if key != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def restore(engine: Any, directory: Path, *, rank: int, world_size: int) -> tuple[int, list[dict[str, Any]]]:
    """All ranks: load DeepSpeed state and the extras; returns (step, data states of every saved rank).

    The data states of all saved ranks come back so that the loader can re-lay out
    the data position when the number of workers changed. DeepSpeed's partitioned
    state (ZeRO >= 1) is tied to the number of ranks that wrote it: with another
    worker count it is loaded through DeepSpeed's universal checkpoint format.
    """
    files = _rank_files(directory)
    stage = int(engine.zero_optimization_stage())
    if len(files) != world_size and stage >= 1:
        began = time.perf_counter()
        with universal_copy(directory, rank) as universal:
            load_path, client_state = _load_universal(engine, universal)
        log.info(
            "rank %d: ZeRO-%d state of %d workers re-partitioned for %d through DeepSpeed's universal "
            "checkpoint in %.1f s",
            rank,
            stage,
            len(files),
            world_size,
            time.perf_counter() - began,
        )
    else:
        load_path, client_state = engine.load_checkpoint(str(directory), tag=TAG)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    extras = [safe_load(path) for path in files]
    steps = {int(extra["step"]) for extra in extras}
    if steps != {client_state.get("step")}:
        raise RuntimeError(
            f"checkpoint {directory} is inconsistent: rank files at steps {sorted(steps)} != {client_state}"
        )
    if rank < len(extras):
        set_rng_state(extras[rank]["rng"])
    step = int(extras[0]["step"])
    log.info("rank %d restored step %d from %s (written by %d workers)", rank, step, directory, len(files))
    return step, [extra["data"] for extra in extras]


class Checkpointer:
    """All ranks: restore from the checkpoint Ray Train hands back, and save + report checkpoints through it."""

    def __init__(self, engine: Any, *, rank: int, world_size: int, hooks: Sequence[TrainerHook] = ()) -> None:
        self.engine = engine
        self.rank, self.world_size = rank, world_size
        self.hooks = hooks

    def restore(self, loader: Any) -> int | None:
        """The step restored into the engine, RNG and `loader`; None when there is no checkpoint."""
        import ray.train

        # Ray Train hands back the latest reported checkpoint after a failure or when a
        # run with the same name and storage path starts again (resume=).
        latest = ray.train.get_checkpoint()
        if latest is None:
            return None
        with checkpoint_files(latest, self.rank) as path:
            step, data_states = restore(self.engine, path, rank=self.rank, world_size=self.world_size)
        loader.load_state_dict(data_states)
        worker_log.info("rank %d: resumed at step %d", self.rank, step)
        return step

    def save(self, step: int, report: dict[str, Any], data_state: dict[str, Any]) -> None:
        """Write this rank's part of checkpoint `step` and report it with `report`; returns once it is registered.

        Only checkpoints go through ray.train.report (it holds one report per worker until the
        controller polls); metrics go to MLflow (docs/reliability.md).
        """
        import ray.train

        with tempfile.TemporaryDirectory(prefix=f"ckpt-rank{self.rank}-") as tmp:
            save(self.engine, Path(tmp), rank=self.rank, step=step, data_state=data_state)
            for hook in self.hooks:
                hook.in_checkpoint(step)
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_{step:08d}",
            )
        # Returns once the controller collected the checkpoint's report: registered before any rank goes on.
        ray.train.report(report)
