"""W data-parallel workers inside one rank (``comm.simulate_workers``): one GPU reproduces
the backbone exchange of a W-GPU run.

On W real ranks, rank w forwards slice w of the global batch (BatchNorm normalises with
that slice's statistics), backpropagates, and its DDP hook packs its gradient into a
message (top-k: from rank w's own residual and velocity); every rank then applies the sum
of the W messages. Here the rank's batch is cut into the same W slices, and for each w:
slice w is forwarded with worker w's BatchNorm buffers, backpropagated alone, and its
gradient packed by worker w's ``TopK.pack``, the function the hook calls. The messages
are summed by the hook's own ``unpack``. ``none`` sums the W gradients.

BatchNorm buffers: with DDP's ``broadcast_buffers`` every forward starts from rank 0's
buffers, so here every worker starts from worker 0's and worker 0's are kept; without it
each worker keeps its own set and ``settle_buffers`` averages them, as the trainer
averages the ranks'.
"""

from __future__ import annotations

import torch

from hydrahead.comm.compression import CommCounters, TopK, unpack


class SimulatedWorkers:
    """``forward`` the W micro-batches, then ``backward`` their gradients through the exchange
    into the parameters' ``.grad`` (the sum the trainer's optimizer expects).

    ``exchanges``: worker w's top-k state at index w (None: the plain sum, ``none``).
    ``forward``: the callable that runs the module (e.g. its torch.compile'd form).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        num_workers: int,
        *,
        counters: CommCounters,
        exchanges: list[TopK] | None = None,
        forward=None,
        broadcast_buffers: bool = True,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if exchanges is not None and len(exchanges) != num_workers:
            raise ValueError(f"need one exchange per worker: {num_workers}, got {len(exchanges)}")
        self.module, self.num_workers = module, num_workers
        self.forward_fn = forward or module
        self.exchanges, self.counters = exchanges, counters
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Buffers are swapped by slot, never written in place: BatchNorm's backward checks
        # that the running statistics it saw in the forward were not modified since.
        self._slots = [(mod, name) for mod in module.modules() for name, b in mod._buffers.items() if b is not None]
        self.broadcast_buffers = broadcast_buffers
        # Per-worker buffer sets, kept only when the workers' statistics drift apart; made from
        # the module's at the first forward, so a checkpoint loaded before it seeds them all.
        self.worker_buffers = None
        self._outputs: list[torch.Tensor] = []

    @staticmethod
    def _copy(values: list[torch.Tensor]) -> list[torch.Tensor]:
        return [value.detach().clone() for value in values]

    def _buffers(self) -> list[torch.Tensor]:
        return [mod._buffers[name] for mod, name in self._slots]

    def _set_buffers(self, values: list[torch.Tensor]) -> None:
        for (mod, name), value in zip(self._slots, values):
            mod._buffers[name] = value

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The W micro-batches' outputs, concatenated in worker order."""
        if inputs.shape[0] % self.num_workers:
            raise ValueError(f"a batch of {inputs.shape[0]} does not split into {self.num_workers} equal workers")
        if self.broadcast_buffers:  # every worker starts from worker 0's; worker 0 updates its own
            start = self._buffers()
            sets = [start] + [self._copy(start) for _ in range(self.num_workers - 1)]
        else:
            if self.worker_buffers is None:
                self.worker_buffers = [self._copy(self._buffers()) for _ in range(self.num_workers)]
            sets = self.worker_buffers
        outputs = []
        for worker, chunk in enumerate(inputs.chunk(self.num_workers)):
            self._set_buffers(sets[worker])
            outputs.append(self.forward_fn(chunk))
        self._set_buffers(sets[0])
        self._outputs = outputs
        return torch.cat(outputs)

    def backward(self, grad: torch.Tensor) -> None:
        """Backpropagate each worker's rows of ``grad`` (the gradient of ``forward``'s output)
        alone, exchange, and set every parameter's ``.grad`` to the sum."""
        outputs, self._outputs = self._outputs, []
        sizes = [p.numel() for p in self.params]
        messages, layout, total = [], None, None
        for worker, (output, part) in enumerate(zip(outputs, grad.split([o.shape[0] for o in outputs]))):
            grads = torch.autograd.grad(output, self.params, part, allow_unused=True)
            buffer = torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(self.params, grads)]
            )
            if self.exchanges is None:
                total = buffer if total is None else total.add_(buffer)
                continue
            views = [view.view_as(p) for view, p in zip(buffer.split(sizes), self.params)]
            payload, layout = self.exchanges[worker].pack(buffer, self.params, views, self.num_workers)
            messages.append(payload)
        if self.exchanges is None:
            self.counters.backbone_allreduce += total.numel() * total.element_size()
        else:
            total = unpack(torch.stack(messages), layout, buffer)
        for param, summed in zip(self.params, total.split(sizes)):
            param.grad = summed.view_as(param)

    def settle_buffers(self) -> None:
        """Per-worker BatchNorm statistics become their mean (floating-point buffers), as
        the trainer averages the ranks' before an evaluation or a checkpoint."""
        if self.worker_buffers is None:
            return
        mean = [
            torch.stack(values).mean(0) if values[0].is_floating_point() else values[0].clone()
            for values in zip(*self.worker_buffers)
        ]
        self.worker_buffers = [self._copy(mean) for _ in range(self.num_workers)]
        self._set_buffers(self.worker_buffers[0])


__all__ = ["SimulatedWorkers"]
