"""The list-grouped top-k kernel (hydrahead.kernels.group_topk) against its torch reference,
under Triton's interpreter on the CPU, and the grouped search taking it."""

from __future__ import annotations

import math

import pytest
import torch

import hydrahead.head.index as index_mod
from hydrahead.head.index import make_index
from hydrahead.kernels import group_topk as gt

SMALL = {"block_queries": 16, "block_rows": 16, "block_dims": 16}


@pytest.fixture(params=["by pairs", "by tiles"])
def second_pass(request, monkeypatch):
    """The kernel's second pass either way: each query's k best tiles as (query, tile)
    pairs, or every tile a block of queries needs."""
    monkeypatch.setattr(gt, "BY_PAIRS", request.param == "by pairs")
    return request.param


def groups(seed):
    """Operands of four groups (one without queries), float32, with a family of
    near-duplicate rows inside one tile (several survivors in a tile)."""
    gen = torch.Generator().manual_seed(seed)
    dim = 40
    queries = torch.randn(100, dim, generator=gen, dtype=torch.float64)
    rows = torch.randn(400, dim, generator=gen, dtype=torch.float64)
    rows[5:9] = rows[4] + 1e-3 * torch.randn(4, dim, generator=gen, dtype=torch.float64)
    queries[0] = rows[4]  # its best five: the family
    bounds = ([0, 37, 37, 90], [37, 37, 90, 100], [0, 100, 100, 300], [90, 260, 300, 390])
    return queries.float(), rows.float(), bounds


@pytest.mark.parametrize("seed", [0, 1])
def test_group_topk_finds_each_groups_best_rows(seed, second_pass):
    queries, rows, bounds = groups(seed)
    stats = {}
    scores, positions = gt.group_topk(queries, rows, *bounds, 5, stats=stats, **SMALL)
    want_scores, want_positions = gt.group_topk_reference(queries.double(), rows.double(), *bounds, 5)
    assert torch.equal(positions, want_positions)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)
    assert set(positions[0].tolist()) == {4, 5, 6, 7, 8}
    assert stats["searched_again"] == 0
    # the threshold cut: far fewer survivors than candidates (about 10 of 90-200)
    assert 5 <= stats["survivors_mean"] < 20


def test_group_topk_searches_again_the_queries_whose_survivors_overflow(second_pass):
    """Equal scores all clear the threshold; past ``cap`` of them the query is searched in torch."""
    queries, rows, bounds = groups(2)
    rows[100:140] = rows[100]  # 40 equal rows in group 2's candidates
    queries[40] = rows[100] * 3
    stats = {}
    scores, positions = gt.group_topk(queries, rows, *bounds, 5, cap=8, stats=stats, **SMALL)
    want_scores, _ = gt.group_topk_reference(queries.double(), rows.double(), *bounds, 5)
    assert stats["searched_again"] >= 1
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)
    assert ((positions[40] >= 100) & (positions[40] < 140)).all()
    assert len(set(positions[40].tolist())) == 5


def test_group_topk_refuses_what_it_cannot_search():
    queries, rows, bounds = groups(3)
    with pytest.raises(ValueError, match="fewer than k"):
        gt.group_topk(queries, rows, [0], [10], [0], [40], 5, **SMALL)  # 3 tiles of 16 < 5
    with pytest.raises(ValueError, match="outside"):
        gt.group_topk(queries, rows, [0], [101], [0], [100], 5, **SMALL)
    with pytest.raises(ValueError, match="dtype"):
        gt.group_topk(queries.double(), rows.double(), *bounds, 5, **SMALL)
    with pytest.raises(ValueError, match="cap"):
        gt.group_topk(queries, rows, *bounds, 9, cap=8, **SMALL)
    scores, positions = gt.group_topk(queries, rows, [], [], [], [], 5, **SMALL)
    assert (positions == -1).all() and (scores == -math.inf).all()


@pytest.mark.parametrize("cosine", [False, True])
def test_grouped_search_takes_the_kernel_and_finds_what_torch_finds(monkeypatch, cosine, second_pass):
    """The same index searched by the kernel (every group with k tiles: most of them here) and
    by the torch path gives the same rows and scores."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(1200, 24, generator=gen, dtype=torch.float64) * (1 + torch.rand(1200, 1, generator=gen))
    index = make_index("torch", "ivf", nlist=24, nprobe=3, copy_weights=False, cosine=cosine)
    index.build(weight)
    queries = torch.nn.functional.normalize(weight[index.rows_by_list()[::5]], dim=1)
    monkeypatch.setattr(index_mod, "GROUP_TOPK", "torch")
    want_scores, want_rows = index.search_by_list_groups(queries, 7, weight)
    calls = []
    kernel = gt.group_topk

    def spy(*args, **kwargs):
        calls.append(len(args[2]))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(gt, "group_topk", spy)
    monkeypatch.setattr(index_mod, "GROUP_TOPK", "kernel")
    monkeypatch.setattr(index_mod, "GROUP_TOPK_BLOCK_ROWS", 16)
    monkeypatch.setattr(index_mod, "_PIECE_CANDIDATES", 1200)  # several pieces
    scores, rows = index.search_by_list_groups(queries, 7, weight)
    assert len(calls) > 1 and sum(calls) >= 20  # groups searched by the kernel, over pieces
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_grouped_search_refuses_an_unknown_top_k_mode(monkeypatch):
    weight = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    index = make_index("torch", "ivf", nlist=4, nprobe=2, copy_weights=False)
    index.build(weight)
    monkeypatch.setattr(index_mod, "GROUP_TOPK", "auto")
    with pytest.raises(ValueError, match="HYDRAHEAD_GROUP_TOPK"):
        index.search_by_list_groups(weight[:10], 3, weight)


def test_group_topk_over_many_groups_finds_each_groups_best_rows(second_pass):
    """More than 16 groups: the kernel's search for its group takes 8 steps."""
    gen = torch.Generator().manual_seed(4)
    queries = torch.randn(21 * 6, 16, generator=gen)
    rows = torch.randn(21 * 96, 16, generator=gen)
    bounds = (
        [6 * g for g in range(21)],
        [6 * g + 6 for g in range(21)],
        [96 * g for g in range(21)],
        [96 * g + 96 - g for g in range(21)],  # groups of 76 to 96 rows
    )
    stats = {}
    scores, positions = gt.group_topk(queries, rows, *bounds, 4, stats=stats, **SMALL)
    want_scores, want_positions = gt.group_topk_reference(queries.double(), rows.double(), *bounds, 4)
    assert gt._search_steps(21) == 8 and stats["searched_again"] == 0
    assert torch.equal(positions, want_positions)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)


def test_group_topk_searches_again_a_query_left_short_of_k(monkeypatch, second_pass):
    """A threshold above the k-th score (as a recomputed score below the first pass's would
    leave) keeps fewer than k survivors; those queries are searched again, not cut short."""
    queries, rows, bounds = groups(5)
    monkeypatch.setattr(gt, "_SLACK", -0.5)  # every threshold raised by half its size
    stats = {}
    scores, positions = gt.group_topk(queries, rows, *bounds, 5, stats=stats, **SMALL)
    want_scores, want_positions = gt.group_topk_reference(queries.double(), rows.double(), *bounds, 5)
    assert stats["searched_again"] > 0
    assert torch.equal(positions, want_positions)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)


def test_a_search_again_accumulates_bf16_products_in_float32():
    """Queries searched again in torch keep float32 sums of their bf16 products (a bf16
    product would round near-equal scores together)."""
    gen = torch.Generator().manual_seed(6)
    rows = torch.nn.functional.normalize(torch.randn(1, 64, generator=gen) + 0.01 * torch.randn(200, 64, generator=gen))
    queries = rows[:3].bfloat16()
    rows = rows.bfloat16()
    scores = torch.full((3, 17), -math.inf)
    positions = torch.full((3, 17), -1, dtype=torch.long)
    gt._search_again(queries, rows, [(0, 3, 0, 200)], [0, 1, 2], 17, scores, positions)
    exact = queries.double() @ rows.double().T
    want = exact.topk(17, dim=1)
    torch.testing.assert_close(scores.double(), want.values, rtol=0, atol=1e-6)
    assert torch.equal(positions, want.indices)


def test_group_topk_refuses_groups_that_share_queries():
    queries, rows, _ = groups(3)
    with pytest.raises(ValueError, match="share queries"):
        gt.group_topk(queries, rows, [0, 10], [20, 30], [0, 100], [100, 200], 5, **SMALL)


def test_grouped_search_above_the_kernels_slots_takes_torch(monkeypatch, second_pass):
    """k above the slots per query, or a group with fewer than k tiles: those groups take the
    torch path in the same piece as the kernel's, and the results are the torch path's."""
    gen = torch.Generator().manual_seed(12)
    weight = torch.randn(4000, 16, generator=gen, dtype=torch.float64)
    index = make_index("torch", "ivf", nlist=6, nprobe=1, copy_weights=False)
    index.build(weight)
    queries = weight[index.rows_by_list()[::9]]
    monkeypatch.setattr(index_mod, "GROUP_TOPK", "torch")
    want = index.search_by_list_groups(queries, 130, weight)
    want_small = index.search_by_list_groups(queries, 40, weight)
    monkeypatch.setattr(index_mod, "GROUP_TOPK", "kernel")
    monkeypatch.setattr(index_mod, "GROUP_TOPK_BLOCK_ROWS", 4)  # every group has 130 tiles
    assert min(index._lengths.tolist()) >= 130 * 4
    got = index.search_by_list_groups(queries, 130, weight)  # over CAP: torch for every group
    assert torch.equal(got[1], want[1])
    monkeypatch.setattr(index_mod, "GROUP_TOPK_BLOCK_ROWS", 16)
    lengths = sorted(index._lengths.tolist())
    assert lengths[0] < 40 * 16 <= lengths[-1]  # some groups below 40 tiles of 16, some above
    calls = []
    kernel = gt.group_topk
    monkeypatch.setattr(gt, "group_topk", lambda *a, **kw: calls.append(len(a[2])) or kernel(*a, **kw))
    got_small = index.search_by_list_groups(queries, 40, weight)
    assert 0 < sum(calls) < 6  # the kernel took some of the six groups, torch the others
    assert torch.equal(got_small[1], want_small[1])
    torch.testing.assert_close(got_small[0], want_small[0], rtol=1e-5, atol=1e-5)


def test_group_topk_benchmark_dry_run_writes_its_rows(tmp_path, monkeypatch):
    """benchmarks/group_topk.py on the CPU: the torch rows and the kernel's three variants,
    each finding the torch path's rows, and the results JSON's fields."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import group_topk as bench

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    bench.main(["--dry-run", "--reps", "1"])
    payload = json.loads((tmp_path / "group_topk.json").read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= payload.keys()
    methods = [row["method"] for row in payload["rows"]]
    assert len(methods) == 5 and sum(m.startswith("hydrahead") for m in methods) == 3
    for row in payload["rows"]:
        assert row["recall"] == 1.0 and {"shape", "ms", "floor_ms", "ratio", "peak_mib"} <= row.keys()
    assert (gt.BY_PAIRS, gt.CLAIM_EACH) == (True, False)  # the benchmark puts the defaults back


def test_group_topk_keeps_other_groups_rows_out_of_a_group_of_minus_inf_scores(second_pass):
    """A group whose every product is -inf: its queries' best tiles carry no score, and
    neither pass may take the next group's rows (the threshold there is -inf)."""
    gen = torch.Generator().manual_seed(7)
    queries = torch.ones(8, 16)
    rows = torch.randn(300, 16, generator=gen)
    rows[:70] = -math.inf  # group 0: 70 rows (5 tiles, the last partial)
    bounds = ([0, 4], [4, 8], [0, 70], [70, 300])
    scores, positions = gt.group_topk(queries, rows, *bounds, 3, **SMALL)
    want_scores, want_positions = gt.group_topk_reference(queries, rows, *bounds, 3)
    assert ((positions[:4] >= 0) & (positions[:4] < 70)).all()
    assert (scores[:4] == -math.inf).all()
    assert torch.equal(positions[4:], want_positions[4:])
    torch.testing.assert_close(scores[4:], want_scores[4:])
