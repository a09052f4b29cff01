"""Moved to `pretrain.trainer` (the worker's `Trainer` and its components).

Kept only because publish.py, evaluate.py and background_eval.py (owned elsewhere) still
import `configure_logging` from here; delete once they import `pretrain.trainer.worker`.
"""

from pretrain.trainer.worker import configure_logging

__all__ = ["configure_logging"]
