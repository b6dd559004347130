"""Fused Triton kernels for the head's shard (the torch reference is hydrahead.head.cross_entropy)."""

from hydrahead.kernels.fused_loss import FUSED_MARGIN_TYPES, triton_sharded_cross_entropy
from hydrahead.kernels.shard_ce import SGDUpdate

__all__ = ["FUSED_MARGIN_TYPES", "SGDUpdate", "triton_sharded_cross_entropy"]
