"""shard_range: contiguous class ranges, the first C mod N ranks owning one extra class."""

from __future__ import annotations

import pytest

from hydrahead.distributed.sharding import shard_range, shard_sizes


@pytest.mark.parametrize(
    "num_classes,world_size", [(1001, 1), (1001, 2), (1001, 3), (10, 4), (7, 7), (100_000_000, 64)]
)
def test_ranges_tile_the_classes_contiguously(num_classes, world_size):
    ranges = [shard_range(num_classes, world_size, rank) for rank in range(world_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert sizes == shard_sizes(num_classes, world_size)
    base, extra = divmod(num_classes, world_size)
    assert sizes == [base + 1] * extra + [base] * (world_size - extra)


def test_known_split():
    assert [shard_range(10, 4, r) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


@pytest.mark.parametrize(
    "args,message",
    [
        ((3, 4, 0), "at least world_size"),
        ((10, 4, 4), "rank must be"),
        ((10, 4, -1), "rank must be"),
        ((0, 1, 0), "num_classes must be >= 1"),
        ((10, 0, 0), "world_size must be >= 1"),
        ((10, True, 0), "world_size must be an int"),
        ((10.0, 2, 0), "num_classes must be an int"),
    ],
)
def test_bad_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        shard_range(*args)
