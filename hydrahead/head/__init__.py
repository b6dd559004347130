"""The class-sharded classification head and its loss."""

from hydrahead.head.classifier import INIT_KINDS, ShardedClassifier, init_class_weights
from hydrahead.head.cross_entropy import MARGIN_TYPES, sharded_cross_entropy

__all__ = ["INIT_KINDS", "MARGIN_TYPES", "ShardedClassifier", "init_class_weights", "sharded_cross_entropy"]
