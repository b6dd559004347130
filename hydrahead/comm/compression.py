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
              feedback, nothing is lost). Tensors below ``min_numel`` entries, and those
              named dense, go dense. The entries are chosen exactly (torch.topk) or by a
              sampled threshold (hydrahead.comm.topk_select); ``TopK`` lists Deep Gradient
              Compression's local steps (momentum correction, masking, local clipping).

``TopK.pack`` builds one worker's message and ``unpack`` sums the workers' messages; the
hook runs them around an all-gather, and hydrahead.comm.simulated runs them for W workers
inside one process.

Byte counters record the payload each rank hands to its collectives per step (the tensor
bytes passed in, not the transport's wire bytes, which depend on the algorithm).
"""

from __future__ import annotations

import collections
import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hydrahead.comm.topk_select import (
    SAMPLE_STREAM,
    SELECTIONS,
    SamplePlan,
    SamplePlanTensors,
    exact_topk,
    num_selected,
    sampled_topk,
)
from hydrahead.counter_rng import counter_hash

COMPRESSIONS = ("none", "bf16", "powersgd", "topk")
WARMUP_START_DENSITY = 0.25


def topk_density(step: int, target: float, warmup_steps: int, start: float = WARMUP_START_DENSITY) -> float:
    """The density of step ``step`` (1-based): max(target, a warm-up falling exponentially
    from ``start`` (25%) at the first step to the target at ``warmup_steps``). A target at
    or above the start never warms up."""
    if target >= start or warmup_steps <= 0:
        return min(target, 1.0)
    progress = min(max(step - 1, 0) / warmup_steps, 1.0)
    return max(target, start * (target / start) ** progress)


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
    """Layer-wise top-k with error feedback for one worker, as a DDP communication hook (``hook``).

    ``names``: parameter -> name (residuals are keyed by name, for checkpoints). Residuals
    computed during a step become current only at ``commit()``; ``discard()`` drops them
    (a skipped step sends nothing that counts, so its residuals must not advance).

    A tensor goes sparse unless it has fewer than ``min_numel`` entries or its name is in
    ``dense``. Deep Gradient Compression's local steps, each switchable:

    - ``local_clip`` c > 0: tensor j of this worker's gradient is scaled down to at most
      c * sqrt(n_j / n) / sqrt(W) (n: all backbone entries, W: workers), its share of
      an L2 bound of c / sqrt(W) on the whole, before it enters the residual;
    - ``momentum_correction``: the optimizer's momentum (``momentum``) and weight decay
      (``weight_decay``, name -> factor) move into the exchange: each worker keeps a
      velocity u = m u + g + wd w / W of every tensor; a dense tensor sends u, a sparse one
      adds u to its residual and sends the top of that. Summed over the workers this is
      exactly SGD with momentum and weight decay when every entry is sent unmasked;
    - ``momentum_masking``: with momentum correction, the sent entries of u are cleared
      too (without it, a sent entry's momentum keeps pushing it).

    ``select``: ``exact`` (torch.topk per tensor) or ``sampled`` (a threshold estimated
    from ``sample_share`` of each tensor; hydrahead.comm.topk_select). ``worker`` and
    ``seed`` key the sample positions.
    """

    names: dict
    density: float = 0.001
    warmup_steps: int = 1000
    warmup_start: float = WARMUP_START_DENSITY
    min_numel: int = 4096
    dense: frozenset = frozenset()
    select: str = "exact"
    sample_share: float = 0.01
    momentum_correction: bool = False
    momentum: float = 0.9
    momentum_masking: bool = True
    weight_decay: dict = field(default_factory=dict)
    local_clip: float = 0.0
    worker: int = 0
    seed: int = 0
    counters: CommCounters = field(default_factory=CommCounters)
    step: int = 1
    residuals: dict = field(default_factory=dict)  # name -> flat fp32 residual (velocity with momentum correction)
    velocities: dict = field(default_factory=dict)  # name -> flat fp32 momentum (momentum correction only)
    _pending: dict = field(default_factory=dict)
    _plans: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise ValueError(f"top-k select must be one of {SELECTIONS}, got {self.select!r}")
        self._keys = {param: i for i, param in enumerate(self.names)}  # stable per-tensor keys of the samples
        self._total_numel = sum(param.numel() for param in self.names)

    def is_sparse(self, param) -> bool:
        return param.numel() >= self.min_numel and self.names[param] not in self.dense

    def state_dict(self) -> dict:
        """Residuals (and velocities) this worker holds, zeros where none exists yet."""
        out = {}
        for param, name in self.names.items():
            zeros = lambda: torch.zeros(param.numel(), device=param.device)  # noqa: E731
            if self.is_sparse(param):
                out[name] = self.residuals.get(name, zeros())
            if self.momentum_correction:
                out[f"velocity/{name}"] = self.velocities.get(name, zeros())
        return out

    def empty_state_dict(self) -> dict:
        return {name: torch.empty_like(t) for name, t in self.state_dict().items()}

    def load_summed(self, states: list[dict]) -> None:
        """Residuals = the sum of ``states`` (one per saved worker; none: zeros)."""
        self.residuals, self.velocities = {}, {}
        for state in states:
            for key, value in state.items():
                target = self.velocities if key.startswith("velocity/") else self.residuals
                name = key.removeprefix("velocity/")
                target[name] = value.clone() if name not in target else target[name] + value

    def current_density(self) -> float:
        return topk_density(self.step, self.density, self.warmup_steps, self.warmup_start)

    def commit(self) -> None:
        for name, (residual, velocity) in self._pending.items():
            if residual is not None:
                self.residuals[name] = residual
            if velocity is not None:
                self.velocities[name] = velocity
        self._pending.clear()

    def discard(self) -> None:
        self._pending.clear()

    def _local_gradients(self, params, grads, world_size: int) -> list[torch.Tensor]:
        """This worker's flat fp32 gradients after local clipping and momentum correction
        (the velocities u, recorded as pending)."""
        flats = [grad.detach().reshape(-1).float() for grad in grads]
        if self.local_clip > 0:
            norms = torch._foreach_norm(flats)
            for i, (param, norm) in enumerate(zip(params, norms)):
                bound = self.local_clip * math.sqrt(param.numel() / self._total_numel / world_size)
                flats[i] = flats[i] * (bound / (norm + 1e-6)).clamp(max=1.0)
        if not self.momentum_correction:
            return flats
        # Multi-tensor ops (a few launches per bucket, not a few per tensor: the pack is bound
        # by the host's launches, docs/comm.md).
        names = [self.names[param] for param in params]
        by_decay = collections.defaultdict(list)
        for i, name in enumerate(names):
            if self.weight_decay.get(name, 0.0):
                by_decay[self.weight_decay[name]].append(i)
        for decay, idx in by_decay.items():
            weights = [params[i].detach().reshape(-1).float() for i in idx]
            decayed = torch._foreach_add([flats[i] for i in idx], weights, alpha=decay / world_size)
            for i, flat in zip(idx, decayed):
                flats[i] = flat
        velocities = [self.velocities.get(name) for name in names]
        moving = [i for i, velocity in enumerate(velocities) if velocity is not None]
        if moving:
            updated = torch._foreach_mul([velocities[i] for i in moving], self.momentum)
            torch._foreach_add_(updated, [flats[i] for i in moving])
            for i, velocity in zip(moving, updated):
                velocities[i] = velocity
        out = []
        for name, flat, velocity in zip(names, flats, velocities):
            velocity = flat.clone() if velocity is None else velocity  # the first step's u = g
            self._pending[name] = (None, velocity)
            out.append(velocity)
        return out

    def _select_exact(self, names, accs, density):
        """(indices, values) per tensor; the sent entries of each acc (and velocity) cleared."""
        indices, values = [], []
        for name, acc in zip(names, accs):
            index = exact_topk(acc, num_selected(acc.numel(), density))
            indices.append(index)
            values.append(acc[index])
            # index_fill_, not acc[index] = 0.0: assigning a Python scalar copies it to the
            # device and waits for that copy (a host sync per tensor)
            acc.index_fill_(0, index, 0.0)
            velocity = self._pending.get(name, (None, None))[1]
            if velocity is not None and self.momentum_masking:
                velocity.index_fill_(0, index, 0.0)
            self._pending[name] = (acc, velocity)
        return indices, values

    def _select_sampled(self, params, names, grads, residuals, density, offsets):
        """(wire indices into the bucket, values) of all tensors at once; sent entries cleared."""
        sizes, device = tuple(g.numel() for g in grads), grads[0].device
        keys = [self._keys[param] for param in params]
        plan_key = (tuple(keys), tuple(offsets), density, self.sample_share, device)
        plan = self._plans.get(plan_key)
        if plan is None:
            if len(self._plans) > 64:  # the warm-up makes a plan per step; keep the cache small
                self._plans.clear()
            tensors = SamplePlanTensors(SamplePlan.make(sizes, density, self.sample_share), keys, device)
            starts = torch.cumsum(torch.tensor(sizes), 0) - torch.tensor(sizes)
            shift = (torch.tensor(offsets) - starts).to(device)  # place in the bucket - place among the accs
            plan = self._plans[plan_key] = (tensors, shift)
        tensors, shift = plan
        # The accs end to end, written in place (no copy to concatenate them); the extra last
        # entry stays 0: an empty slot points at it, so it sends 0 and clears nothing.
        flat = grads[0].new_empty(sum(sizes) + 1)
        flat[-1:].zero_()  # a slice: flat[-1] = 0.0 would wait for the host
        accs = flat[:-1].split(sizes)
        torch._foreach_copy_(accs, grads)
        owed = [i for i, residual in enumerate(residuals) if residual is not None]
        if owed:
            torch._foreach_add_([accs[i] for i in owed], [residuals[i] for i in owed])
        seed = int(counter_hash(self.seed, SAMPLE_STREAM, torch.tensor([(self.worker << 32) + self.step])))
        chosen = sampled_topk(flat[:-1], tensors, seed)
        values = flat[chosen]
        flat.index_fill_(0, chosen, 0.0)
        velocities = [self._pending.get(name, (None, None))[1] for name in names]
        if self.momentum_correction and self.momentum_masking:
            flat_velocity = torch.cat([*velocities, flat[-1:]])
            flat_velocity.index_fill_(0, chosen, 0.0)
            velocities = list(flat_velocity[:-1].split(sizes))
        for name, acc, velocity in zip(names, accs, velocities):
            self._pending[name] = (acc, velocity)
        # Wire index: the entry's place in the bucket; an empty slot points at its tensor's first entry.
        seg = tensors.pick_seg
        local = torch.where(chosen < tensors.numel, chosen, tensors.starts[seg])
        return [local + shift[seg]], [values]

    def pack(self, buffer: torch.Tensor, params: list, grads: list, world_size: int):
        """This worker's message for one bucket, and what ``unpack`` needs to read it.

        The message: the dense tensors' fp32 values, then the int32 indices (into the
        bucket) and the fp32 values' bits of the sparse ones.
        """
        density = self.current_density()
        offsets = [(grad.data_ptr() - buffer.data_ptr()) // buffer.element_size() for grad in grads]
        flats = self._local_gradients(params, grads, world_size)
        dense_parts, dense_values, sparse = [], [], []
        for param, grad, offset, flat in zip(params, grads, offsets, flats):
            if not self.is_sparse(param) or density >= 1.0:
                dense_parts.append((offset, grad.numel()))
                dense_values.append(flat)
            else:
                sparse.append((param, offset, flat))
        index_parts, value_parts = [], []
        if sparse:
            names = [self.names[param] for param, _, _ in sparse]
            residuals = [self.residuals.get(name) for name in names]
            if self.select == "exact":
                flats = [flat for _, _, flat in sparse]
                owed = [i for i, r in enumerate(residuals) if r is not None]
                summed = torch._foreach_add([residuals[i] for i in owed], [flats[i] for i in owed]) if owed else []
                owing = dict(zip(owed, summed))  # residual + gradient, where a residual exists
                accs = [owing[i] if i in owing else flat.clone() for i, flat in enumerate(flats)]
                index_parts, value_parts = self._select_exact(names, accs, density)
                index_parts = [index + offset for index, (_, offset, _) in zip(index_parts, sparse)]
            else:
                sparse_params, sparse_offsets, sparse_flats = zip(*sparse)
                index_parts, value_parts = self._select_sampled(
                    sparse_params, names, sparse_flats, residuals, density, sparse_offsets
                )
        device = buffer.device
        dense = torch.cat(dense_values) if dense_values else torch.empty(0, dtype=torch.float32, device=device)
        index = (
            torch.cat(index_parts).to(torch.int32) if index_parts else torch.empty(0, dtype=torch.int32, device=device)
        )
        value = torch.cat(value_parts) if value_parts else torch.empty(0, dtype=torch.float32, device=device)
        payload = torch.cat([dense.view(torch.int32), index, value.view(torch.int32)])
        self.counters.backbone_allreduce += payload.numel() * payload.element_size()
        return payload, (dense_parts, dense.numel(), index.numel())

    def hook(self, group, bucket):
        buffer = bucket.buffer()
        world_size = dist.get_world_size(group)
        payload, layout = self.pack(buffer, bucket.parameters(), bucket.gradients(), world_size)
        # One message per rank, one all-gather per bucket (a single future: its callback sees
        # the result on the right CUDA stream). The dense part is summed after the gather; it
        # holds only small tensors unless topk_dense names large ones.
        gathered = payload.new_empty(world_size * payload.numel())
        work = dist.all_gather_into_tensor(gathered, payload, group=group, async_op=True)
        return work.get_future().then(lambda _: unpack(gathered.view(world_size, -1), layout, buffer))


def unpack(per_rank: torch.Tensor, layout, like: torch.Tensor) -> torch.Tensor:
    """The bucket summed over the workers' messages (rows of ``per_rank``, in rank order)."""
    dense_parts, num_dense, num_sparse = layout
    out = torch.zeros_like(like)
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


def powersgd_bytes(shape, rank: int, compressing: bool = True) -> int:
    """fp32 bytes PowerSGD sends for one tensor: (n + m) * rank for a matrix n x m (a weight
    viewed as its first dim by the rest) when that is at most half of it, else all of it."""
    numel = math.prod(shape)
    n, m = (shape[0], numel // shape[0]) if len(shape) > 1 else (numel, 1)
    small = (n + m) * rank * 2 <= n * m
    return ((n + m) * rank if compressing and small else numel) * 4


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
        counters.backbone_allreduce += sum(powersgd_bytes(grad.shape, rank, compressing) for grad in bucket.gradients())
        return powersgd.powerSGD_hook(state, bucket).then(_times_world_size(dist.get_world_size(group)))

    return hook, state


def dense_names(names, patterns) -> frozenset:
    """Names matching any of the glob ``patterns`` (comm.topk_dense): always sent dense."""
    return frozenset(name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))


def make_topk(
    comm_cfg,
    names: dict,
    counters: CommCounters,
    *,
    momentum: float = 0.9,
    weight_decay=None,
    seed: int = 0,
    worker: int = 0,
) -> TopK:
    """The top-k state of worker ``worker`` as ``comm_cfg`` (comm.topk_*) configures it.
    ``momentum`` and ``weight_decay`` (parameter name -> decay) are the optimizer's, which
    momentum correction moves into the exchange."""
    return TopK(
        names,
        density=comm_cfg.topk_density,
        warmup_steps=comm_cfg.topk_warmup_steps,
        warmup_start=comm_cfg.topk_warmup_start,
        min_numel=comm_cfg.topk_min_numel,
        dense=dense_names(names.values(), comm_cfg.topk_dense),
        select=comm_cfg.topk_select,
        sample_share=comm_cfg.topk_sample_share,
        # null is the trainer's to resolve (config.topk_momentum_correction); unresolved it is off
        momentum_correction=bool(comm_cfg.topk_momentum_correction),
        momentum=momentum,
        momentum_masking=comm_cfg.topk_momentum_masking,
        weight_decay=dict(weight_decay or {}),
        local_clip=comm_cfg.topk_local_clip,
        worker=worker,
        seed=seed,
        counters=counters,
    )


def register(
    ddp_model, group, comm_cfg, names: dict, wrap=None, *, momentum: float = 0.9, weight_decay=None, seed: int = 0
) -> tuple[CommCounters, TopK | None]:
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
        worker = dist.get_rank(group)
        topk = make_topk(
            comm_cfg, names, counters, momentum=momentum, weight_decay=weight_decay, seed=seed, worker=worker
        )
        ddp_model.register_comm_hook(group, wrap(topk.hook))
    return counters, topk


__all__ = [
    "COMPRESSIONS",
    "CommCounters",
    "TopK",
    "dense_names",
    "make_topk",
    "powersgd_bytes",
    "register",
    "topk_density",
    "unpack",
]
