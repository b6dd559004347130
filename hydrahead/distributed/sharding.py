"""Who owns which classes: pure arithmetic, no process groups involved.

Classes are split into contiguous ranges; the first ``num_classes % world_size`` ranks
own one extra class. Every rank can compute every other rank's range, so nothing about
the layout ever needs to be communicated.
"""

from __future__ import annotations

from hydrahead.checks import check_int


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """Number of classes owned by each rank, in rank order."""
    check_int("num_classes", num_classes, 1)
    check_int("world_size", world_size, 1)
    if num_classes < world_size:
        raise ValueError(
            f"num_classes ({num_classes}) must be at least world_size ({world_size}): "
            "every rank owns at least one class"
        )
    base, extra = divmod(num_classes, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """The half-open class range ``[start, stop)`` owned by ``rank``."""
    sizes = shard_sizes(num_classes, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + sizes[rank]
