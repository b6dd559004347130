"""Model-agnostic distributed pieces: shard arithmetic, process groups, autograd collectives."""

from hydrahead.distributed.collectives import all_gather_features, all_gather_labels, group_rank, group_world_size
from hydrahead.distributed.sharding import shard_range, shard_sizes

__all__ = [
    "all_gather_features",
    "all_gather_labels",
    "group_rank",
    "group_world_size",
    "shard_range",
    "shard_sizes",
]
