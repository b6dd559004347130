"""Backbone gradient exchange as DDP communication hooks, all with SUM semantics.

The trainer's backbone gradient is the *sum* over ranks of the per-rank gradients (the
feature gather's backward already hands each rank the global loss's gradient for its own
samples; hydrahead.train.trainer), so every hook here sums:

    none      all-reduce SUM of each bucket
    bf16      PyTorch's ``bf16_compress_hook`` (an average), times the world size
    powersgd  PyTorch's ``powerSGD_hook`` (rank-r factors, error feedback; an average),
              times the world size
    topk      written here: per parameter (layer-wise) the largest ``density`` share of
              |gradient + residual| is sent as (value, index) pairs, all-gathered and summed;
              what was not sent stays in a per-rank residual and joins the next step (error
              feedback, nothing is lost). Tensors below ``min_numel`` entries go dense.

Byte counters record the payload each rank hands to its collectives per step (the tensor
bytes passed in, not the transport's wire bytes, which depend on the algorithm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COMPRESSIONS = ("none", "bf16", "powersgd", "topk")
WARMUP_START_DENSITY = 0.25


def topk_density(step: int, target: float, warmup_steps: int) -> float:
    """The density of step ``step`` (1-based): max(target, a warm-up falling exponentially
    from 25% at the first step to the target at ``warmup_steps``). A target of 25% or more
    never warms up."""
    if target >= WARMUP_START_DENSITY or warmup_steps <= 0:
        return min(target, 1.0)
    progress = min(max(step - 1, 0) / warmup_steps, 1.0)
    return max(target, WARMUP_START_DENSITY * (target / WARMUP_START_DENSITY) ** progress)


@dataclass
class CommCounters:
    """Payload bytes handed to the backbone's collectives, since the last ``take()``."""

    backbone_allreduce: int = 0

    def take(self) -> dict:
        out = {"bytes_backbone_allreduce": self.backbone_allreduce}
        self.backbone_allreduce = 0
        return out


def _times_world_size(world_size: int):
    return lambda fut: fut.value().mul_(world_size)  # PyTorch's hooks resolve to the averaged bucket


@dataclass
class TopK:
    """Layer-wise top-k with error feedback, as a DDP communication hook (``hook``).

    ``names``: parameter -> name (residuals are keyed by name, for checkpoints). Residuals
    computed during a step become current only at ``commit()``; ``discard()`` drops them
    (a skipped step sends nothing that counts, so its residuals must not advance).
    """

    names: dict
    density: float = 0.001
    warmup_steps: int = 1000
    min_numel: int = 4096
    momentum_correction: bool = False
    momentum: float = 0.9
    counters: CommCounters = field(default_factory=CommCounters)
    step: int = 1
    residuals: dict = field(default_factory=dict)  # name -> flat fp32 residual (velocity with momentum correction)
    velocities: dict = field(default_factory=dict)  # name -> flat fp32 momentum (momentum correction only)
    _pending: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Residuals (and velocities) of every parameter that goes sparse, zeros where none exists yet."""
        out = {}
        for param, name in self.names.items():
            if param.numel() < self.min_numel:
                continue
            out[name] = self.residuals.get(name, torch.zeros(param.numel(), device=param.device))
            if self.momentum_correction:
                out[f"velocity/{name}"] = self.velocities.get(name, torch.zeros(param.numel(), device=param.device))
        return out

    def empty_state_dict(self) -> dict:
        return {name: torch.empty_like(t) for name, t in self.state_dict().items()}

    def load_summed(self, states: list[dict]) -> None:
        """Residuals = the sum of ``states`` (one per saved rank; none: zeros)."""
        self.residuals, self.velocities = {}, {}
        for state in states:
            for key, value in state.items():
                target = self.velocities if key.startswith("velocity/") else self.residuals
                name = key.removeprefix("velocity/")
                target[name] = value.clone() if name not in target else target[name] + value

    def current_density(self) -> float:
        return topk_density(self.step, self.density, self.warmup_steps)

    def commit(self) -> None:
        for name, (residual, velocity) in self._pending.items():
            self.residuals[name] = residual
            if velocity is not None:
                self.velocities[name] = velocity
        self._pending.clear()

    def discard(self) -> None:
        self._pending.clear()

    def _select(self, name: str, grad: torch.Tensor, density: float):
        """(indices, values) to send for one parameter, and the residual it leaves."""
        flat = grad.detach().reshape(-1).float()
        residual = self.residuals.get(name)
        velocity = None
        if self.momentum_correction:  # DGC: u = m u + g, v = v + u; send top-k of v; sent entries of u, v reset
            velocity = self.velocities.get(name)
            velocity = flat.clone() if velocity is None else velocity.mul(self.momentum).add_(flat)
            acc = velocity.clone() if residual is None else residual.add(velocity)
        else:
            acc = flat.clone() if residual is None else residual.add(flat)
        k = max(1, math.ceil(density * acc.numel()))
        indices = acc.abs().topk(k, sorted=False).indices
        values = acc[indices]
        acc[indices] = 0.0
        if velocity is not None:
            velocity[indices] = 0.0
        self._pending[name] = (acc, velocity)
        return indices, values

    def hook(self, group, bucket):
        buffer = bucket.buffer()
        density = self.current_density()
        dense_parts, sparse_index, sparse_value = [], [], []
        for param, grad in zip(bucket.parameters(), bucket.gradients()):
            offset = (grad.data_ptr() - buffer.data_ptr()) // buffer.element_size()
            if grad.numel() < self.min_numel or density >= 1.0:
                dense_parts.append((offset, grad.numel()))
                continue
            indices, values = self._select(self.names[param], grad, density)
            sparse_index.append(indices + offset)
            sparse_value.append(values)
        world_size = dist.get_world_size(group)
        # One message per rank, one all-gather per bucket (a single future: its callback sees
        # the result on the right CUDA stream): the dense tensors' fp32 values, then int32
        # indices and the fp32 values' bits of the sparse ones. The dense part is summed
        # after the gather; it holds only small tensors.
        dense = (
            torch.cat([buffer[o : o + n] for o, n in dense_parts]).float()
            if dense_parts
            else buffer.new_empty(0, dtype=torch.float32)
        )
        index = (
            torch.cat(sparse_index).to(torch.int32)
            if sparse_index
            else torch.empty(0, dtype=torch.int32, device=buffer.device)
        )
        value = torch.cat(sparse_value) if sparse_value else torch.empty(0, dtype=torch.float32, device=buffer.device)
        payload = torch.cat([dense.view(torch.int32), index, value.view(torch.int32)])
        gathered = payload.new_empty(world_size * payload.numel())
        work = dist.all_gather_into_tensor(gathered, payload, group=group, async_op=True)
        self.counters.backbone_allreduce += payload.numel() * payload.element_size()
        num_dense, num_sparse = dense.numel(), index.numel()

        def unpack(_):  # runs on a stream that waits for the gather
            per_rank = gathered.view(world_size, -1)
            out = torch.zeros_like(buffer)
            if num_dense:
                summed = per_rank[:, :num_dense].contiguous().view(torch.float32).sum(dim=0)
                start = 0
                for o, n in dense_parts:
                    out[o : o + n] = summed[start : start + n].to(out.dtype)
                    start += n
            if num_sparse:
                indices = per_rank[:, num_dense : num_dense + num_sparse].reshape(-1).long()
                values = per_rank[:, num_dense + num_sparse :].contiguous().view(torch.float32).reshape(-1)
                out.index_add_(0, indices, values.to(out.dtype))
            return out

        return work.get_future().then(unpack)


def sum_allreduce_hook(counters: CommCounters):
    """All-reduce SUM (DDP's default hook averages)."""

    def hook(group, bucket):
        tensor = bucket.buffer()
        counters.backbone_allreduce += tensor.numel() * tensor.element_size()
        work = dist.all_reduce(tensor, group=group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    return hook


def bf16_sum_hook(counters: CommCounters):
    """PyTorch's bf16 compression hook, turned from an average into a sum."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(group, bucket):
        counters.backbone_allreduce += bucket.buffer().numel() * 2
        return default_hooks.bf16_compress_hook(group, bucket).then(_times_world_size(dist.get_world_size(group)))

    return hook


def powersgd_sum_hook(group, counters: CommCounters, rank: int, start_step: int):
    """PyTorch's PowerSGD hook (error feedback, warm start), turned from an average into a sum.

    Bytes are estimated from the shapes: a matrix n x m (a weight viewed as its first dim
    by the rest) sends (n + m) * rank fp32 values when that is at most half its size,
    everything else goes dense, as the hook decides.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    state = powersgd.PowerSGDState(process_group=group, matrix_approximation_rank=rank, start_powerSGD_iter=start_step)

    def hook(group_, bucket):
        compressing = state.iter >= state.start_powerSGD_iter
        for grad in bucket.gradients():
            n, m = (grad.shape[0], grad.numel() // grad.shape[0]) if grad.dim() > 1 else (grad.numel(), 1)
            small = (n + m) * rank * 2 <= n * m
            counters.backbone_allreduce += ((n + m) * rank if compressing and small else grad.numel()) * 4
        return powersgd.powerSGD_hook(state, bucket).then(_times_world_size(dist.get_world_size(group)))

    return hook, state


def register(ddp_model, group, comm_cfg, names: dict, wrap=None) -> tuple[CommCounters, TopK | None]:
    """Register the configured hook on ``ddp_model`` (through ``wrap``, e.g. a timer, when
    given); return its counters and the top-k state (if topk)."""
    counters = CommCounters()
    wrap = wrap or (lambda hook: hook)
    kind = comm_cfg.grad_compression
    if kind not in COMPRESSIONS:
        raise ValueError(f"comm.grad_compression must be one of {COMPRESSIONS}, got {kind!r}")
    topk = None
    if kind == "none":
        ddp_model.register_comm_hook(group, wrap(sum_allreduce_hook(counters)))
    elif kind == "bf16":
        ddp_model.register_comm_hook(group, wrap(bf16_sum_hook(counters)))
    elif kind == "powersgd":
        hook, _ = powersgd_sum_hook(group, counters, comm_cfg.powersgd_rank, comm_cfg.powersgd_start_step)
        ddp_model.register_comm_hook(group, wrap(hook))
    else:
        topk = TopK(
            names,
            density=comm_cfg.topk_density,
            warmup_steps=comm_cfg.topk_warmup_steps,
            min_numel=comm_cfg.topk_min_numel,
            momentum_correction=comm_cfg.topk_momentum_correction,
            counters=counters,
        )
        ddp_model.register_comm_hook(group, wrap(topk.hook))
    return counters, topk


__all__ = ["COMPRESSIONS", "CommCounters", "TopK", "register", "topk_density"]
