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


def bypassed_parameters(root: nn.Module) -> list[nn.Parameter]:
    """Parameters that no submodule's own forward gathers under ZeRO-3.

    These are the root's own parameters (e.g. MAE's `mask_token`) and those of container
    modules whose forward the objectives bypass (the timm ViT's `cls_token`/`pos_embed`);
    in training the trainer registers them with the root's forward.
    """
    params = list(root.parameters(recurse=False))
    for module in root.modules():
        if module is not root and next(module.children(), None) is not None:
            params.extend(module.parameters(recurse=False))
    return params


@contextlib.contextmanager
def gathered_outside_forward(root: nn.Module) -> Iterator[None]:
    """Gather `bypassed_parameters` while the model runs outside the root's forward (e.g. `pictures`).

    Called as a method, the root's forward hook, which gathers them in training, never
    fires; leaf modules still gather their own weights when called.
    """
    with gathered(bypassed_parameters(root)):
        yield
