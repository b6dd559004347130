"""Learning-rate schedules: linear warm-up, then cosine, polynomial or constant.

The schedule is a pure function of the step returning a multiplier of the base LR; the
base LR itself is scaled with the global batch by the caller (never with the GPU count).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "poly", "constant")


def lr_multiplier(
    step: int,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    *,
    poly_power: float = 2.0,
    min_lr_ratio: float = 0.0,
) -> float:
    """Multiplier of the base LR at ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first step
    already moves and the last warm-up step reaches 1. After warm-up, with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]:

    - cosine:   ``min + (1 - min) * (1 + cos(pi * p)) / 2``
    - poly:     ``min + (1 - min) * (1 - p) ** poly_power``
    - constant: ``1``

    where ``min = min_lr_ratio``. The decay reaches ``min_lr_ratio`` at
    ``step == total_steps`` and stays there.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; valid names: {', '.join(SCHEDULES)}")
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps and total_steps > 0, got {warmup_steps}, {total_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = (1.0 - progress) ** poly_power
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
