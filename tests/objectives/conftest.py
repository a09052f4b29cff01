"""Objective unit tests run tiny tensors: one intra-op thread is faster than two, and much
faster while anything else uses the cores (a training step of a tiny ViT: ~20 ms vs ~400 ms)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
