"""Active-class selection: positives kept, budgets honoured, world-size independence."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from hydrahead.counter_rng import counter_uniform
from hydrahead.distributed.sharding import shard_range
from hydrahead.head import selection
from hydrahead.head.selection import (
    fill_offsets,
    knn_active,
    knn_fixed_rows,
    owned_positives,
    random_active,
    remap_labels,
    resolve_budget,
)


def _priorities(seed, step, class_ids):
    """Reference priorities, computed in one pass over the given global class ids."""
    return counter_uniform(selection._step_key(seed, step), selection._SELECT_STREAM, class_ids)


# --- resolve_budget ---------------------------------------------------------------------


def test_resolve_budget_counts_fractions_and_clamping():
    assert resolve_budget(7, 100) == 7
    assert resolve_budget(1000, 100) == 100  # clamped to the shard
    assert resolve_budget(0.1, 15) == 2  # ceil(1.5)
    assert resolve_budget(0.5, 10) == 5
    assert resolve_budget(1.0, 10) == 10
    assert resolve_budget(1e-9, 10) == 1


@pytest.mark.parametrize("bad", [0, -3, 0.0, -0.5, 1.5, math.nan, True, "3", None])
def test_resolve_budget_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(bad, 10)


def test_resolve_budget_rejects_empty_shard():
    with pytest.raises(ValueError, match="shard_size"):
        resolve_budget(3, 0)


# --- positives --------------------------------------------------------------------------


def test_owned_positives_are_local_sorted_unique_and_skip_ignored():
    labels = torch.tensor([12, 3, 19, 12, -100, 10, 20, 15])
    assert owned_positives(labels, 10, 20).tolist() == [0, 2, 5, 9]
    assert owned_positives(labels, 0, 10).tolist() == [3]
    assert owned_positives(torch.tensor([5, 7]), 5, 7, ignore_index=5).tolist() == []


@pytest.mark.parametrize("budget", [1, 5, 40, 0.01, 0.3])
def test_random_active_always_contains_positives(budget):
    labels = torch.randint(1000, 1200, (64,))
    rows = random_active(labels, 1000, 1200, budget, seed=3, step=11)
    assert set(owned_positives(labels, 1000, 1200).tolist()) <= set(rows.tolist())
    assert torch.equal(rows, torch.unique(rows, sorted=True))


def test_random_active_keeps_all_positives_beyond_the_budget():
    labels = torch.arange(100, 130)
    rows = random_active(labels, 100, 200, 10, seed=0, step=0)
    assert rows.tolist() == list(range(30))


# --- budgets covering the shard ----------------------------------------------------------


@pytest.mark.parametrize("budget", [50, 51, 10_000, 1.0])
def test_budget_covering_the_shard_gives_every_row(budget):
    labels = torch.tensor([3, 27, 60, -100])
    assert torch.equal(random_active(labels, 20, 70, budget, seed=1, step=2), torch.arange(50))
    neighbours = torch.tensor([[0, 4, -1], [4, 9, 49]])
    assert torch.equal(knn_active(neighbours, labels, 20, 70, budget, seed=1, step=2), torch.arange(50))


# --- integer rule ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_integer_budget_takes_the_lowest_priority_negatives(monkeypatch, chunk):
    # A tiny chunk makes the running top-k cross many chunk boundaries.
    monkeypatch.setattr(selection, "_CHUNK", chunk)
    class_start, class_stop, budget = 300, 400, 25
    labels = torch.tensor([305, 350, 350, 399, 12, -100])
    rows = random_active(labels, class_start, class_stop, budget, seed=9, step=4)
    assert rows.numel() == budget

    positives = {5, 50, 99}
    u = _priorities(9, 4, torch.arange(class_start, class_stop))
    negatives = [r for r in torch.argsort(u).tolist() if r not in positives]
    assert set(rows.tolist()) == positives | set(negatives[: budget - len(positives)])


def test_determinism_and_fresh_negatives_each_step():
    labels = torch.randint(0, 100_000, (32,))
    rows = random_active(labels, 0, 100_000, 500, seed=5, step=7)
    assert torch.equal(rows, random_active(labels, 0, 100_000, 500, seed=5, step=7))
    positives = set(owned_positives(labels, 0, 100_000).tolist())
    negatives = set(rows.tolist()) - positives
    for other in (
        random_active(labels, 0, 100_000, 500, seed=5, step=8),
        random_active(labels, 0, 100_000, 500, seed=6, step=7),
    ):
        other_negatives = set(other.tolist()) - positives
        assert len(other_negatives) == len(negatives)
        # Independent draws of ~470 out of 100k overlap by a handful at most.
        assert len(negatives & other_negatives) < 50


# --- fractional rule -----------------------------------------------------------------------


def test_fractional_budget_is_world_size_independent():
    num_classes, fraction = 1000, 0.05
    labels = torch.tensor([0, 17, 333, 334, 999, 500, -100])
    chosen = {}
    for world_size in (1, 2, 3):
        global_ids = []
        for rank in range(world_size):
            start, stop = shard_range(num_classes, world_size, rank)
            rows = random_active(labels, start, stop, fraction, seed=2, step=13)
            global_ids.extend((rows + start).tolist())
        chosen[world_size] = global_ids
    assert chosen[1] == chosen[2] == chosen[3]

    # Exactly the positives plus the classes whose priority is below the fraction.
    u = _priorities(2, 13, torch.arange(num_classes))
    expected = set(torch.nonzero(u < fraction).flatten().tolist()) | {0, 17, 333, 334, 999, 500}
    assert set(chosen[1]) == expected
    assert 20 < len(expected) < 90  # about 5% of 1000, plus the positives


def test_integer_rule_is_a_prefix_of_the_fractional_order():
    # The same priorities order both rules: taking n negatives by count equals
    # thresholding just above the n-th lowest priority.
    labels = torch.tensor([-100])
    u = _priorities(4, 1, torch.arange(500))
    threshold = torch.sort(u).values[19].item()
    by_count = random_active(labels, 0, 500, 20, seed=4, step=1)
    by_fraction = random_active(labels, 0, 500, math.nextafter(threshold, 1.0), seed=4, step=1)
    assert torch.equal(by_count, by_fraction)


# --- knn -------------------------------------------------------------------------------------


def test_knn_union_ignores_missing_neighbours_and_dedups():
    neighbours = torch.tensor([[4, 2, -1], [2, 2, 7], [-1, -1, -1]])
    labels = torch.tensor([103, 107, 250, -100])
    rows = knn_active(neighbours, labels, 100, 200, seed=0, step=0)
    assert rows.tolist() == [2, 3, 4, 7]


def test_knn_fills_to_the_budget_and_keeps_a_larger_union():
    neighbours = torch.tensor([[4, 2], [9, 2]])
    labels = torch.tensor([103])
    rows = knn_active(neighbours, labels, 100, 200, 10, seed=0, step=3)
    assert rows.numel() == 10 and {2, 3, 4, 9} <= set(rows.tolist())
    # The fill follows the same priorities as the random rule.
    u = _priorities(0, 3, torch.arange(100, 200))
    fill = [r for r in torch.argsort(u).tolist() if r not in {2, 3, 4, 9}][:6]
    assert set(rows.tolist()) == {2, 3, 4, 9} | set(fill)

    small = knn_active(neighbours, labels, 100, 200, 2, seed=0, step=3)
    assert small.tolist() == [2, 3, 4, 9]


def test_knn_positives_always_active():
    neighbours = torch.full((4, 3), -1)
    labels = torch.tensor([55, 41, 41, 70])
    assert knn_active(neighbours, labels, 40, 60, seed=0, step=0).tolist() == [1, 15]


def test_knn_rejects_rows_outside_the_shard():
    with pytest.raises(ValueError, match="neighbour_rows"):
        knn_active(torch.tensor([[0, 100]]), torch.tensor([1]), 0, 100, seed=0, step=0)
    with pytest.raises(ValueError, match="neighbour_rows"):
        knn_active(torch.tensor([0, 1]), torch.tensor([1]), 0, 100, seed=0, step=0)


# --- remap_labels ----------------------------------------------------------------------------


def test_remap_labels_positions_and_unowned():
    labels = torch.tensor([105, 150, -100, 99, 105, 200, 119])
    active = torch.tensor([1, 5, 19, 33, 50])
    remapped = remap_labels(labels, active, 100, 200)
    assert remapped.tolist() == [1, 4, -1, -1, 1, -1, 2]
    owned = remapped >= 0
    assert torch.equal(active[remapped[owned]] + 100, labels[owned])


def test_remap_labels_after_selection_round_trips():
    labels = torch.randint(0, 10_000, (256,))
    start, stop = 2_500, 5_000
    rows = random_active(labels, start, stop, 300, seed=1, step=1)
    remapped = remap_labels(labels, rows, start, stop)
    owned = (labels >= start) & (labels < stop)
    assert torch.equal(rows[remapped[owned]] + start, labels[owned])
    assert bool((remapped[~owned] == -1).all())


def test_remap_labels_rejects_missing_or_unsorted_rows():
    with pytest.raises(ValueError, match="missing"):
        remap_labels(torch.tensor([103, 104]), torch.tensor([3, 5]), 100, 200)
    with pytest.raises(ValueError, match="missing"):
        remap_labels(torch.tensor([199]), torch.tensor([3, 5]), 100, 200)
    with pytest.raises(ValueError, match="missing"):
        remap_labels(torch.tensor([103]), torch.tensor([], dtype=torch.long), 100, 200)
    with pytest.raises(ValueError, match="sorted"):
        remap_labels(torch.tensor([103]), torch.tensor([5, 3]), 100, 200)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, start, stop, match",
    [
        (torch.tensor([[1, 2]]), 0, 10, "labels"),
        (torch.tensor([1.0, 2.0]), 0, 10, "labels"),
        (torch.tensor([True]), 0, 10, "labels"),
        ([1, 2], 0, 10, "labels"),
        (torch.tensor([1]), 5, 5, "class_stop"),
        (torch.tensor([1]), -1, 5, "class_start"),
        (torch.tensor([1]), 0.0, 5, "class_start"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(labels, start, stop, match):
    with pytest.raises(ValueError, match=match):
        random_active(labels, start, stop, 3, seed=0, step=0)


def test_bad_step_raises():
    with pytest.raises(ValueError, match="step"):
        random_active(torch.tensor([1]), 0, 10, 3, seed=0, step=-1)


# --- scale -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_25m_class_shard_runs_fast_with_bounded_memory():
    # In a fresh process so the peak-RSS high-water mark belongs to this call alone.
    # Materialising the shard's priorities would cost 200 MB per int64 tensor.
    script = textwrap.dedent(
        """
        import resource, time, torch
        from hydrahead.head.selection import random_active
        torch.set_num_threads(4)
        labels = torch.randint(0, 50_000_000, (200,))  # about 100 owned positives
        random_active(labels, 0, 1000, 10, seed=0, step=0)  # warm up torch
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        rows = random_active(labels, 25_000_000, 50_000_000, 1000, seed=1, step=2)
        seconds = time.perf_counter() - t0
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert rows.numel() == 1000 and rows.unique().numel() == 1000, rows.numel()
        print(f"{seconds:.2f} {grown_mb:.0f}")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seconds, grown_mb = map(float, result.stdout.split())
    assert seconds < 15, f"25M-class selection took {seconds:.1f} s"
    assert grown_mb < 100, f"peak memory grew by {grown_mb:.0f} MB"


# --- knn, fixed size ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_knn_fixed_rows_is_the_union_filled_to_its_size(seed):
    gen = torch.Generator().manual_seed(seed)
    start, stop = 1000, 1000 + int(torch.randint(200, 3000, (1,), generator=gen))
    batch, k = int(torch.randint(1, 40, (1,), generator=gen)), int(torch.randint(1, 8, (1,), generator=gen))
    # neighbours with repeats (near-duplicate samples), -1 where the index found fewer
    neighbours = torch.randint(0, 60, (batch, k), generator=gen) * int(torch.randint(1, 40, (1,), generator=gen))
    neighbours = torch.where(torch.rand(batch, k, generator=gen) < 0.2, -1, neighbours % (stop - start))
    labels = torch.randint(start - 500, stop + 500, (batch,), generator=gen)
    labels[0] = -100
    rows = knn_fixed_rows(neighbours, labels, start, stop, seed=seed, step=3)
    union = knn_active(neighbours, labels, start, stop, seed=seed, step=3)
    assert rows.numel() == min(stop - start, batch * (k + 1))
    assert bool((rows[1:] > rows[:-1]).all()) and int(rows.min()) >= 0 and int(rows.max()) < stop - start
    assert set(union.tolist()) <= set(rows.tolist())
    again = knn_fixed_rows(neighbours, labels, start, stop, seed=seed, step=3)
    assert torch.equal(rows, again)  # the fill is a function of (seed, step)
    if rows.numel() - union.numel() > 5:
        assert not torch.equal(rows, knn_fixed_rows(neighbours, labels, start, stop, seed=seed, step=4))


def test_knn_fixed_rows_edges():
    nothing = torch.full((3, 2), -1)
    rows = knn_fixed_rows(nothing, torch.tensor([-100, 5, 7]), 100, 200, seed=0, step=1)  # no union at all
    assert rows.numel() == 9 and rows.unique().numel() == 9
    assert torch.equal(
        knn_fixed_rows(nothing, torch.tensor([101]), 100, 104, seed=0, step=1), torch.arange(4)
    )  # shard <= size
    rows = knn_fixed_rows(torch.tensor([[3, 99, -7]]), torch.tensor([150]), 0, 100, seed=0, step=1)
    assert rows.numel() == 4 and {3, 99} <= set(rows.tolist())  # -7: no row, dropped without a read
    with pytest.raises(ValueError, match="2-D"):
        knn_fixed_rows(torch.tensor([1, 2]), torch.tensor([1]), 0, 100, seed=0, step=0)


@pytest.mark.parametrize("budget", [100, 0.1])
def test_fill_offsets_make_the_active_softmax_estimate_the_whole_shards(budget):
    """Sampled softmax's correction: over many steps of random fill, the corrected sum of
    exp(logit) over the active rows averages the sum over the whole shard (float64)."""
    start, stop = 1000, 1600  # a shard of 600 classes
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(stop - start, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(start, stop, (60,), generator=gen)  # ~57 positives: a tenth of the shard
    positives = owned_positives(labels, start, stop)
    whole, estimates, uncorrected = float(logits.exp().sum()), [], []
    for step in range(1, 2001):
        rows = random_active(labels, start, stop, budget, seed=3, step=step)
        offsets = fill_offsets(rows, positives, stop - start, budget if isinstance(budget, float) else None)
        assert offsets.dtype == torch.float32 and offsets.shape == rows.shape
        assert torch.equal(offsets[torch.isin(rows, positives)], torch.zeros(positives.numel()))
        estimates.append(float((logits[rows] + offsets.double()).exp().sum()))
        uncorrected.append(float(logits[rows].exp().sum()))
    assert sum(estimates) / len(estimates) == pytest.approx(whole, rel=0.02)
    assert sum(uncorrected) / len(uncorrected) < 0.5 * whole  # without it, far below


def test_fill_offsets_count_the_rows_chosen_for_themselves():
    rows = torch.tensor([0, 2, 3, 5, 7, 9])
    chosen = torch.tensor([2, 7])  # positives and neighbours; the other four rows fill, standing for 98 / 4
    offsets = fill_offsets(rows, chosen, 100)
    assert torch.allclose(offsets, torch.tensor([1, 0, 1, 1, 0, 1]) * math.log(98 / 4))
    trimmed = fill_offsets(torch.tensor([2, 7]), torch.tensor([2, 5, 7]), 100)  # no fill: a trimmed union
    assert torch.equal(trimmed, torch.zeros(2))
    # a fractional random budget draws each other row with probability p: each stands for 1 / p
    assert torch.allclose(fill_offsets(rows, chosen, 100, 0.25)[0], torch.tensor(math.log(4.0)))
    with pytest.raises(ValueError, match="draw_probability"):
        fill_offsets(rows, chosen, 100, 40)  # a count is no probability


def test_fill_offsets_take_repeats_and_missing_rows_without_a_host_read():
    """The chosen rows as the selector hands them: every label's row (-1 where another shard
    owns it) and every neighbour, repeats included; the counts stay on the device."""
    rows = torch.tensor([0, 2, 3, 5, 7, 9])
    chosen = torch.tensor([7, -1, 2, 2, 7, -1])
    offsets = fill_offsets(rows, chosen, 100)
    assert torch.allclose(offsets, torch.tensor([1, 0, 1, 1, 0, 1]) * math.log(98 / 4))
    assert torch.equal(fill_offsets(torch.tensor([2, 7]), torch.tensor([2, 7, 7, -1]), 100), torch.zeros(2))
