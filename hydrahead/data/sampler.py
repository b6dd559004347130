"""Deterministic distributed sampling over the global sample stream.

Training reads the stream 0, 1, 2, ... in global batches: the batch that starts at the
global sample cursor ``k`` is ``[k, k + G)``, and rank ``r`` of ``N`` takes the contiguous
slice ``[k + r*b, k + (r+1)*b)`` with ``b = G / N``. So the global batch does not depend
on the world size, the rank slices concatenated in rank order give it back, and a run
resumes from the cursor alone, at any world size.
"""

from __future__ import annotations

from typing import Any

import torch

from hydrahead.checks import check_int

__all__ = ["GlobalCursor", "eval_indices", "local_batch_size", "rank_indices"]


def _check_rank(rank: int, world_size: int) -> None:
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Samples per rank: ``global_batch / world_size``, which must divide evenly."""
    check_int("global_batch", global_batch, 1)
    check_int("world_size", world_size, 1)
    if global_batch % world_size:
        raise ValueError(f"global_batch ({global_batch}) must be divisible by world_size ({world_size})")
    return global_batch // world_size


def rank_indices(
    cursor: int,
    global_batch: int,
    rank: int,
    world_size: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global sample indices of ``rank``'s share of the global batch starting at ``cursor``.

    ``cursor`` is the global index of the batch's first sample; with a constant global
    batch, step ``s`` starts at ``s * global_batch``.
    """
    check_int("cursor", cursor, 0)
    _check_rank(rank, world_size)
    local = local_batch_size(global_batch, world_size)
    start = cursor + rank * local
    return torch.arange(start, start + local, dtype=torch.int64, device=device)


def eval_indices(
    num_samples: int,
    rank: int,
    world_size: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``rank``'s contiguous slice of the evaluation samples ``[0, num_samples)``.

    The split need not be even: the first ``num_samples % world_size`` ranks take one
    sample more (as with class shards), and a rank may get none when
    ``num_samples < world_size``. Metrics must therefore be summed over ranks, not averaged.
    """
    check_int("num_samples", num_samples, 0)
    _check_rank(rank, world_size)
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return torch.arange(start, stop, dtype=torch.int64, device=device)


class GlobalCursor:
    """The index of the next unread sample of the global stream; checkpoint it to resume.

    Every rank holds its own copy and advances it by the global batch each step, so the
    copies agree without communication.
    """

    def __init__(self, cursor: int = 0):
        check_int("cursor", cursor, 0)
        self.cursor = cursor

    def next_indices(
        self,
        global_batch: int,
        rank: int,
        world_size: int,
        *,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """This rank's indices of the next global batch; advances the cursor by it."""
        indices = rank_indices(self.cursor, global_batch, rank, world_size, device=device)
        self.cursor += global_batch
        return indices

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"cursor"}:
            raise ValueError(f"GlobalCursor state must hold only 'cursor', got {sorted(state)}")
        cursor = state["cursor"]
        # Some checkpoint formats hand the int back as a 0-d tensor.
        if isinstance(cursor, torch.Tensor) and cursor.numel() == 1:
            if not cursor.dtype.is_floating_point:
                cursor = int(cursor.item())
        check_int("cursor", cursor, 0)
        self.cursor = cursor

    def __repr__(self) -> str:
        return f"GlobalCursor(cursor={self.cursor})"
