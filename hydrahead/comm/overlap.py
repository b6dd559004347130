"""comm.overlap: the head's step on micro-batches, its two exchanges in flight behind compute.

Micro-batch k is the k-th slice of every rank's local batch; gathered, it holds those
slices rank by rank. Per step:

    all-gather the whole step's labels (a few bytes per sample)
    start gather(F_0)
    for k in 0 .. M-1:
        F_k = wait(gather k); start gather(F_{k+1})           transfer group, async
        loss_k, dF_k = head.chunk(F_k)                         head group: MAX + SUM of G/M floats
        start reduce-scatter(dF_k)                             transfer group, async
    head.finish(): the step's one update over all rows, while the last reduce-scatter travels
    df_r = wait(every reduce-scatter), slice by slice

The bulk transfers use their own process group (its own NCCL communicator and stream), so
the small all-reduces each chunk needs never queue behind a gather. A row's log-sum-exp
spans classes, not samples, so it is complete within its micro-batch (pass 1); the weight
update needs every row's, so it runs once after the last chunk (pass 2). Selections that
look at the features (``head.selection`` other than ``full``) need the whole batch before
any chunk: their gathers all finish first and only the reduce-scatters overlap compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from hydrahead.comm.timing import CommClock
from hydrahead.distributed.collectives import (
    all_gather_labels,
    group_rank,
    group_world_size,
    start_gather_rows,
    start_sum_own_rows,
)
from hydrahead.distributed.sharded_softmax import MergeChecks, per_valid_label

# NCCL blocks for the pipeline's transfers: enough for a few MB, and the rest of the SMs
# stay with the head's kernels.
TRANSFER_CTAS = 4


def transfer_group(head_group: dist.ProcessGroup | None, backend: str) -> dist.ProcessGroup | None:
    """A second communicator over the head group's ranks for the pipeline's bulk transfers
    (collective: every rank calls it). On NCCL its kernels take at most TRANSFER_CTAS blocks,
    since a gather issued early spins on its SMs until the peers join."""
    if group_world_size(head_group) == 1:
        return head_group
    members = dist.get_process_group_ranks(head_group) if head_group is not None else list(range(dist.get_world_size()))
    options = None
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
        options.config.max_ctas = TRANSFER_CTAS
    return dist.new_group(members, pg_options=options)


def micro_batch_bounds(local_rows: int, micro_batches: int) -> list[tuple[int, int]]:
    """(start, stop) of each micro-batch within a local batch: sizes differ by at most one."""
    if micro_batches < 1 or micro_batches > max(local_rows, 1):
        raise ValueError(f"micro_batches must be in [1, local batch = {local_rows}], got {micro_batches}")
    edges = [local_rows * k // micro_batches for k in range(micro_batches + 1)]
    return list(zip(edges[:-1], edges[1:]))


def global_rows(start: int, stop: int, local_rows: int, world_size: int, device) -> torch.Tensor:
    """Positions in the rank-major global batch of rows [start, stop) of every rank's batch."""
    offsets = torch.arange(world_size, device=device)[:, None] * local_rows
    return (offsets + torch.arange(start, stop, device=device)).reshape(-1)


class OverlappedHead:
    """Runs the head's step on ``micro_batches`` chunks with gathers and reduce-scatters in
    flight behind compute; results equal the whole-batch path up to summation order."""

    def __init__(self, head, micro_batches: int, transfer_group: dist.ProcessGroup | None, clock: CommClock):
        self.head, self.micro_batches, self.transfer_group, self.clock = head, micro_batches, transfer_group, clock
        self.world_size, self.rank = group_world_size(head.group), group_rank(head.group)
        if group_world_size(transfer_group) != self.world_size:
            raise ValueError("the transfer group must hold the head group's ranks")

    def _gather(self, local_features, bounds, k):
        start, stop = bounds[k]
        sizes = [stop - start] * self.world_size
        return self.clock.start(
            "feature_gather", lambda: start_gather_rows(local_features[start:stop], sizes, self.transfer_group)
        )

    def step(
        self,
        local_features: torch.Tensor,
        local_labels: torch.Tensor,
        select: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
        checks: MergeChecks | None = None,
    ):
        """(loss, gradient of the loss for the local features, bytes sent per kind, the checks
        left to the caller's read or None).

        ``select(global_features, global_labels)``: the step's active rows (or None) and their
        logit offsets (or None: ``head.fill_correction``'s), from the rank-major global batch.
        The returned gradient is None when the loss is known not to be finite: then no update
        was taken (``finish_step(skip=True)`` clears the rest).
        With ``checks`` and a head whose step can still be dropped (``step_discardable``),
        nothing is read here: the loss's checks go into ``checks``, which is returned, and
        its finiteness is the caller's to judge, as the trainer does in its one read.
        """
        local_features = local_features.detach()
        local_rows, device = local_features.shape[0], local_features.device
        bounds = micro_batch_bounds(local_rows, self.micro_batches)
        sizes = [local_rows] * self.world_size
        labels = all_gather_labels(local_labels, self.head.group, sizes=sizes)
        rows = [global_rows(start, stop, local_rows, self.world_size, device) for start, stop in bounds]

        gathers = [self._gather(local_features, bounds, 0)]
        arrived: list[torch.Tensor] = []  # chunks already waited for (a selection needs them all first)
        active_rows = logit_offset = None
        if select is not None:
            gathers += [self._gather(local_features, bounds, k) for k in range(1, len(bounds))]
            arrived = [pending.wait() for pending in gathers]
            whole = torch.empty((labels.shape[0], local_features.shape[1]), dtype=local_features.dtype, device=device)
            for k, chunk in enumerate(arrived):
                whole[rows[k]] = chunk
            active_rows, logit_offset = select(whole, labels)
        # The selector's rows: complete by construction.
        loss_fn = self.head.micro_batches(labels, active_rows, check_rows=False, logit_offset=logit_offset)

        loss_sum, loss_dtype = torch.zeros((), dtype=torch.float64, device=device), None
        scatters = []
        for k in range(len(bounds)):
            features = arrived[k] if arrived else gathers[k].wait()
            if not arrived and k + 1 < len(bounds):
                gathers.append(self._gather(local_features, bounds, k + 1))
            chunk_loss, grad = loss_fn.chunk(features, rows[k])
            loss_sum += chunk_loss.double()
            loss_dtype = chunk_loss.dtype
            chunk_sizes = [bounds[k][1] - bounds[k][0]] * self.world_size
            scatters.append(
                self.clock.start(
                    "grad_scatter",
                    lambda grad=grad, sizes=chunk_sizes: start_sum_own_rows(
                        grad, sizes, self.rank, self.transfer_group
                    ),
                )
            )
        unjudged = checks if checks is not None and self.head.step_discardable else None
        loss_fn.check(unjudged)
        loss = (loss_sum / per_valid_label(loss_fn.num_valid)).to(loss_dtype)
        finite = True if unjudged is not None else bool(torch.isfinite(loss))
        if finite:
            loss_fn.finish()
        local_grad = torch.empty_like(local_features)
        for (start, stop), pending in zip(bounds, scatters):
            local_grad[start:stop] = pending.wait()
        payload = {
            "bytes_feature_gather": local_features.numel() * local_features.element_size()
            + local_labels.numel() * local_labels.element_size(),
            "bytes_grad_scatter": labels.shape[0] * local_features.shape[1] * local_grad.element_size(),
        }
        return loss, (local_grad if finite else None), payload, unjudged
