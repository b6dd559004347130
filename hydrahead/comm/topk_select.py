"""Which entries of each gradient tensor top-k sends: pure selection math, no collectives.

Two ways, both keeping k_j = ceil(density * n_j) entries of tensor j (so a message has a
size known in advance):

    exact     ``torch.topk`` of |acc| per tensor: one sort-like pass per tensor, one
              launch sequence per tensor.
    sampled   Deep Gradient Compression's estimate, for all tensors of a bucket at once:
              read s_j entries of tensor j (a quasi-random spread of ``sample_share`` of
              it, at least MIN_SAMPLE_RANK / density), take the r_j-th largest |sample| as
              its threshold (r_j = ceil(OVERSAMPLE * k_j * s_j / n_j): about OVERSAMPLE *
              k_j entries lie above it), gather up to CAP * k_j entries at or above it in
              one pass (hydrahead.kernels.topk_candidates), and keep the k_j largest of
              those. When fewer than k_j clear the threshold the leftover slots carry
              nothing (index ``numel``): what they would have sent stays in the residual.
              A tensor whose sample would be all of it is read whole, and its threshold is
              then its exact k_j-th largest value, so the selection equals exact top-k (up
              to ties).

The sampled path is a fixed sequence of kernels per bucket, whatever its number of
tensors, and reads nothing back to the host, so it does not stall the backward that the
DDP hook runs inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hydrahead.counter_rng import keyed_uniform, stream_keys

SELECTIONS = ("exact", "sampled")
MIN_SAMPLE_RANK = 8  # the threshold is at least the 8th-largest sample: fewer makes its count noisy
OVERSAMPLE = 2.0  # aim the threshold at 2k entries, so that k clear it with high probability
CAP = 4  # gather at most 4k candidates per tensor; the k largest of them are sent
SAMPLE_STREAM = 5000  # counter-hash stream of the sample positions
_GOLDEN = (5**0.5 - 1) / 2  # the stride of the sample sequence, as a share of the tensor


def num_selected(numel: int, density: float) -> int:
    """k: entries a tensor of ``numel`` sends at ``density`` (at least one)."""
    return max(1, math.ceil(density * numel))


def exact_topk(acc: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |acc| (a flat tensor), in no particular order."""
    return acc.abs().topk(k, sorted=False).indices


@dataclass(frozen=True)
class SamplePlan:
    """Sizes of the sampled selection over tensors laid end to end (a bucket's sparse part)."""

    sizes: tuple[int, ...]  # n_j
    ks: tuple[int, ...]  # entries sent
    samples: tuple[int, ...]  # s_j magnitudes read
    ranks: tuple[int, ...]  # the threshold is the r_j-th largest sample
    caps: tuple[int, ...]  # candidates gathered at most

    @classmethod
    def make(cls, sizes, density: float, sample_share: float, sent=None) -> SamplePlan:
        """``sent[j]`` False: segment j sends nothing through the selection (a dense tensor,
        or a gap of the bucket): no samples, no candidates, no slots."""
        ks, samples, ranks, caps = [], [], [], []
        for j, n in enumerate(sizes):
            if sent is not None and not sent[j]:
                ks.append(0), samples.append(0), ranks.append(0), caps.append(0)
                continue
            k = num_selected(n, density)
            s = min(n, max(math.ceil(sample_share * n), math.ceil(MIN_SAMPLE_RANK / density)))
            ks.append(k)
            samples.append(s)
            ranks.append(k if s == n else min(s, math.ceil(OVERSAMPLE * k * s / n)))
            caps.append(min(n, CAP * k))
        return cls(tuple(sizes), tuple(ks), tuple(samples), tuple(ranks), tuple(caps))

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def num_selected(self) -> int:
        return sum(self.ks)


class SamplePlanTensors:
    """A plan's index tensors on one device (built once per plan and reused)."""

    def __init__(self, plan: SamplePlan, keys: list[int], device: torch.device):
        sizes = torch.tensor(plan.sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        samples = torch.tensor(plan.samples)
        caps = torch.tensor(plan.caps)
        cap_starts = torch.cumsum(caps, 0) - caps
        seg_of_slot = torch.repeat_interleave(torch.arange(len(plan.sizes)), samples)
        slot = torch.arange(int(samples.sum())) - torch.repeat_interleave(torch.cumsum(samples, 0) - samples, samples)
        whole = torch.tensor([s == n for s, n in zip(plan.samples, plan.sizes)])
        self.numel, self.total_caps = plan.numel, int(caps.sum())
        self.bounds = torch.cat([starts, sizes.sum().reshape(1)]).to(device)  # tensor j spans bounds[j] .. bounds[j+1]
        self.starts = starts.to(device)
        self.caps = caps.to(device)
        self.cap_starts = cap_starts.to(device)
        self.keys = torch.tensor(keys, dtype=torch.int64).to(device)
        # Sample slots: the tensor each belongs to, its position when the tensor is read
        # whole, and its step along the tensor's quasi-random sequence otherwise.
        self.slot_seg = seg_of_slot.to(device)
        self.slot_start = starts[seg_of_slot].to(device)
        self.slot_numel = sizes[seg_of_slot].double().to(device)
        self.slot_whole = whole[seg_of_slot].to(device)
        self.slot_exact_pos = (starts[seg_of_slot] + slot).to(device)
        self.slot_step = (slot.double() * _GOLDEN).remainder(1.0).to(device)
        # In the sorted samples, tensor j's threshold sits r_j places from the end of its block.
        sample_starts = torch.cumsum(samples, 0) - samples
        # (A segment that sends nothing has no block; its threshold is read anywhere, unused.)
        total_samples = max(int(samples.sum()), 1)
        self.threshold_pos = (sample_starts + samples - torch.tensor(plan.ranks)).clamp(0, total_samples - 1).to(device)
        self.cand_seg = torch.repeat_interleave(torch.arange(len(plan.sizes)), caps).to(device)
        self.cand_keys_base = self.cand_seg << 32  # an empty candidate slot's order key
        # In the sorted candidates, tensor j's k_j largest are the last k_j of its block.
        ks = torch.tensor(plan.ks)
        self.pick = torch.cat([torch.arange(c0 + c - k, c0 + c) for c0, c, k in zip(cap_starts, caps, ks)]).to(device)
        # each selected slot's tensor's first entry: where an empty slot's wire index points
        self.pick_start = self.starts[torch.repeat_interleave(torch.arange(len(plan.sizes)), ks).to(device)]


def _order_key(segment: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort by segment, then by magnitude (>= 0: its float bits sort as ints)."""
    return (segment << 32) | magnitude.float().view(torch.int32).long()


def sample_keys_reference(acc: torch.Tensor, plan: SamplePlanTensors, k1: int, k2: int) -> torch.Tensor:
    """Order keys (segment, |acc|) of the sampled entries, slot by slot, under the stream
    keys (k1, k2) (torch; any device)."""
    offset = keyed_uniform(k1, k2, plan.keys)[plan.slot_seg]
    drawn = plan.slot_start + ((offset + plan.slot_step).remainder(1.0) * plan.slot_numel).long()
    positions = torch.where(plan.slot_whole, plan.slot_exact_pos, drawn)
    return _order_key(plan.slot_seg, acc[positions].abs())


def sampled_thresholds(
    acc: torch.Tensor, plan: SamplePlanTensors, seed: int, stream: int = SAMPLE_STREAM, sample_keys=None
) -> torch.Tensor:
    """Each tensor's threshold: the r_j-th largest |acc| among its samples.

    ``acc``: the tensors laid end to end (float32). A sampled tensor is read at s_j points
    of a quasi-random sequence (a golden-ratio stride around the tensor) from an offset
    drawn per tensor from ``seed`` (the caller makes it unique per worker and step):
    evenly spread, so the estimate is steadier than from independent draws, and every
    entry equally likely to be read.

    ``sample_keys``: ``sample_keys_reference`` or the kernel (one launch instead of a few
    dozen; by default on CUDA), both bit for bit the same keys.
    """
    if sample_keys is None:
        sample_keys = sample_keys_reference
        if acc.is_cuda:
            from hydrahead.kernels.topk_candidates import sample_keys_triton as sample_keys
    sorted_keys = sample_keys(acc, plan, *stream_keys(seed, stream)).sort().values
    # index_select, not [ ]: advanced indexing costs several times the host time per call
    return (sorted_keys.index_select(0, plan.threshold_pos) & 0x7FFFFFFF).int().view(torch.float32)


def select_above(acc: torch.Tensor, plan: SamplePlanTensors, thresholds: torch.Tensor, gather=None) -> torch.Tensor:
    """Flat indices (into the tensors laid end to end) of each tensor's selected entries:
    ``sum(ks)`` of them, tensor by tensor; ``plan.numel`` marks a slot that sends nothing.

    Tensor j's candidates are up to ``caps[j]`` of its entries with |acc| at or above
    ``thresholds[j]`` (hydrahead.kernels.topk_candidates; ``gather`` picks its kernel or
    reference, by default the kernel on CUDA); its k_j largest candidates are selected.
    """
    if gather is None:
        # Imported here: the kernels need triton, which a CPU install without the test extras
        # lacks, and importing this module (every top-k run does) must not need it.
        from hydrahead.kernels.topk_candidates import candidates as gather
    args = (acc, plan.bounds, plan.caps, plan.cap_starts, thresholds, plan.total_caps)
    found, key = gather(*args, keys_base=plan.cand_keys_base)  # empty slots' keys sort lowest
    order = key.sort(stable=True).indices
    return found.index_select(0, order.index_select(0, plan.pick))


def sampled_topk(acc: torch.Tensor, plan: SamplePlanTensors, seed: int, stream: int = SAMPLE_STREAM) -> torch.Tensor:
    """``select_above`` the ``sampled_thresholds``: the sampled selection of every tensor."""
    return select_above(acc, plan, sampled_thresholds(acc, plan, seed, stream))


__all__ = [
    "CAP",
    "MIN_SAMPLE_RANK",
    "OVERSAMPLE",
    "SAMPLE_STREAM",
    "SELECTIONS",
    "SamplePlan",
    "SamplePlanTensors",
    "exact_topk",
    "num_selected",
    "sampled_thresholds",
    "sampled_topk",
    "sample_keys_reference",
    "select_above",
]
