"""The orchestrator: config, Ray launch, worker loop, DeepSpeed engine, checkpoints, MLflow."""
