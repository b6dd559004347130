"""Training: the trainer, checkpoints and metrics."""
