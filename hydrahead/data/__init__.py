"""Data: procedural samples addressed by global index, and the global-cursor sampler."""

from hydrahead.data.procedural import (
    ProceduralFeatures,
    counter_hash,
    counter_normal,
    counter_uniform,
    zipf_ranks,
)
from hydrahead.data.sampler import GlobalCursor, eval_indices, local_batch_size, rank_indices

__all__ = [
    "GlobalCursor",
    "ProceduralFeatures",
    "counter_hash",
    "counter_normal",
    "counter_uniform",
    "eval_indices",
    "local_batch_size",
    "rank_indices",
    "zipf_ranks",
]
