"""Background index builds made slow on purpose, and selector steps timed one by one."""

from __future__ import annotations

import threading
import time


def slow_background_builds(selector, slow: float) -> list[int]:
    """Make ``selector``'s background builds take ``slow`` seconds more (builds inside the
    step stay fast); returns the steps (weight updates) every build starts from, filled as
    they start."""
    original, started = selector._build, []

    def slow_build(weight, step, *args, **kwargs):
        started.append(step)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(slow)
        return original(weight, step, *args, **kwargs)

    selector._build = slow_build
    return started


def timed_steps(selector, weight, batch, steps: int, *, pause_after: int | None = None, pause: float = 0.0):
    """Run ``select`` for steps 1..``steps`` on ``batch(step)`` (features, labels), sleeping
    ``pause`` seconds after step ``pause_after``; returns (seconds per step, the step each
    step's index was built from, index_age per step). Closes the selector."""
    seconds, built, ages = [], [], []
    try:
        for step in range(1, steps + 1):
            begin = time.perf_counter()
            selector.select(step, *batch(step), weight)
            seconds.append(time.perf_counter() - begin)
            built.append(selector._current.step)
            ages.append(selector.last["index_age"])
            if step == pause_after:
                time.sleep(pause)
    finally:
        selector.close()
    return seconds, built, ages
