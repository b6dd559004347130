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
import itertools
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
from hydrahead.counter_rng import counter_hash_int

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


class _Bucket:
    """One bucket of one worker: its tensors as segments of the flat buffer, and the
    worker's state over it.

    Residuals and velocities are flat fp32 tensors over the whole bucket plus a spare last
    entry that stays 0 (an empty slot of the sampled selection points at it): two of each,
    the committed state (``current``) and the one a pack writes, swapped at ``commit``. The
    name-keyed ``TopK.residuals`` and ``velocities`` hold views of the committed ones;
    where those dicts were changed from outside (a resume, another bucket layout) ``load``
    copies them in first.
    """

    def __init__(self, topk: TopK, params: list, layouts: list, keys: tuple, offsets: list, numel: int, device):
        self.names = [topk.names[param] for param in params]
        self.sizes = [param.numel() for param in params]
        self.offsets = list(offsets)
        self.layouts = layouts  # (shape, strides) of each gradient in the buffer
        self.numel, self.device, self.keys = numel, device, keys
        self.sparse = [topk.is_sparse(param) for param in params]
        self._sparse_ids = [i for i, sparse in enumerate(self.sparse) if sparse]
        self._dense_ids = [i for i, sparse in enumerate(self.sparse) if not sparse]
        self.residual = [torch.zeros(numel + 1, device=device) for _ in range(2)]
        self.velocity = [torch.zeros(numel + 1, device=device) for _ in range(2)] if topk.momentum_correction else []
        self.current = 0
        by_decay = collections.defaultdict(list)
        for i, name in enumerate(self.names):
            if topk.weight_decay.get(name, 0.0):
                by_decay[topk.weight_decay[name]].append(i)
        self.decay_groups = list(by_decay.items())
        self._scratch = None
        self._views = {}  # (data_ptr of a state tensor, shaped) -> its per-tensor views
        self._entries = {}
        self._plans = {}
        self._loaded = None  # what the dicts held when this bucket last matched them

    def split(self, selecting: bool) -> tuple[list[int], list[int]]:
        """(sparse, dense) tensor positions: all dense when nothing is selected (density >= 1)."""
        if not selecting:
            return [], list(range(len(self.sizes)))
        return self._sparse_ids, self._dense_ids

    def views(self, flat: torch.Tensor, shaped: bool = False) -> list[torch.Tensor]:
        """Per-tensor views of a flat tensor over the bucket: 1-D, or with ``shaped`` laid out
        as the gradients are in the buffer, so that they pair entry for entry with the
        parameters whatever their memory format (cached for the state tensors)."""
        key = (flat.data_ptr(), shaped)
        cached = self._views.get(key)
        if cached is not None and cached[0] is flat:
            return cached[1]
        if shaped:
            base = flat.storage_offset()
            views = [flat.as_strided(shape, stride, base + o) for o, (shape, stride) in zip(self.offsets, self.layouts)]
        else:
            views = [flat[o : o + n] for o, n in zip(self.offsets, self.sizes)]
        if any(flat is state for state in (*self.residual, *self.velocity, self._scratch)):
            self._views[key] = (flat, views)
        return views

    def scratch(self, gradient: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of the bucket's gradient in a buffer kept from step to step."""
        if self._scratch is None:
            self._scratch = torch.empty(self.numel, device=self.device)
        return self._scratch.copy_(gradient)

    def entries(self, tensors: list[int], gaps: bool = False) -> torch.Tensor:
        """Indices of the entries of ``tensors`` (in that order), and with ``gaps`` of the
        bucket's entries that belong to no tensor."""
        key = (tuple(tensors), gaps)
        index = self._entries.get(key)
        if index is None:
            parts = [torch.arange(self.offsets[i], self.offsets[i] + self.sizes[i]) for i in tensors]
            if gaps:
                covered = torch.zeros(self.numel, dtype=torch.bool)
                for o, n in zip(self.offsets, self.sizes):
                    covered[o : o + n] = True
                parts.append(torch.nonzero(~covered).flatten())
            index = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
            index = self._entries[key] = index.to(self.device)
        return index

    def plan(self, density: float, sample_share: float, sparse: list[int]) -> SamplePlanTensors:
        """The sampled selection over the bucket's segments in place order: its tensors, and
        the gaps between them, which (like dense tensors) send nothing through it."""
        key = (density, sample_share, tuple(sparse))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64:  # the warm-up makes a plan per step; keep the cache small
                self._plans.clear()
            sizes, sent, keys, end, chosen = [], [], [], 0, set(sparse)
            for i in sorted(range(len(self.sizes)), key=lambda i: self.offsets[i]):
                if self.offsets[i] > end:
                    sizes.append(self.offsets[i] - end), sent.append(False), keys.append(-1)
                sizes.append(self.sizes[i]), sent.append(i in chosen), keys.append(self.keys[i])
                end = self.offsets[i] + self.sizes[i]
            if end < self.numel:
                sizes.append(self.numel - end), sent.append(False), keys.append(-1)
            spec = SamplePlan.make(sizes, density, sample_share, sent)
            plan = self._plans[key] = SamplePlanTensors(spec, keys, self.device)
        return plan

    def _held(self, topk: TopK) -> tuple:
        return tuple(topk.residuals.get(name) for name in self.names) + tuple(
            topk.velocities.get(name) for name in self.names
        )

    def load(self, topk: TopK) -> None:
        """Take the state from ``topk``'s dicts unless they hold what this bucket last left there."""
        held = self._held(topk)
        if self._loaded is not None and all(a is b for a, b in zip(held, self._loaded)):
            return
        for state, source in ((self.residual, topk.residuals), (self.velocity, topk.velocities)):
            if not state:
                continue
            state[self.current].zero_()
            views = self.views(state[self.current], shaped=True)
            pairs = [(view, source[name]) for name, view in zip(self.names, views) if name in source]
            if pairs:  # entry by entry of the parameter, whatever either side's memory order
                torch._foreach_copy_([view for view, _ in pairs], [value.reshape(view.shape) for view, value in pairs])
        self._loaded = held

    def commit(self, topk: TopK) -> None:
        """The state the last pack wrote becomes the committed one."""
        self.current = 1 - self.current
        residuals = self.views(self.residual[self.current], shaped=True)
        for name, sparse, view in zip(self.names, self.sparse, residuals):
            if sparse:
                topk.residuals[name] = view
        if self.velocity:
            for name, view in zip(self.names, self.views(self.velocity[self.current], shaped=True)):
                topk.velocities[name] = view
        self._loaded = self._held(topk)


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
    # name -> fp32 residual (velocity u with momentum correction), the parameter's shape:
    # views into its bucket after a step, flat in logical order after load_summed
    residuals: dict = field(default_factory=dict)
    velocities: dict = field(default_factory=dict)  # name -> fp32 momentum (momentum correction only), likewise
    _pending: list = field(default_factory=list)  # buckets packed since the last commit or discard
    _buckets: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise ValueError(f"top-k select must be one of {SELECTIONS}, got {self.select!r}")
        self._keys = {param: i for i, param in enumerate(self.names)}  # stable per-tensor keys of the samples
        self._total_numel = sum(param.numel() for param in self.names)

    def is_sparse(self, param) -> bool:
        return param.numel() >= self.min_numel and self.names[param] not in self.dense

    def state_dict(self) -> dict:
        """Residuals (and velocities) this worker holds, zeros where none exists yet: flat,
        in the parameter's logical order (a bucket holds them in the gradients' memory
        order, which a simulated worker's buffer and a DDP bucket lay differently)."""
        out = {}
        for param, name in self.names.items():
            zeros = lambda: torch.zeros(param.numel(), device=param.device)  # noqa: E731
            if self.is_sparse(param):
                out[name] = self.residuals.get(name, zeros()).reshape(-1)
            if self.momentum_correction:
                out[f"velocity/{name}"] = self.velocities.get(name, zeros()).reshape(-1)
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
        for bucket in self._pending:
            bucket.commit(self)
        self._pending.clear()

    def discard(self) -> None:
        self._pending.clear()

    def _bucket(self, buffer: torch.Tensor, params: list, grads: list | None, offsets: list) -> _Bucket:
        keys = tuple(self._keys[param] for param in params)
        key = (keys, tuple(offsets), buffer.numel(), buffer.device)
        bucket = self._buckets.get(key)
        if bucket is None:
            # DDP rebuilds its buckets after the first step: a tensor lives in one bucket at a
            # time, so a new bucket replaces every old one it shares a tensor with.
            self._buckets = {k: b for k, b in self._buckets.items() if not set(k[0]) & set(keys)}
            if grads is None:
                held = offsets[-1] + params[-1].numel()
                if held != buffer.numel():
                    raise RuntimeError(
                        f"a DDP bucket of {buffer.numel()} entries holds parameters of {held}: its gradients"
                        " are not laid back to back, so pass their views"
                    )
                layouts = [ddp_gradient_layout(param) for param in params]
            else:
                layouts = [(grad.shape, grad.stride()) for grad in grads]
            bucket = self._buckets[key] = _Bucket(self, params, layouts, keys, offsets, buffer.numel(), buffer.device)
        return bucket

    def _local_gradient(self, bucket: _Bucket, buffer: torch.Tensor, params: list, world_size: int) -> torch.Tensor:
        """This worker's flat fp32 gradient over the bucket after local clipping, and with
        momentum correction the new velocities u (written to the bucket's pending state)."""
        flat = buffer.reshape(-1)
        if self.local_clip > 0:
            flat = bucket.scratch(flat)  # a copy we may change, with views kept from step to step
        elif flat.dtype != torch.float32:
            flat = flat.float()
        if self.local_clip > 0:
            views = bucket.views(flat)
            norms = torch._foreach_norm(views)
            for param, view, norm in zip(params, views, norms):
                bound = self.local_clip * math.sqrt(param.numel() / self._total_numel / world_size)
                view.mul_((bound / (norm + 1e-6)).clamp(max=1.0))
        if not self.momentum_correction:
            return flat
        # u = m u + g + wd w / W, written straight into the pending velocity: one pass for the
        # momentum, one multi-tensor pass for the decay, no copy of g (the first step's u = g:
        # u starts at 0; the spare last entry stays 0)
        velocity, pending = bucket.velocity[bucket.current], bucket.velocity[1 - bucket.current]
        torch.add(flat, velocity[:-1], alpha=self.momentum, out=pending[:-1])
        if bucket.decay_groups:
            views = bucket.views(pending, shaped=True)  # beside the parameters, no copy of them
            # The parameters themselves under no_grad: a detached alias of each costs more host
            # time (about 1 us a tensor) than the decay's one multi-tensor launch.
            with torch.no_grad():
                for decay, idx in bucket.decay_groups:
                    torch._foreach_add_([views[i] for i in idx], [params[i] for i in idx], alpha=decay / world_size)
        return pending[:-1]

    def pack(self, buffer: torch.Tensor, params: list, grads: list | None, world_size: int):
        """This worker's message for one bucket, and what ``unpack`` needs to read it.

        ``grads``: views of ``buffer`` as the parameters' gradients, or None for a DDP
        bucket, which lays them back to back in parameter order, each as
        ``ddp_gradient_layout`` says (``GradBucket.gradients()`` would make a view of each
        on every step: milliseconds of host time for ResNet-50's 162 tensors).

        The message: the dense tensors' fp32 values, then the int32 indices (into the
        bucket) and the fp32 values' bits of the sparse ones.

        The bucket's residuals (and velocities) are kept as flat tensors over the whole
        bucket, so the work is a fixed number of whole-bucket operations rather than a few
        per tensor: the pack is bound by the host's launches (docs/comm.md).
        """
        density = self.current_density()
        if grads is None:
            offsets = list(itertools.accumulate((param.numel() for param in params), initial=0))[:-1]
        else:
            offsets = [(grad.data_ptr() - buffer.data_ptr()) // buffer.element_size() for grad in grads]
        bucket = self._bucket(buffer, params, grads, offsets)
        bucket.load(self)
        gradient = self._local_gradient(bucket, buffer, params, world_size)
        residual, acc = bucket.residual[bucket.current], bucket.residual[1 - bucket.current]
        torch.add(residual[:-1], gradient, out=acc[:-1])  # the spare last entry stays 0
        velocity = bucket.velocity[1 - bucket.current] if self.momentum_correction and self.momentum_masking else None
        sparse, dense = bucket.split(density < 1.0)
        device = buffer.device
        index_dense = bucket.entries(dense)
        values_dense = acc.index_select(0, index_dense)
        acc.index_fill_(0, bucket.entries(dense, gaps=True), 0.0)  # nothing owed where all is sent
        if not sparse:
            index = torch.empty(0, dtype=torch.int32, device=device)
            value = torch.empty(0, dtype=torch.float32, device=device)
        elif self.select == "exact":
            index_parts, value_parts = [], []
            accs = bucket.views(acc)
            velocities = bucket.views(velocity) if velocity is not None else None
            for i in sparse:
                chosen = exact_topk(accs[i], num_selected(accs[i].numel(), density))
                value_parts.append(accs[i][chosen])
                # index_fill_, not acc[index] = 0.0: assigning a Python scalar copies it to the
                # device and waits for that copy (a host sync per tensor)
                accs[i].index_fill_(0, chosen, 0.0)
                if velocities is not None:
                    velocities[i].index_fill_(0, chosen, 0.0)
                index_parts.append(chosen + offsets[i])
            index, value = torch.cat(index_parts).to(torch.int32), torch.cat(value_parts)
        else:
            plan = bucket.plan(density, self.sample_share, sparse)
            seed = counter_hash_int(self.seed, SAMPLE_STREAM, (self.worker << 32) + self.step)
            chosen = sampled_topk(acc[:-1], plan, seed)  # an empty slot holds the spare entry's index
            value = acc.index_select(0, chosen)
            acc.index_fill_(0, chosen, 0.0)
            if velocity is not None:
                velocity.index_fill_(0, chosen, 0.0)
            # Wire index: the entry's place in the bucket; an empty slot points at its tensor's first entry.
            index = torch.where(chosen < plan.numel, chosen, plan.pick_start).to(torch.int32)
        if bucket not in self._pending:  # packed again before the commit: the last pack counts
            self._pending.append(bucket)
        dense_parts = [(offsets[i], params[i].numel()) for i in dense]
        payload = torch.cat([values_dense.view(torch.int32), index, value.view(torch.int32)])
        self.counters.backbone_allreduce += payload.numel() * payload.element_size()
        return payload, (dense_parts, values_dense.numel(), index.numel())

    def hook(self, group, bucket):
        buffer = bucket.buffer()
        world_size = dist.get_world_size(group)
        payload, layout = self.pack(buffer, bucket.parameters(), None, world_size)
        # One message per rank, one all-gather per bucket (a single future: its callback sees
        # the result on the right CUDA stream). The dense part is summed after the gather; it
        # holds only small tensors unless topk_dense names large ones.
        gathered = payload.new_empty(world_size * payload.numel())
        work = dist.all_gather_into_tensor(gathered, payload, group=group, async_op=True)
        return work.get_future().then(lambda _: unpack(gathered.view(world_size, -1), layout, buffer))


def ddp_gradient_layout(param: torch.Tensor) -> tuple:
    """(shape, strides) of ``param``'s gradient in its DDP bucket: the parameter's own
    strides where it is dense without overlap (DDP's layout contract: a channels-last
    convolution's gradient lies channels-last), else contiguous. ``GradBucket.gradients()``
    returns contiguous views whatever the layout, so a channels-last gradient is not where
    they say."""
    shape, expected, contiguous = tuple(param.shape), 1, []
    for size in reversed(shape):
        contiguous.insert(0, expected)
        expected *= size
    expected = 1
    for dim in sorted((d for d in range(param.dim()) if shape[d] != 1), key=param.stride):
        if param.stride(dim) != expected:
            return shape, tuple(contiguous)
        expected *= shape[dim]
    return shape, param.stride()


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
    "ddp_gradient_layout",
    "dense_names",
    "make_topk",
    "powersgd_bytes",
    "register",
    "topk_density",
    "unpack",
]
