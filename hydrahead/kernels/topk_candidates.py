"""Top-k candidates above a per-tensor threshold, gathered in one pass over a bucket.

Tensors lie end to end in one flat fp32 ``acc`` (tensor j at ``starts[j]``, ``starts``
ending with the total). The candidates of tensor j are entries with |acc| >= its
threshold; up to ``caps[j]`` of them are written to its block of the output (which starts
at ``cap_starts[j]``), the rest of the block holding ``n`` (nothing).

``candidates_reference`` (torch) keeps the first ``caps[j]`` in index order, with about
twenty whole-length passes (a cumulative count, gathers, a scatter). The Triton kernel
reads ``acc`` once: each entry that clears its tensor's threshold claims a slot with an
atomic add on the tensor's counter, so the order within a block, and which candidates
a full block keeps, depend on the schedule; when no block fills, both give the same set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["candidates", "candidates_reference", "candidates_triton"]

BLOCK = 2048


def candidates_reference(
    acc: torch.Tensor,
    starts: torch.Tensor,
    caps: torch.Tensor,
    cap_starts: torch.Tensor,
    thresholds: torch.Tensor,
    total: int,
) -> torch.Tensor:
    """The candidates' flat indices, block by block, in index order (torch; any device).
    ``total``: the output's length, sum(caps), passed in so that nothing is read back."""
    n, device = acc.numel(), acc.device
    sizes = starts[1:] - starts[:-1]
    seg = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes, output_size=n)
    above = acc.abs() >= thresholds[seg]
    running = torch.cumsum(above, 0)
    before = torch.cat([running.new_zeros(1), running])[starts[:-1]]  # candidates in earlier tensors
    rank = running - before[seg] - 1
    keep = above & (rank < caps[seg])
    dest = torch.where(keep, cap_starts[seg] + rank, total)  # the rest land in a spare slot
    out = torch.full((total + 1,), n, dtype=torch.int64, device=device)
    out.scatter_(0, dest, torch.arange(n, device=device))
    return out[:-1]


@triton.jit
def _candidates_kernel(
    acc_ptr,
    starts_ptr,
    thresholds_ptr,
    caps_ptr,
    cap_starts_ptr,
    counts_ptr,
    out_ptr,
    n,
    num_segments,
    BLOCK: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
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
    take = inside & (magnitude >= threshold)
    slot = tl.atomic_add(counts_ptr + lo, 1, mask=take, sem="relaxed")  # only a count: no ordering needed
    keep = take & (slot < tl.load(caps_ptr + lo))
    tl.store(out_ptr + tl.load(cap_starts_ptr + lo) + slot, offs, mask=keep)


def candidates_triton(
    acc: torch.Tensor,
    starts: torch.Tensor,
    caps: torch.Tensor,
    cap_starts: torch.Tensor,
    thresholds: torch.Tensor,
    total: int,
) -> torch.Tensor:
    """The candidates' flat indices, block by block, in the order the kernel's atomics gave."""
    n, segments = acc.numel(), caps.numel()
    out = torch.full((total,), n, dtype=torch.int64, device=acc.device)
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
        n,
        segments,
        BLOCK=BLOCK,
        SEARCH_STEPS=steps,
    )
    return out


def candidates(acc, starts, caps, cap_starts, thresholds, total: int) -> torch.Tensor:
    """The kernel on CUDA, the torch reference elsewhere."""
    fn = candidates_triton if acc.is_cuda else candidates_reference
    return fn(acc, starts, caps, cap_starts, thresholds, total)
