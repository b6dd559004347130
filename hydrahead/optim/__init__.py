"""Backbone optimizers (SGD, AdamW, LARS, LAMB) and LR schedules for large batches."""

from hydrahead.optim.factory import OPTIMIZERS, build_optimizer
from hydrahead.optim.large_batch import LAMB, LARS
from hydrahead.optim.schedule import SCHEDULES, lr_multiplier

__all__ = ["LAMB", "LARS", "OPTIMIZERS", "SCHEDULES", "build_optimizer", "lr_multiplier"]
