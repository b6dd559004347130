"""The sampled top-k selection's two passes over a bucket, as kernels.

``sample_keys_triton``: the order keys of each tensor's sampled magnitudes (positions
drawn as hydrahead.comm.topk_select.sample_keys_reference draws them, hash included), one
launch for every tensor of the bucket.

``candidates``: top-k candidates above a per-tensor threshold, gathered in one pass.

Tensors lie end to end in one flat fp32 ``acc`` (tensor j at ``starts[j]``, ``starts``
ending with the total). The candidates of tensor j are nonzero entries with |acc| >= its
threshold; up to ``caps[j]`` of them are written to its block of the output (which
starts at ``cap_starts[j]``), the rest of the block holding ``n`` (nothing).

``candidates_reference`` (torch) keeps the first ``caps[j]`` in index order: a few
whole-length passes find the candidates, the rest works on them alone. The Triton kernel
reads ``acc`` once: each entry that clears its tensor's threshold claims a slot with an
atomic add on the tensor's counter, so the order within a block, and which candidates
a full block keeps, depend on the schedule; when no block fills, both give the same set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["candidates", "candidates_reference", "candidates_triton", "sample_keys_triton"]

BLOCK = 2048


def candidates_reference(
    acc: torch.Tensor,
    starts: torch.Tensor,
    caps: torch.Tensor,
    cap_starts: torch.Tensor,
    thresholds: torch.Tensor,
    total: int,
    keys_base: torch.Tensor | None = None,
):
    """The candidates' flat indices, block by block, in index order (torch; any device).
    ``total``: the output's length, sum(caps) (the kernel then reads nothing back; this
    reference's ``nonzero`` does). With ``keys_base`` (each slot's segment << 32) also
    their order keys (segment, then |acc| bits + 1; an empty slot's is its base):
    (indices, keys)."""
    n, device = acc.numel(), acc.device
    segments = starts.numel() - 1
    # Whole-length passes: the per-entry threshold and the test; the rest is over the
    # candidates alone (few: a step's top-k keeps about 1%), which keeps this fast on a CPU.
    per_entry = torch.repeat_interleave(thresholds, starts[1:] - starts[:-1], output_size=n)
    index = ((acc.abs() >= per_entry) & (acc != 0)).nonzero().squeeze(1)  # a zero owes nothing
    seg = torch.searchsorted(starts[1:segments].contiguous(), index, right=True)
    first = torch.searchsorted(index, starts[:segments].contiguous())  # each tensor's first candidate
    rank = torch.arange(index.numel(), device=device) - first[seg]
    keep = rank < caps[seg]
    dest = torch.where(keep, cap_starts[seg] + rank, total)  # the rest land in a spare slot
    out = torch.full((total + 1,), n, dtype=torch.int64, device=device)
    out.scatter_(0, dest, index)
    found = out[:-1]
    if keys_base is None:
        return found
    magnitude = acc[found.clamp(max=n - 1)].abs().view(torch.int32).long() + 1
    return found, keys_base | torch.where(found < n, magnitude, 0)


@triton.jit
def _candidates_kernel(
    acc_ptr,
    starts_ptr,
    thresholds_ptr,
    caps_ptr,
    cap_starts_ptr,
    counts_ptr,
    out_ptr,
    keys_ptr,
    n,
    num_segments,
    BLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    WITH_KEYS: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    magnitude = tl.abs(tl.load(acc_ptr + offs, mask=inside, other=0.0))
    # The tensor of each entry: the last j with starts[j] <= offs (binary search in a small table).
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + (num_segments - 1)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        right = tl.load(starts_ptr + mid) <= offs
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    threshold = tl.load(thresholds_ptr + lo)
    # A zero owes nothing. It is no candidate even at a threshold of 0 (a layer whose sampled
    # entries are all zero): every zero entry would otherwise claim a slot on one counter.
    take = inside & (magnitude >= threshold) & (magnitude > 0)
    slot = tl.atomic_add(counts_ptr + lo, 1, mask=take, sem="relaxed")  # only a count: no ordering needed
    keep = take & (slot < tl.load(caps_ptr + lo))
    dest = tl.load(cap_starts_ptr + lo) + slot
    tl.store(out_ptr + dest, offs, mask=keep)
    if WITH_KEYS:  # the candidate's order key (segment << 32): |acc| bits + 1
        bits = magnitude.to(tl.int32, bitcast=True).to(tl.int64) + 1
        tl.store(keys_ptr + dest, (lo.to(tl.int64) << 32) | bits, mask=keep)


def candidates_triton(
    acc: torch.Tensor,
    starts: torch.Tensor,
    caps: torch.Tensor,
    cap_starts: torch.Tensor,
    thresholds: torch.Tensor,
    total: int,
    keys_base: torch.Tensor | None = None,
):
    """The candidates' flat indices, block by block, in the order the kernel's atomics gave.

    With ``keys_base`` also their order keys, as ``candidates_reference`` gives them
    (written in the same pass): (indices, keys).
    """
    n, segments = acc.numel(), caps.numel()
    out = torch.full((total,), n, dtype=torch.int64, device=acc.device)
    keys = keys_base.clone() if keys_base is not None else out
    counts = torch.zeros(segments, dtype=torch.int32, device=acc.device)
    steps = max(1, (segments - 1).bit_length())
    grid = (triton.cdiv(n, BLOCK),)
    _candidates_kernel[grid](
        acc,
        starts,
        thresholds.float(),
        caps,
        cap_starts,
        counts,
        out,
        keys,
        n,
        segments,
        BLOCK=BLOCK,
        SEARCH_STEPS=steps,
        WITH_KEYS=keys_base is not None,
    )
    return (out, keys) if keys_base is not None else out


@triton.jit
def _shr(x, bits: tl.constexpr):
    return (x >> bits) & ((1 << (64 - bits)) - 1)  # >> on int64 is arithmetic: mask it logical


@triton.jit
def _mix64(z):
    """hydrahead.counter_rng's splitmix64 finaliser; its multipliers as int64 (0xBF58476D1CE4E5B9,
    0x94D049BB133111EB: multiplication wraps mod 2**64 alike for both signs)."""
    z = (z ^ _shr(z, 30)) * -4658895280553007687
    z = (z ^ _shr(z, 27)) * -7723592293110705685
    return z ^ _shr(z, 31)


@triton.jit
def _sample_keys_kernel(
    acc_ptr,
    keys_ptr,
    seg_ptr,
    start_ptr,
    numel_ptr,
    whole_ptr,
    exact_ptr,
    step_ptr,
    out_ptr,
    num_slots,
    k1,
    k2,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < num_slots
    seg = tl.load(seg_ptr + offs, mask=inside, other=0)
    # counter_uniform(seed, stream, key) of the slot's tensor: its offset along the sequence
    h = _mix64(_mix64(tl.load(keys_ptr + seg, mask=inside, other=0) + k1) ^ k2)
    offset = (_shr(h, 12).to(tl.float64) + 0.5) * 2.220446049250313e-16
    x = offset + tl.load(step_ptr + offs, mask=inside, other=0.0)
    drawn = tl.load(start_ptr + offs, mask=inside, other=0) + (
        (x - tl.floor(x)) * tl.load(numel_ptr + offs, mask=inside, other=0.0)
    ).to(tl.int64)
    whole = tl.load(whole_ptr + offs, mask=inside, other=0) != 0
    position = tl.where(whole, tl.load(exact_ptr + offs, mask=inside, other=0), drawn)
    magnitude = tl.abs(tl.load(acc_ptr + position, mask=inside, other=0.0))
    tl.store(out_ptr + offs, (seg << 32) | magnitude.to(tl.int32, bitcast=True).to(tl.int64), mask=inside)


def sample_keys_triton(acc: torch.Tensor, plan, k1: int, k2: int) -> torch.Tensor:
    """Order keys (segment << 32 | |acc| bits) of every sample slot of ``plan`` (a
    hydrahead.comm.topk_select.SamplePlanTensors) under the stream keys (k1, k2)."""
    slots = plan.slot_seg.numel()
    out = torch.empty(slots, dtype=torch.int64, device=acc.device)
    if slots:
        _sample_keys_kernel[(triton.cdiv(slots, BLOCK),)](
            acc,
            plan.keys,
            plan.slot_seg,
            plan.slot_start,
            plan.slot_numel,
            plan.slot_whole,
            plan.slot_exact_pos,
            plan.slot_step,
            out,
            slots,
            k1,
            k2,
            BLOCK=BLOCK,
        )
    return out


def candidates(acc, starts, caps, cap_starts, thresholds, total: int, keys_base=None):
    """The kernel on CUDA, the torch reference elsewhere."""
    fn = candidates_triton if acc.is_cuda else candidates_reference
    return fn(acc, starts, caps, cap_starts, thresholds, total, keys_base)
