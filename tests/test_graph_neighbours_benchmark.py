"""benchmarks/graph_neighbours.py: the share of a row's nearest classes that moved, and what an
IVF probing some or all of its lists finds of them, against brute force."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.graph_neighbours import main, neighbour_structure  # noqa: E402


def _rows():
    """400 rows at their initial values but the first 100, moved into 10 tight families."""
    gen = torch.Generator().manual_seed(0)
    initial = torch.randn(400, 16, generator=gen)
    weight = initial.clone()
    centres = torch.randn(10, 16, generator=gen)
    weight[:100] = centres.repeat_interleave(10, 0) + 0.1 * torch.randn(100, 16, generator=gen)
    return weight, initial


def test_neighbour_structure_matches_brute_force():
    weight, initial = _rows()
    found = neighbour_structure(
        weight, initial, k=5, queries=30, moved_cosine=0.9, scale=8.0, nlist=8, nprobes=[1, 8], seed=3
    )
    summary = found["summary"]
    assert summary["moved_rows"] == 100 and summary["queries"] == 30
    # Brute force over the same sample of moved rows (the script's seeded draw).
    picked = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:30]
    unit = F.normalize(weight, dim=1)
    scores = unit[picked] @ unit.T
    scores[torch.arange(30), picked] = -math.inf
    best, exact = scores.topk(5, dim=1)
    assert summary["moved_share"] == pytest.approx((exact < 100).float().mean().item())
    assert summary["moved_share"] > 0.9  # a family's 9 siblings are its nearest rows
    assert summary["neighbour_cosine"] == pytest.approx(best.mean().item(), rel=1e-5)
    mass = torch.exp(8.0 * (best - 1)).sum(1) / torch.exp(8.0 * (scores - 1)).sum(1)
    assert summary["mass_share"] == pytest.approx(mass.mean().item(), rel=1e-5)
    assert summary["exact_over_moved"] == pytest.approx((exact < 100).float().mean().item())
    by_probes = {(row["kmeans_on"], row["nprobe"]): row for row in found["rows"]}
    assert len(by_probes) == 4
    for sample in ("all rows", "moved rows"):
        every_list = by_probes[(sample, 8)]  # all 8 lists probed: every neighbour found
        assert every_list["recall"] == every_list["moved_recall"] == every_list["mass_recall"] == 1.0


def test_rows_moved_apart_find_unmoved_neighbours_that_one_list_misses():
    """Moved rows that form no family: their nearest classes are rows still where they began,
    spread over the lists, so probing one of 8 finds some of them, not all."""
    weight, initial = _rows()
    weight[:100] = torch.randn(100, 16, generator=torch.Generator().manual_seed(5))
    found = neighbour_structure(
        weight, initial, k=5, queries=30, moved_cosine=0.9, scale=8.0, nlist=8, nprobes=[1, 8], seed=3
    )
    assert found["summary"]["moved_share"] < 0.5
    one, every = found["rows"][0], found["rows"][1]
    assert (one["nprobe"], every["nprobe"]) == (1, 8)
    assert 0.0 < one["recall"] < 1.0 and every["recall"] == 1.0


def test_a_run_with_no_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        main([str(tmp_path / "nothing here")])
