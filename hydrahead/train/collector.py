"""Python's cyclic garbage collector between steps, not inside them.

Left automatic, the collector runs whenever allocations trip its thresholds, inside whatever
step or background build made them, and a full collection walks every tracked object: 89 ms
on an H100 host during a 25M-row background graph build, while steps took 4 ms
(docs/selection.md, "Steps beside a background build"). While training, automatic
collection is off; the young generations (0 and 1, a few ms) are collected between steps
every ``every`` steps, and all generations when the run pauses anyway (evaluation,
checkpoint). ``every`` 0 leaves Python's automatic collection alone.
"""

from __future__ import annotations

import gc

from hydrahead.checks import check_int

__all__ = ["StepGarbageCollector"]


class StepGarbageCollector:
    """Owns the collector from construction to ``close``, which restores automatic
    collection if it was on before."""

    def __init__(self, every: int):
        check_int("train.gc_every", every, 0)
        self.every = every
        self._was_enabled = gc.isenabled()
        if every:
            gc.disable()

    def after_step(self, step: int) -> None:
        """Between steps: the young generations every ``every`` steps."""
        if self.every and step % self.every == 0:
            gc.collect(1)

    def at_pause(self) -> None:
        """At a pause of the run's own (evaluation, checkpoint): every generation."""
        if self.every:
            gc.collect()

    def close(self) -> None:
        if self.every and self._was_enabled:
            gc.enable()
