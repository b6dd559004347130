"""How long each kind of communication took in a step, and how much of it the step waited for.

Each collective leaves two kinds of interval:
    busy     from the moment it could start (its input ready and, for collectives that share
             a channel, the previous one done) to its completion: its own time
    waited   the stretch during which compute stood still for it
so the share of communication hidden behind compute is 1 - waited / busy.

Kinds: ``feature_gather`` and ``grad_scatter`` (the head's two exchanges) and
``backbone_allreduce`` (DDP's buckets; their "waited" is how far the last bucket finished
after the last gradient was ready, the part the backward could not cover).

Marks are CUDA events on GPU, read once after the step's final synchronize (timing adds no
host sync of its own), and wall-clock readings on CPU. Only steps with ``enabled`` set
record anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hydrahead.distributed.collectives import Pending

KINDS = ("feature_gather", "grad_scatter", "backbone_allreduce")
_TAIL_WAITED = ("backbone_allreduce",)


def union_ms(spans: list[tuple[float, float]]) -> float:
    """Total length covered by a set of intervals (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > reach:
            total += stop - max(start, reach)
            reach = stop
    return total


class CommClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.enabled = False
        self._side = torch.cuda.Stream(device) if self.cuda else None  # where a collective's completion is marked
        self._spans: dict[str, dict[str, list]] = {kind: {"busy": [], "waited": []} for kind in KINDS}

    def mark(self):
        """A point in the current stream's timeline (CUDA) or a wall-clock reading (CPU)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, kind: str, what: str, start, stop) -> None:
        if self.enabled:
            self._spans[kind][what].append((start, stop))

    def start(self, kind: str, begin: Callable[[], Pending]) -> TimedPending:
        """Issue a collective (``begin`` starts it) and mark its busy interval."""
        if not self.enabled:
            return TimedPending(self, kind, begin())
        if not self.cuda:  # the busy interval is closed when the wait sees the work done
            issued, done = time.perf_counter(), []
            pending = begin()
            if pending.work is not None:
                pending.work.get_future().add_done_callback(lambda _: done.append(time.perf_counter()))
            return TimedPending(self, kind, pending, issued, done)
        # The side stream waits for the input, then for the collective: its two marks bracket the
        # collective's own time (after the previous one on the side stream, as the transport orders them).
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            issued = self.mark()
        pending = begin()
        with torch.cuda.stream(self._side):
            if pending.work is not None:
                pending.work.wait()
            self.add(kind, "busy", issued, self.mark())
        return TimedPending(self, kind, pending)

    def hook(self, kind: str, hook):
        """Wrap a DDP communication hook so each bucket's (ready, done) interval is marked."""

        def timed(state, bucket):
            if not self.enabled:
                return hook(state, bucket)
            ready = self.mark()

            def done(fut):
                self.add(
                    kind, "busy", ready, self.mark()
                )  # a CUDA future's callback runs on a stream that waited for it
                return fut.value()

            return hook(state, bucket).then(done)

        return timed

    def take(self) -> dict:
        """``ms_<kind>`` (busy), ``ms_<kind>_waited`` and ``comm_hidden`` since the last take;
        call after the step's work is complete (on CUDA: after a synchronize)."""
        spans = self._spans
        self._spans = {kind: {"busy": [], "waited": []} for kind in KINDS}
        marks = [m for kind in spans.values() for what in kind.values() for pair in what for m in pair]
        if not marks:
            return {}
        origin = marks[0]
        at = (lambda m: origin.elapsed_time(m)) if self.cuda else (lambda m: (m - origin) * 1e3)
        out, busy_total, waited_total = {}, 0.0, 0.0
        for kind, what in spans.items():
            busy = [(at(a), at(b)) for a, b in what["busy"]]
            if not busy:
                continue
            if kind in _TAIL_WAITED:
                waited = max(0.0, max(b for _, b in busy) - max(a for a, _ in busy))
            else:
                waited = union_ms([(at(a), at(b)) for a, b in what["waited"]])
            out[f"ms_{kind}"] = union_ms(busy)
            out[f"ms_{kind}_waited"] = waited = min(waited, out[f"ms_{kind}"])
            busy_total += out[f"ms_{kind}"]
            waited_total += waited
        if busy_total > 0:
            out["comm_hidden"] = max(0.0, 1.0 - waited_total / busy_total)
        return out


class TimedPending:
    """A collective in flight whose ``wait()`` marks how long compute stood still for it."""

    def __init__(self, clock: CommClock, kind: str, pending: Pending, issued=None, done=None):
        self.clock, self.kind, self.pending = clock, kind, pending
        self.issued, self.done = issued, done  # CPU: the issue time and the completion callback's reading

    def wait(self) -> torch.Tensor:
        if not self.clock.enabled:
            return self.pending.wait()
        before = self.clock.mark()
        result = self.pending.wait()
        after = self.clock.mark()
        if self.issued is None:
            self.clock.add(self.kind, "waited", before, after)
        else:  # a thread woken late is not communication: clip to the completion when it is known
            finished = min(self.done[0], after) if self.done else after
            self.clock.add(self.kind, "busy", self.issued, finished)
            self.clock.add(self.kind, "waited", min(before, finished), finished)
        return result


__all__ = ["KINDS", "CommClock", "TimedPending", "union_ms"]
