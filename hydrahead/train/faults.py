"""What can go wrong mid-run: preemption signals, non-finite values, and injected faults.

Signals: torchrun forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to its workers (Slurm's
``--signal`` reaches the batch script, which turns it into a SIGTERM for torchrun). A
worker's handler only records that a signal came; the trainer makes all ranks agree on it
at the next step boundary, inside the small all-reduce it runs every step anyway, then
saves, marks the run folder PREEMPTED and exits 0.

Injected faults exist so that tests can break a run at a chosen step, deterministically:
``HYDRAHEAD_INJECT_FAULT`` holds comma-separated items ``KIND@STEP`` or ``KIND@STEP:RANK``
(``nan_loss``: NaN features on that rank, so the loss is NaN everywhere; ``nan_grad``: a
NaN in that rank's head gradient; ``kill``: SIGKILL that rank, on torchrun's first
attempt only; ``lost_label``: that rank's active rows lose the row of one label it owns,
so the loss's merge check fails on every rank; ``preempt``: that rank is asked to stop as
by a signal, before the step), plus ``sleep=SECONDS`` to slow every step down.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

FAULT_ENV = "HYDRAHEAD_INJECT_FAULT"
FAULT_KINDS = ("nan_loss", "nan_grad", "kill", "lost_label", "preempt")
PREEMPTION_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1") if hasattr(signal, name)
)


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient under train.nonfinite=stop (or too many skipped steps)."""


class PreemptionWatcher:
    """Records the first preemption signal; the handler does nothing else, so a second
    signal (during a save, say) cannot interrupt or corrupt anything."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPTION_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None  # None: every rank


@dataclass
class FaultPlan:
    faults: tuple[Fault, ...] = ()
    sleep_s: float = 0.0

    def fires(self, kind: str, step: int, rank: int) -> bool:
        return any(f.kind == kind and f.step == step and f.rank in (None, rank) for f in self.faults)

    def before_step(self, step: int, rank: int) -> None:
        """The faults that act on the process before ``step``: ``kill`` (this rank, on
        torchrun's first attempt only, so the restarted group gets past it) and ``sleep``."""
        if self.fires("kill", step, rank) and first_attempt():
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sleep_s:
            time.sleep(self.sleep_s)


def parse_faults(text: str | None) -> FaultPlan:
    """Parse ``HYDRAHEAD_INJECT_FAULT`` (see the module docstring); ValueError on bad items."""
    faults, sleep_s = [], 0.0
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if item.startswith("sleep="):
            sleep_s = float(item.split("=", 1)[1])
            continue
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind not in FAULT_KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(
                f"{FAULT_ENV}: cannot read {item!r}; expected KIND@STEP[:RANK] "
                f"with KIND in {FAULT_KINDS}, or sleep=SECONDS"
            )
        faults.append(Fault(kind, int(step), int(rank) if rank else None))
    return FaultPlan(tuple(faults), sleep_s)


def fault_plan_from_env() -> FaultPlan:
    return parse_faults(os.environ.get(FAULT_ENV))


def first_attempt() -> bool:
    """True unless torchrun has restarted the worker group after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
