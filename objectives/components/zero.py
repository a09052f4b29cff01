"""DeepSpeed ZeRO-3 partitions parameters: gather them whole where a module is read outside its own forward.

Every helper here is a no-op when nothing is partitioned (ZeRO 0-2, or no DeepSpeed), and
a collective under ZeRO-3: every rank must enter it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 holds only this rank's slice of `param` (DeepSpeed tags it with `ds_id`)."""
    return hasattr(param, "ds_id")


def gathered(params: Iterable[nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """Gather the partitioned ones among `params` for reading, released on exit; a no-op otherwise."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def container_parameters(root: nn.Module) -> list[nn.Parameter]:
    """Own parameters of the modules under `root` that have children (the timm ViT's `cls_token`/`pos_embed`).

    The objectives use them without calling their module's forward, so ZeRO-3 would never
    gather them; in training the trainer registers them with the root's forward.
    """
    params: list[nn.Parameter] = []
    for module in root.modules():
        if module is not root and next(module.children(), None) is not None:
            params.extend(module.parameters(recurse=False))
    return params


def bypassed_parameters(root: nn.Module) -> list[nn.Parameter]:
    """Parameters that no forward gathers when the model runs outside the root's forward.

    The root's own parameters (e.g. MAE's `mask_token`) and the container parameters.
    """
    return [*root.parameters(recurse=False), *container_parameters(root)]


@contextlib.contextmanager
def gathered_outside_forward(root: nn.Module) -> Iterator[None]:
    """Gather `bypassed_parameters` while the model runs outside the root's forward (e.g. `pictures`).

    Called as a method, the root's forward hook, which gathers them in training, never
    fires; leaf modules still gather their own weights when called.
    """
    with gathered(bypassed_parameters(root)):
        yield
