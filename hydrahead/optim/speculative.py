"""An optimizer step taken before it is known to be wanted, and undone if it is not.

The trainer decides whether a step lands only after one host read of its flags (are the
gradients finite, did the loss's checks pass). That read drains the GPU's queue, and
whatever the host queues after it the GPU waits for. Taking the step before the read
puts its kernels in the queue ahead of the wait; the rare step that must be skipped is
then put back from a copy of what the step changes. The copy costs one multi-tensor copy
of the parameters and their optimizer state per step (device memory of the same size).
"""

from __future__ import annotations

import operator

import torch
from torch.optim import Optimizer

__all__ = ["StepSnapshot"]


class StepSnapshot:
    """Parameters and per-parameter optimizer state of ``optimizer``, copied by ``take``
    and written back by ``restore`` (bit for bit, state entries a step added removed)."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self._copies: list[torch.Tensor] = []
        self._sources: list[torch.Tensor] = []  # the tensors the copies were made for
        self._taken: tuple[list[torch.Tensor], dict] | None = None

    def _tensors(self) -> tuple[list[torch.Tensor], dict]:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        states = {p: dict(self.optimizer.state[p]) for p in params if p in self.optimizer.state}
        tensors = params + [v for state in states.values() for v in state.values() if isinstance(v, torch.Tensor)]
        return tensors, states

    @torch.no_grad()
    def take(self) -> None:
        tensors, states = self._tensors()
        # Every step after the first holds the same tensor objects: an identity check is
        # enough (and cheaper on the host, where this runs every step, than comparing shapes).
        if len(tensors) != len(self._sources) or not all(map(operator.is_, tensors, self._sources)):
            self._copies = [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors]
            self._sources = tensors
        torch._foreach_copy_(self._copies, tensors)
        self._taken = (tensors, states)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back what ``take`` saw: the tensors' values, and each parameter's state dict
        (entries replaced by new tensor objects are replaced back; entries added go)."""
        if self._taken is None:
            raise RuntimeError("StepSnapshot.restore() without a take() before it")
        tensors, states = self._taken
        torch._foreach_copy_(tensors, self._copies)
        for p in [p for group in self.optimizer.param_groups for p in group["params"]]:
            if p in states:
                self.optimizer.state[p] = dict(states[p])
            else:
                self.optimizer.state.pop(p, None)
        self._taken = None

    def release(self) -> None:
        """Forget the copy (the step stands)."""
        self._taken = None
