"""Thin autograd-aware wrappers around torch.distributed collectives.

Every function takes an explicit ``group`` (``None`` means the world group). Without an
initialised process group they act as a world of one rank, so the same code runs in a
single process, in CPU tests on gloo, and on NCCL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def group_rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def all_gather_objects(obj, group: dist.ProcessGroup | None = None) -> list:
    """``obj`` from every rank of ``group`` in rank order (any picklable object; small ones:
    it travels pickled, through the device on NCCL)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * group_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def _backend(group: dist.ProcessGroup | None) -> str:
    return str(dist.get_backend(group)).lower()


def gather_row_counts(num_rows: int, dim: int, device: torch.device, group=None) -> list[int]:
    """All-gather each rank's (rows, dim); raises the same ValueError on every rank if dims differ.

    Costs one all-gather of two int64 per rank; callers that know the sizes skip it.
    """
    world = group_world_size(group)
    if world == 1:
        return [num_rows]
    mine = torch.tensor([num_rows, dim], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows_dims = [tuple(t.tolist()) for t in everyone]
    dims = {d for _, d in rows_dims}
    if len(dims) != 1:
        raise ValueError(f"all_gather: ranks disagree on the feature width: (rows, dim) per rank = {rows_dims}")
    return [r for r, _ in rows_dims]


class Pending:
    """A collective in flight: ``wait()`` returns its result (once the work is done)."""

    def __init__(self, work, finish):
        self.work, self._finish = work, finish

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self._finish()


def start_gather_rows(local: torch.Tensor, sizes: Sequence[int], group) -> Pending:
    """Start concatenating every rank's rows in rank order; ranks may hold different row counts."""
    local = local.contiguous()
    if len(sizes) == 1:
        return Pending(None, lambda: local)
    largest = max(sizes)
    if all(s == largest for s in sizes) and _backend(group) == "nccl":
        out = local.new_empty((largest * len(sizes), *local.shape[1:]))
        work = dist.all_gather_into_tensor(out, local, group=group, async_op=True)
        return Pending(work, lambda: out)
    # Pad to the largest block so every rank sends the same shape, then drop the padding.
    if local.shape[0] < largest:
        pad = local.new_zeros((largest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    blocks = [torch.empty_like(local) for _ in sizes]
    work = dist.all_gather(blocks, local, group=group, async_op=True)
    return Pending(work, lambda: torch.cat([block[:size] for block, size in zip(blocks, sizes)]))


def start_sum_own_rows(grad: torch.Tensor, sizes: Sequence[int], rank: int, group) -> Pending:
    """Start summing over ranks the gradient rows of this rank's samples (a reduce-scatter)."""
    grad = grad.contiguous()
    if len(sizes) == 1:
        return Pending(None, lambda: grad)
    start = sum(sizes[:rank])
    if len(set(sizes)) == 1 and _backend(group) == "nccl":
        out = grad.new_empty((sizes[rank], *grad.shape[1:]))
        work = dist.reduce_scatter_tensor(out, grad, group=group, async_op=True)
        return Pending(work, lambda: out)
    # gloo has no reduce-scatter: an all-reduce moves world_size times the bytes but is exact.
    total = grad.clone()
    work = dist.all_reduce(total, group=group, async_op=True)
    return Pending(work, lambda: total[start : start + sizes[rank]])


def _gather_rows(local: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    return start_gather_rows(local, sizes, group).wait()


def _sum_own_rows(grad: torch.Tensor, sizes: Sequence[int], rank: int, group) -> torch.Tensor:
    return start_sum_own_rows(grad, sizes, rank, group).wait()


class _AllGatherFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: tuple[int, ...], group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = group_rank(group)
        return _gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad_global: torch.Tensor):
        return _sum_own_rows(grad_global, ctx.sizes, ctx.rank, ctx.group), None, None


def all_gather_features(
    local: torch.Tensor, group: dist.ProcessGroup | None = None, *, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Gather per-rank features (b_r x D) into the global batch (sum b_r x D), in rank order.

    Backward is a reduce-scatter: each rank receives the sum over ranks of the gradient
    rows of its own samples. Per-rank batches may differ in size; pass ``sizes`` when they
    are known to skip the all-gather of row counts.
    """
    if local.dim() != 2:
        raise ValueError(f"all_gather_features expects a 2-D (batch x dim) tensor, got shape {tuple(local.shape)}")
    if group_world_size(group) == 1:
        return local
    if sizes is None:
        sizes = gather_row_counts(local.shape[0], local.shape[1], local.device, group)
    elif sizes[group_rank(group)] != local.shape[0]:
        raise ValueError(
            f"sizes[{group_rank(group)}] = {sizes[group_rank(group)]} but this rank holds {local.shape[0]} rows"
        )
    return _AllGatherFeatures.apply(local, tuple(int(s) for s in sizes), group)


def all_gather_labels(
    local: torch.Tensor, group: dist.ProcessGroup | None = None, *, sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """Gather per-rank labels (b_r,) into the global labels, in rank order. No gradient."""
    if local.dim() != 1:
        raise ValueError(f"all_gather_labels expects a 1-D tensor, got shape {tuple(local.shape)}")
    if group_world_size(group) == 1:
        return local
    if sizes is None:
        sizes = gather_row_counts(local.shape[0], 1, local.device, group)
    with torch.no_grad():
        return _gather_rows(local.detach(), sizes, group)


def all_reduce_sums(sums: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Scalar sums (one dtype, e.g. metric sums in float64) added over the ranks of ``group``
    in one all-reduce of all of them."""
    names = list(sums)
    values = torch.stack([sums[name] for name in names])
    dist.all_reduce(values, group=group)
    return dict(zip(names, values.tolist()))


@torch.no_grad()
def average_buffers(module: torch.nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Replace every floating-point buffer of ``module`` by its mean over the group's ranks.

    One all-reduce per dtype (buffers flattened together); integer buffers such as
    BatchNorm's batch counter are left alone. Returns the number of buffers averaged.
    """
    world = group_world_size(group)
    if world == 1:
        return 0
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        if buf.is_floating_point():
            by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat, group=group)  # SUM: gloo has no AVG
        flat /= world
        for buf, part in zip(bufs, flat.split([b.numel() for b in bufs])):
            buf.copy_(part.view_as(buf))
    return sum(len(bufs) for bufs in by_dtype.values())
