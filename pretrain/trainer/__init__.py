"""The worker side of a run: the `Trainer` and its components (step, metrics, checkpointing, hooks).

Ray Train runs `pretrain.trainer.worker.train_loop` on every worker.
"""
