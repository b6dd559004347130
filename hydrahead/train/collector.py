"""Python's cyclic garbage collector between steps, not inside them.

Left automatic, the collector runs whenever allocations trip its thresholds, inside whatever
step or background build made them, and a full collection walks every tracked object: 89 ms
on an H100 host during a 25M-row background graph build, while steps took 4 ms
(docs/selection.md, "Steps beside a background build"). While training, automatic
collection is off; the young generations (0 and 1, a few ms) are collected between steps
every ``every`` steps, every generation at each ``FULL_EVERY``-th of those and when the run
pauses anyway (evaluation, checkpoint), so that cyclic garbage that outlived a young
collection does not pile up over a long run. ``every`` 0 leaves Python's automatic
collection alone. Processes forked meanwhile (data loader workers) collect automatically.

A full collection walks every tracked object, and most of them are the imports' (about
250,000 functions, classes and dicts after torch's and hydrahead's: 0.12 s a collection on
a CI core). ``startup_objects_frozen`` moves those out of the collector's sight for the run
(``gc.freeze``), so the full collections walk what the run itself made.
"""

from __future__ import annotations

import contextlib
import gc
import os

from hydrahead.checks import check_int

__all__ = ["FULL_EVERY", "StepGarbageCollector", "startup_objects_frozen"]

FULL_EVERY = 20  # every 20th collection between steps is a full one (every 1,000 steps at every=50)
_holding = [0]  # collectors in this process that hold automatic collection off


def _enable_in_child() -> None:
    if _holding[0]:
        _holding[0] = 0
        gc.enable()


os.register_at_fork(after_in_child=_enable_in_child)


@contextlib.contextmanager
def startup_objects_frozen(enabled: bool = True):
    """Everything the collector tracks on entry (the imports, before the run builds anything)
    frozen until exit. The collector never frees a frozen object's cycle (reference counting
    still frees the rest), so this must come before the run makes objects that may later
    become cyclic garbage (a replaced index, a model); on exit
    they are handed back, and the interpreter's shutdown collects them as usual. Where objects
    are frozen already, whoever froze them undoes it, and this does nothing."""
    if not enabled or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class StepGarbageCollector:
    """Owns the collector from construction to ``close``, which restores automatic
    collection if it was on before."""

    def __init__(self, every: int):
        check_int("train.gc_every", every, 0)
        self.every = every
        self._was_enabled = gc.isenabled()
        self._holds = bool(every)
        if every:
            gc.disable()
            _holding[0] += 1

    def after_step(self, step: int) -> None:
        """Between steps: the young generations every ``every`` steps, all of them at every
        ``FULL_EVERY``-th such step."""
        if not self.every or step % self.every:
            return
        if step % (self.every * FULL_EVERY) == 0:
            gc.collect()
        else:
            gc.collect(1)

    def at_pause(self) -> None:
        """At a pause of the run's own (evaluation, checkpoint): every generation."""
        if self.every:
            gc.collect()

    def close(self) -> None:
        """Automatic collection back as it was (once; later calls do nothing)."""
        if self._holds:
            self._holds = False
            _holding[0] = max(0, _holding[0] - 1)
            if self._was_enabled:
                gc.enable()
