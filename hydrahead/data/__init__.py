"""Data: samples addressed by global index (procedural, image folders, feature files),
the global-cursor sampler and the per-rank batch streams."""

from hydrahead.data.build import batches, build_dataset, eval_batches
from hydrahead.data.feature_files import FeatureFiles
from hydrahead.data.folder import BadImageError, EpochOrder, ImageFolder
from hydrahead.data.images import ProceduralImages
from hydrahead.data.procedural import (
    ProceduralFeatures,
    counter_hash,
    counter_normal,
    counter_uniform,
    zipf_ranks,
)
from hydrahead.data.sampler import GlobalCursor, eval_indices, local_batch_size, rank_indices

__all__ = [
    "BadImageError",
    "EpochOrder",
    "FeatureFiles",
    "GlobalCursor",
    "ImageFolder",
    "ProceduralFeatures",
    "ProceduralImages",
    "batches",
    "build_dataset",
    "counter_hash",
    "counter_normal",
    "counter_uniform",
    "eval_batches",
    "eval_indices",
    "local_batch_size",
    "rank_indices",
    "zipf_ranks",
]
