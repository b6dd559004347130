"""Top-k entry selection (hydrahead.comm.topk_select): sampled thresholds against exact top-k."""

from __future__ import annotations

import pytest
import torch

from hydrahead.comm.topk_select import (
    SamplePlan,
    SamplePlanTensors,
    exact_topk,
    sampled_thresholds,
    sampled_topk,
    select_above,
)

SIZES = [5000, 64, 70000, 300000]  # whole-read small tensors beside sampled large ones


def _plan(sizes, density, share):
    spec = SamplePlan.make(sizes, density, share)
    return spec, SamplePlanTensors(spec, list(range(len(sizes))), torch.device("cpu"))


def _per_tensor(chosen, spec):
    """Split the flat selection by tensor: (tensor-local valid indices, number of empty slots)."""
    out, slot, start = [], 0, 0
    for n, k in zip(spec.sizes, spec.ks):
        part = chosen[slot : slot + k]
        valid = part[part < spec.numel]
        assert bool(((valid >= start) & (valid < start + n)).all()), "an index left its tensor"
        out.append((valid - start, k - valid.numel()))
        slot, start = slot + k, start + n
    return out


def _magnitudes(seed):
    gen = torch.Generator().manual_seed(seed)
    # heavy-tailed, as gradients are: a few large entries over many small ones
    return (torch.randn(sum(SIZES), generator=gen) * torch.rand(sum(SIZES), generator=gen) ** 4).abs()


@pytest.mark.parametrize("density", [0.001, 0.01])
def test_reading_the_whole_tensor_gives_exact_topk(density):
    magnitude = _magnitudes(0)
    spec, plan = _plan(SIZES, density, 1.0)
    assert spec.samples == spec.sizes
    start = 0
    for (local, empty), n, k in zip(_per_tensor(sampled_topk(magnitude, plan, seed=1), spec), SIZES, spec.ks):
        assert empty == 0
        assert set(local.tolist()) == set(exact_topk(magnitude[start : start + n], k).tolist())
        start += n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_selection_is_bounded_and_above_its_threshold(seed):
    magnitude, density = _magnitudes(seed), 0.001
    spec, plan = _plan(SIZES, density, 0.01)
    assert spec.samples[3] < spec.sizes[3]  # the largest tensor really is sampled
    thresholds = sampled_thresholds(magnitude, plan, seed=seed)
    chosen = select_above(magnitude, plan, thresholds)
    assert chosen.numel() == sum(spec.ks)  # a fixed message size
    start = 0
    for (local, empty), n, k, threshold in zip(_per_tensor(chosen, spec), SIZES, spec.ks, thresholds):
        part = magnitude[start : start + n]
        assert local.unique().numel() == local.numel() <= k
        assert bool((part[local] >= threshold).all())
        above = int((part >= threshold).sum())
        if k <= above <= spec.caps[SIZES.index(n)]:  # every true top-k entry was a candidate
            assert empty == 0 and set(local.tolist()) == set(exact_topk(part, k).tolist())
        start += n
    assert sampled_topk(magnitude, plan, seed=seed).tolist() == chosen.tolist()
    other = sampled_thresholds(magnitude, plan, seed=seed + 10)  # other sample positions, other estimates
    assert torch.equal(other[:2], thresholds[:2]) and not torch.equal(other[2:], thresholds[2:])


def test_too_few_or_too_many_above_the_threshold():
    sizes, density = [1000, 2000], 0.01
    spec, plan = _plan(sizes, density, 0.1)
    magnitude = torch.arange(3000, dtype=torch.float32).flip(0)  # tensor 0: 2999 ... 2000, tensor 1: 1999 ... 0
    # tensor 0: only 4 entries clear the threshold (k = 10): 4 sent, 6 empty slots
    # tensor 1: everything clears it: the first caps = 80 entries are the candidates, their 20 largest sent
    (local0, empty0), (local1, empty1) = _per_tensor(select_above(magnitude, plan, torch.tensor([2995.5, -1.0])), spec)
    assert sorted(local0.tolist()) == [0, 1, 2, 3] and empty0 == 6
    assert sorted(local1.tolist()) == list(range(20)) and empty1 == 0
    # a threshold no entry clears: all slots empty
    (local0, empty0), _ = _per_tensor(select_above(magnitude, plan, torch.tensor([1e9, 0.0])), spec)
    assert local0.numel() == 0 and empty0 == spec.ks[0]


def test_sample_counts_follow_the_share_and_the_minimum_rank():
    spec = SamplePlan.make([100, 10_000, 1_000_000], 0.001, 0.01)
    assert spec.ks == (1, 10, 1000)
    assert spec.samples == (100, 8000, 10_000)  # all / 8 / density / 1% of the tensor
    assert spec.ranks == (1, 16, 20)  # exact k when read whole; about 2k entries above it otherwise
    assert spec.caps == (4, 40, 4000)


@pytest.mark.parametrize("threshold", [0.5, 0.0])  # for tensors 2 and 4: some of their entries, all of them
def test_candidate_kernel_matches_its_torch_reference(threshold):
    from hydrahead.kernels.topk_candidates import candidates_reference, candidates_triton

    sizes = [3000, 1, 5000, 700]
    acc = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(3))
    bounds = torch.tensor([0, 3000, 3001, 8001, 8701])
    caps = torch.tensor([40, 1, 60, 800])
    cap_starts = torch.cumsum(caps, 0) - caps
    thresholds = torch.tensor([3.0, threshold, 3.0, threshold])
    args = (acc, bounds, caps, cap_starts, thresholds, int(caps.sum()))
    kernel, reference = candidates_triton(*args), candidates_reference(*args)
    for start, cap in zip(cap_starts.tolist(), caps.tolist()):
        mine, theirs = kernel[start : start + cap], reference[start : start + cap]
        assert int((mine < acc.numel()).sum()) == int((theirs < acc.numel()).sum())
        assert set(mine.tolist()) == set(theirs.tolist())  # index order in the interpreter, any order on a GPU
    assert 0 < int((reference[:40] < acc.numel()).sum()) == int((acc[:3000].abs() >= 3.0).sum()) < 40
    above = int((acc[8001:].abs() >= threshold).sum())  # the last tensor: all 700 at threshold 0, block not full
    assert int((reference[101:901] < acc.numel()).sum()) == above and (threshold > 0 or above == 700)


@pytest.mark.parametrize("seed", range(4))
def test_candidate_reference_keeps_each_tensors_first_entries_above_its_threshold(seed):
    """Against a tensor-by-tensor loop, on fresh inputs: empty tensors, zeros, blocks that
    fill and blocks that do not."""
    from hydrahead.kernels.topk_candidates import candidates_reference

    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 400, (7,), generator=gen)
    sizes[seed % 7] = 0
    acc = torch.randn(int(sizes.sum()), generator=gen)  # fp32, as the exchange's accumulator
    acc[torch.rand(acc.numel(), generator=gen) < 0.2] = 0.0
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    caps = torch.randint(1, 60, (7,), generator=gen)
    cap_starts = torch.cumsum(caps, 0) - caps
    thresholds = torch.rand(7, generator=gen) * 2
    thresholds[0] = 0.0  # every nonzero entry of tensor 0
    total = int(caps.sum())
    keys_base = torch.repeat_interleave(torch.arange(7), caps) << 32
    found, keys = candidates_reference(acc, bounds, caps, cap_starts, thresholds, total, keys_base=keys_base)
    n = acc.numel()
    expected, expected_keys = [], []
    for j in range(7):
        start, end = int(bounds[j]), int(bounds[j + 1])
        above = [i for i in range(start, end) if acc[i] != 0 and abs(acc[i]) >= thresholds[j]][: int(caps[j])]
        pad = int(caps[j]) - len(above)
        expected += above + [n] * pad
        bits = [int(acc[i].abs().view(torch.int32)) + 1 for i in above]
        expected_keys += [(j << 32) | b for b in bits] + [j << 32] * pad
    assert found.tolist() == expected
    assert keys.tolist() == expected_keys
    assert candidates_reference(acc, bounds, caps, cap_starts, thresholds, total).tolist() == expected


def test_selection_through_the_kernel_equals_the_reference():
    from hydrahead.kernels.topk_candidates import candidates_reference, candidates_triton

    magnitude = _magnitudes(4)
    spec, plan = _plan(SIZES, 0.001, 0.01)
    thresholds = sampled_thresholds(magnitude, plan, seed=2)
    kernel = select_above(magnitude, plan, thresholds, gather=candidates_triton)
    assert kernel.tolist() == select_above(magnitude, plan, thresholds, gather=candidates_reference).tolist()


def test_sample_key_kernel_draws_the_reference_positions_bit_for_bit():
    from hydrahead.comm.topk_select import sample_keys_reference
    from hydrahead.counter_rng import stream_keys
    from hydrahead.kernels.topk_candidates import sample_keys_triton

    gen = torch.Generator().manual_seed(6)
    magnitude = _magnitudes(5) * (torch.rand(sum(SIZES), generator=gen) - 0.5).sign()  # |acc| is sampled
    _, plan = _plan(SIZES, 0.001, 0.01)
    for seed in (0, 17, 2**40 + 3):
        reference = sample_keys_reference(magnitude, plan, *stream_keys(seed, 5000))
        kernel = sample_keys_triton(magnitude, plan, *stream_keys(seed, 5000))
        assert torch.equal(kernel, reference)
        assert not torch.equal(kernel, sample_keys_reference(magnitude, plan, *stream_keys(seed + 1, 5000)))


def test_counter_hash_of_one_index_equals_the_tensor_hash():
    from hydrahead.counter_rng import counter_hash, counter_hash_int

    for seed, stream, index in ((0, 5000, 7), (3, 5000, (5 << 32) + 11), (2**63 + 5, 1, 2**62)):
        assert counter_hash_int(seed, stream, index) == int(counter_hash(seed, stream, torch.tensor([index]))[0])


@pytest.mark.parametrize("gather", ["reference", "triton"])
def test_zeros_are_never_candidates(gather):
    """A layer whose sampled entries are all zero gets a threshold of 0: its zeros must not
    fill its slots (nor, in the kernel, all claim one counter)."""
    from hydrahead.kernels import topk_candidates

    fn = getattr(topk_candidates, f"candidates_{gather}")
    acc = torch.zeros(5000)
    acc[[7, 4000]] = torch.tensor([-0.5, 2.0])
    bounds, caps = torch.tensor([0, 3000, 5000]), torch.tensor([10, 10])
    found = fn(acc, bounds, caps, torch.tensor([0, 10]), torch.tensor([0.0, 0.0]), 20)
    assert sorted(found[found < 5000].tolist()) == [7, 4000]
