"""Checkpoint loads are weights_only: a malicious pickle is refused; RNG state round-trips."""

from __future__ import annotations

import os
import random

import pytest
import torch

from pretrain.trainer.checkpoint import TAG, rng_state, safe_load, set_rng_state, universal_copy


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


class Marker:
    """Unpickling it would create `path` (a side effect a refused load never has)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        safe_load(path)


def test_universal_conversion_refuses_a_malicious_pickle(tmp_path) -> None:
    # DeepSpeed's converter turns torch's weights-only mode off in its own loads; our conversion forces
    # weights_only on every load inside it (a changed worker count at ZeRO 1-3 runs it).
    state = tmp_path / "ckpt" / TAG
    state.mkdir(parents=True)
    torch.save(
        {"optimizer_state_dict": Marker(tmp_path / "pwned")}, state / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    )
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        with universal_copy(tmp_path / "ckpt", rank=0):
            pass
    assert not (tmp_path / "pwned").exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the block


def test_rng_state_round_trip_through_weights_only_file(tmp_path) -> None:
    random.seed(3)
    torch.manual_seed(3)
    state = rng_state()
    expected = (random.random(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    random.seed(99)
    torch.manual_seed(99)
    set_rng_state(safe_load(tmp_path / "rng.pt"))
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
