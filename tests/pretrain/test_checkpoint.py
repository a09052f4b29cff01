"""Checkpoint loads are weights_only: a malicious pickle is refused; RNG state round-trips."""

from __future__ import annotations

import os
import random

import pytest
import torch

from pretrain.trainer.checkpoint import rng_state, safe_load, set_rng_state


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        safe_load(path)


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
