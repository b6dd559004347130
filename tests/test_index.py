"""Class index backends against exact search, on the CPU (FAISS is a test dependency)."""

import logging
import math
import sys

import pytest
import torch

from hydrahead.head import index as index_mod
from hydrahead.head.index import exact_topk, make_index, recall_at_k

NUM_ROWS, DIM, NUM_QUERIES, K = 20_000, 32, 200, 10

# kind, options, least recall@K on random data against exact search
BACKENDS = [
    ("torch", dict(index_type="flat"), 1.0),
    ("torch", dict(index_type="ivf", nlist=64, nprobe=32), 0.9),
    ("faiss", dict(index_type="flat"), 1.0),
    ("faiss", dict(index_type="ivf", nlist=64, nprobe=32), 0.9),
    ("faiss", dict(index_type="hnsw", hnsw_m=16), 0.9),
]
BACKEND_IDS = ["torch_flat", "torch_ivf", "faiss_flat", "faiss_ivf", "faiss_hnsw"]


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(NUM_ROWS, DIM, generator=gen)
    queries = torch.randn(NUM_QUERIES, DIM, generator=gen)
    return weight, queries, exact_topk(queries, weight, K)


def scores_of(queries, weight, rows):
    """Inner products of each query with its own rows (rows >= 0)."""
    return torch.einsum("bd,bkd->bk", queries.double(), weight.double()[rows]).float()


# ---------------------------------------------------------------- exact reference, recall


@pytest.mark.parametrize("k", [1, 7, 300])
def test_exact_topk_matches_full_topk(k):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(1000, 24, generator=gen, dtype=torch.float64)
    queries = torch.randn(13, 24, generator=gen, dtype=torch.float64)
    # 1000 rows in chunks of 128: a partial last chunk, and k=300 spans several chunks.
    scores, rows = exact_topk(queries, weight, k, chunk_size=128)
    want_scores, want_rows = (queries @ weight.T).topk(k, dim=1)
    assert scores.dtype == torch.float64 and rows.dtype == torch.int64
    torch.testing.assert_close(scores, want_scores)
    assert torch.equal(rows, want_rows)


def test_exact_topk_clamps_k():
    weight, queries = torch.randn(5, 4), torch.randn(3, 4)
    scores, rows = exact_topk(queries, weight, 50, chunk_size=2)
    assert scores.shape == rows.shape == (3, 5)
    assert torch.equal(rows.sort(dim=1).values, torch.arange(5).expand(3, 5))


def test_recall_at_k():
    exact = torch.tensor([[0, 1], [2, 3]])
    assert recall_at_k(torch.tensor([[1, 0], [3, 2]]), exact) == 1.0
    assert recall_at_k(torch.tensor([[1, 9], [-1, -1]]), exact) == 0.25
    assert recall_at_k(torch.tensor([[5, 6, 0], [7, 8, 9]]), exact) == 0.25


# ---------------------------------------------------------------- backends vs exact search


@pytest.mark.parametrize("kind,options,min_recall", BACKENDS, ids=BACKEND_IDS)
def test_backend_recall_and_scores(data, kind, options, min_recall):
    weight, queries, (_, exact_rows) = data
    index = make_index(kind, **options)
    index.build(weight)
    scores, rows = index.search(queries, K)
    assert scores.shape == rows.shape == (NUM_QUERIES, K)
    assert scores.dtype == torch.float32 and rows.dtype == torch.int64
    assert recall_at_k(rows, exact_rows) >= min_recall
    if min_recall == 1.0:
        assert torch.equal(rows, exact_rows)
    assert (rows >= 0).all()
    torch.testing.assert_close(scores, scores_of(queries, weight, rows), rtol=1e-4, atol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all(), "results must be best first"


@pytest.mark.parametrize("kind,options,min_recall", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("cosine", [False, True])
def test_building_and_searching_leave_the_rows_and_queries_untouched(kind, options, min_recall, cosine):
    """A float32 CPU shard is the head's own memory: an index may read it, never write it
    (FAISS normalises its input in place for cosine scores)."""
    gen = torch.Generator().manual_seed(5)
    weight, queries = 3 * torch.randn(500, 16, generator=gen), torch.randn(7, 16, generator=gen)
    weight_before, queries_before = weight.clone(), queries.clone()
    index = make_index(kind, cosine=cosine, **{**options, "nlist": 8} if "nlist" in options else options)
    index.build(weight)
    index.search(queries, 5, weight)
    assert torch.equal(weight, weight_before) and torch.equal(queries, queries_before)


@pytest.mark.parametrize("kind,options,min_recall", BACKENDS, ids=BACKEND_IDS)
def test_backend_clamps_k(kind, options, min_recall):
    weight, queries = torch.randn(50, 8), torch.randn(4, 8)
    if "nlist" in options:
        options = {**options, "nlist": 4}  # 4 lists, all probed: every row is a candidate
    index = make_index(kind, **options)
    index.build(weight)
    scores, rows = index.search(queries, 100)
    assert scores.shape == rows.shape == (4, 50)
    if min_recall == 1.0:
        assert torch.equal(rows.sort(dim=1).values, torch.arange(50).expand(4, 50))


def test_torch_ivf_rescores_with_current_weights(data):
    weight, queries, _ = data
    index = make_index("torch", "ivf", nlist=64, nprobe=4)
    index.build(weight)
    _, old_rows = index.search(queries[:1], K)
    # Turn the current 10th-best candidate of query 0 into its best match by far.
    current = weight.clone()
    target = old_rows[0, -1].item()
    current[target] = 100 * queries[0]
    scores, rows = index.search(queries, K, weight=current)
    assert rows[0, 0].item() == target
    torch.testing.assert_close(scores, scores_of(queries, current, rows), rtol=1e-4, atol=1e-3)
    # Without current weights it scores with its own build-time copy, not the caller's tensor.
    weight_before = weight.clone()
    weight.mul_(-1)
    try:
        scores, rows = index.search(queries, K)
    finally:
        weight.mul_(-1)
    assert rows[0, 0].item() != target
    torch.testing.assert_close(scores, scores_of(queries, weight_before, rows), rtol=1e-4, atol=1e-4)


def test_faiss_rescores_with_current_weights(data):
    weight, queries, _ = data
    index = make_index("faiss", "flat")
    index.build(weight)
    _, old_rows = index.search(queries, K)
    current = weight.clone()
    current[old_rows[:, -1]] *= 3  # lift each query's 10th best above the others
    scores, rows = index.search(queries, K, weight=current)
    torch.testing.assert_close(scores, scores_of(queries, current, rows), rtol=1e-4, atol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert not torch.equal(rows, old_rows)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_missing_results_are_minus_one_with_minus_inf(backend):
    gen = torch.Generator().manual_seed(2)
    weight, queries = torch.randn(200, 8, generator=gen), torch.randn(16, 8, generator=gen)
    # 50 lists of ~4 rows, one probed: far fewer candidates than k.
    index = make_index(backend, "ivf", nlist=50, nprobe=1)
    index.build(weight)
    scores, rows = index.search(queries, 30)
    assert scores.shape == rows.shape == (16, 30)
    missing = rows < 0
    assert missing.any() and (rows >= -1).all()
    assert torch.equal(missing, scores == -math.inf)
    # Missing slots only trail the found ones.
    assert (missing[:, :-1] <= missing[:, 1:]).all()
    found = scores_of(queries, weight, rows.clamp(min=0))
    torch.testing.assert_close(scores[~missing], found[~missing], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- auto and errors


def test_auto_picks_faiss_and_logs(data, caplog):
    weight, queries, (_, exact_rows) = data
    index = make_index("auto")
    with caplog.at_level(logging.INFO, logger="hydrahead.index"):
        index.build(weight)
    assert "faiss_flat" in caplog.text
    assert index.name == "auto:faiss_flat"
    _, rows = index.search(queries, K)
    assert recall_at_k(rows, exact_rows) == 1.0


@pytest.mark.parametrize("num_rows,expected", [(300, "torch_flat"), (3000, "torch_ivf")])
def test_auto_without_faiss_picks_torch_by_size(monkeypatch, caplog, num_rows, expected):
    monkeypatch.setattr(index_mod, "faiss_available", lambda: False)
    weight, queries = torch.randn(num_rows, 8), torch.randn(5, 8)
    index = make_index("auto", exact_max_rows=1000)
    with caplog.at_level(logging.INFO, logger="hydrahead.index"):
        index.build(weight)
    assert f"index backend: {expected} " in caplog.text
    assert index.name == f"auto:{expected}"
    scores, rows = index.search(queries, 3)
    assert rows.shape == (5, 3) and (rows >= 0).all()
    torch.testing.assert_close(scores, scores_of(queries, weight, rows), rtol=1e-4, atol=1e-4)


def test_missing_faiss_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match=r"hydrahead\[faiss-cpu\]"):
        make_index("faiss")


@pytest.mark.parametrize(
    "backend, index_type", [("auto", "auto"), ("faiss", "auto"), ("torch", "flat"), ("torch", "ivf")]
)
def test_search_errors(backend, index_type):
    index = make_index(backend, index_type)
    with pytest.raises(RuntimeError, match="before build"):
        index.search(torch.randn(2, 8), 3)
    with pytest.raises(ValueError, match="2-D"):
        index.build(torch.randn(10))
    index.build(torch.randn(40, 8))
    with pytest.raises(ValueError, match="k must be"):
        index.search(torch.randn(2, 8), 0)
    with pytest.raises(ValueError, match=r"queries must be \(B, 8\)"):
        index.search(torch.randn(2, 9), 3)
    with pytest.raises(ValueError, match="current weight"):
        index.search(torch.randn(2, 8), 3, weight=torch.randn(41, 8))


def test_make_index_rejects_bad_options():
    with pytest.raises(ValueError, match="index backend"):
        make_index("annoy")
    with pytest.raises(ValueError, match="metric"):
        make_index("torch", metric="cosine")
    with pytest.raises(ValueError, match="index_type"):
        make_index("faiss", "pq")
    with pytest.raises(ValueError, match="needs the faiss backend"):
        make_index("torch", "hnsw")
    with pytest.raises(ValueError, match="nprobe"):
        make_index("torch", "ivf", nprobe=0)
    with pytest.raises(ValueError, match="k must be"):
        exact_topk(torch.randn(2, 4), torch.randn(5, 4), 0)
    with pytest.raises(ValueError, match="share D"):
        exact_topk(torch.randn(2, 4), torch.randn(5, 3), 1)


@pytest.mark.parametrize("num_rows, count", [(1000, 100), (1000, 400), (50, 50), (10, 0)])
def test_sample_rows_draws_distinct_rows_reproducibly(num_rows, count):
    sample = index_mod.sample_rows(num_rows, count, seed=3)
    assert sample.numel() == count and sample.unique().numel() == count
    assert count == 0 or (int(sample.min()) >= 0 and int(sample.max()) < num_rows)
    assert torch.equal(sample, index_mod.sample_rows(num_rows, count, seed=3))
    if 0 < count < num_rows:
        assert not torch.equal(sample, index_mod.sample_rows(num_rows, count, seed=4))
    with pytest.raises(ValueError, match="distinct rows"):
        index_mod.sample_rows(num_rows, num_rows + 1, seed=0)


def test_sample_rows_includes_every_row_equally_often():
    # 3,000 draws of 10 rows out of 100 (the draws-with-repeats path): each row is expected
    # 300 times; a chi-square over the 100 rows (99 degrees of freedom, sd 14) stays under
    # 99 + 6 sd unless the sample favours some rows (taking the 10 smallest distinct draws
    # gives thousands).
    counts = torch.zeros(100)
    for seed in range(3000):
        counts[index_mod.sample_rows(100, 10, seed)] += 1
    expected = 3000 * 10 / 100
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 99 + 6 * math.sqrt(2 * 99), chi_square


# ---------------------------------------------------------------- paced builds


@pytest.mark.parametrize("slice_rows", [1, 7, 1000, 1 << 20])
def test_list_table_slice_by_slice_equals_one_sort(slice_rows):
    """Each list holds its rows in ascending order, padded with -1, however the rows are sliced."""
    gen = torch.Generator().manual_seed(slice_rows)
    assign = torch.randint(0, 13, (1000,), generator=gen)
    assign[assign == 5] = 4  # an empty list
    table = index_mod._padded_lists(assign, 13, slice_rows)
    counts = torch.bincount(assign, minlength=13)
    assert table.shape == (13, int(counts.max()))
    for lst in range(13):
        rows = torch.nonzero(assign == lst).squeeze(1)
        assert torch.equal(table[lst, : rows.numel()], rows)
        assert bool((table[lst, rows.numel() :] == -1).all())


class _CountingStream:
    """Stands in for the worker's CUDA stream: counts the waits a paced build makes."""

    def __init__(self):
        self.waits = 0

    def synchronize(self):
        self.waits += 1


def test_a_paced_build_waits_after_every_piece_and_builds_the_same_index(monkeypatch):
    monkeypatch.setattr(index_mod, "_COPY_ROWS", 3000)
    monkeypatch.setattr(index_mod, "_LIST_ROWS", 4000)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(NUM_ROWS, DIM, generator=gen)
    plain = index_mod.TorchIVFIndex(nlist=64, num_iters=3, seed=2)
    plain.build(weight)
    stream = _CountingStream()
    with index_mod.paced(stream):
        paced = index_mod.TorchIVFIndex(nlist=64, num_iters=3, seed=2)
        paced.build(weight)
    assert index_mod._PACING.stream is None  # the context leaves no pacing behind
    # pieces: 7 slices of the copy, 3 k-means passes over the 4,096-row sample (one chunk
    # each) and their ends, 1 chunk filing the 20,000 rows, 5 slices of the list table
    assert stream.waits >= 7 + 3 * 2 + 1 + 5
    for name in ("_centroids", "_assign", "_table", "_weight"):
        assert torch.equal(getattr(paced, name), getattr(plain, name)), name
    moved = weight.clone()
    rows = torch.arange(0, NUM_ROWS, 97)
    moved[rows] += 0.5
    stream.waits = 0
    with index_mod.paced(stream):
        refiled = paced.reassigned(moved, rows)
    assert stream.waits >= 7 + 1 + 5
    assert torch.equal(refiled._table, plain.reassigned(moved, rows)._table)


# ---------------------------------------------------------------- list-grouped search (graph builds)


@pytest.mark.parametrize("cosine", [False, True])
def test_list_grouped_search_probing_every_list_is_exact(cosine):
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(3000, 16, generator=gen, dtype=torch.float64) * torch.rand(3000, 1, generator=gen)
    index = make_index("torch", "ivf", nlist=12, nprobe=12, cosine=cosine, copy_weights=False)
    index.build(weight)
    order = index.rows_by_list()
    assert sorted(order.tolist()) == list(range(3000))
    queries = weight[order[:700]]  # the first lists' rows, as a graph build takes them
    queries = torch.nn.functional.normalize(queries, dim=1) if cosine else queries
    # small pieces: a group's queries are scored in several products
    scores, rows = index.search_by_list_groups(queries, 9, weight, score_bytes=4 * 3000 * 50)
    unit = torch.nn.functional.normalize(weight, dim=1) if cosine else weight
    want_scores, want_rows = (queries @ unit.T).topk(9, dim=1)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-6, atol=1e-6)


def test_list_grouped_search_takes_the_best_of_its_neighbourhood():
    """With fewer lists probed, each query's results are the best rows of the nprobe lists
    nearest its own list (its group's neighbourhood). On rows with cluster structure that
    finds fewer exact neighbours than each query's own probes (0.83 against 0.93 here at 4
    of 64 lists): a query near its list's border misses the lists beyond it. Four times the
    lists make up for it."""
    gen = torch.Generator().manual_seed(6)
    centres = torch.randn(400, DIM, generator=gen)
    members = torch.randint(0, 400, (NUM_ROWS,), generator=gen)
    weight = centres[members] + 0.4 * torch.randn(NUM_ROWS, DIM, generator=gen)
    index = make_index("torch", "ivf", nlist=64, nprobe=4, copy_weights=False)
    index.build(weight)
    queries = weight[index.rows_by_list()[5000:6000]]
    scores, rows = index.search_by_list_groups(queries, K, weight)
    nearest = (queries @ index._centroids.T).argmax(1)
    hood = index_mod._list_neighbourhoods(index._centroids, nearest, 4)
    assert torch.equal(hood[:, 0], nearest)
    for q in range(0, 1000, 97):
        candidates = index._table[hood[q]].reshape(-1)
        candidates = candidates[candidates >= 0]
        want = (weight[candidates] @ queries[q]).topk(K)
        assert torch.equal(rows[q], candidates[want.indices])
    exact = exact_topk(queries, weight, K)[1]
    grouped = recall_at_k(rows, exact)
    probed = recall_at_k(index.search(queries, K, weight)[1], exact)
    assert 0.75 < grouped < probed
    wider = make_index("torch", "ivf", nlist=64, nprobe=16, copy_weights=False)
    wider.build(weight)
    assert recall_at_k(wider.search_by_list_groups(queries, K, weight)[1], exact) >= probed


def test_list_grouped_search_pads_past_a_short_neighbourhood():
    """A neighbourhood with fewer candidates than k returns them all, then -1 rows with -inf
    scores; candidate counts that are not a multiple of the product's padding never return
    a padding row."""
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(90, 8, generator=gen, dtype=torch.float64)
    index = make_index("torch", "ivf", nlist=9, nprobe=1, copy_weights=False)
    index.build(weight)
    queries = weight[index.rows_by_list()]
    scores, rows = index.search_by_list_groups(queries, 20, weight)
    nearest = (queries.float() @ index._centroids.T).argmax(1)  # as the search: float32 queries
    for q in range(queries.shape[0]):
        members = index._table[nearest[q]]
        members = members[members >= 0]
        take = min(20, members.numel())
        want = (weight[members] @ queries[q]).topk(take)
        assert torch.equal(rows[q, :take], members[want.indices])
        torch.testing.assert_close(scores[q, :take].double(), want.values, rtol=1e-6, atol=1e-6)
        assert (rows[q, take:] == -1).all() and (scores[q, take:] == -math.inf).all()
    assert (index._lengths % 8 != 0).any() and (index._lengths < 20).any()  # both cases met


def test_list_grouped_search_of_an_empty_neighbourhood_finds_nothing():
    """Queries whose nearest list and whole neighbourhood hold no rows (a list emptied after
    the build) get -1 rows and -inf scores; the other groups are searched as before."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(400, 16, generator=gen)
    index = make_index("torch", "ivf", nlist=8, nprobe=1, copy_weights=False)
    index.build(weight)
    queries = weight[index.rows_by_list()]
    before_scores, before_rows = index.search_by_list_groups(queries, 5, weight)
    nearest = (queries @ index._centroids.T).argmax(1)
    emptied = int(nearest[0])
    index._table[emptied] = -1
    index._lengths[emptied] = 0
    scores, rows = index.search_by_list_groups(queries, 5, weight)
    hit = nearest == emptied
    assert hit.any() and (~hit).any()
    assert (rows[hit] == -1).all() and (scores[hit] == -math.inf).all()
    assert torch.equal(rows[~hit], before_rows[~hit]) and torch.equal(scores[~hit], before_scores[~hit])


def test_list_grouped_search_takes_fp8_rows_with_cosine_scores():
    gen = torch.Generator().manual_seed(7)
    weight = (torch.randn(2000, 16, generator=gen) * 2).to(torch.float8_e4m3fn)
    index = make_index("torch", "ivf", nlist=8, nprobe=8, cosine=True, copy_weights=False)
    index.build(weight)
    queries = torch.nn.functional.normalize(weight[index.rows_by_list()[:300]].float(), dim=1)
    scores, rows = index.search_by_list_groups(queries, 5, weight)
    unit = torch.nn.functional.normalize(weight.double(), dim=1)
    want_scores, want_rows = (queries.double() @ unit.T).topk(5, dim=1)
    assert torch.equal(rows[:, 0], want_rows[:, 0])  # each row finds itself first
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_by_blocks_finds_the_same_scores_as_topk(seed):
    from hydrahead.head.index import topk_by_blocks

    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(37, 64 * 40, generator=gen, dtype=torch.float64)
    scores[:, -50:] = -math.inf  # a padded tail
    scores[3] = scores[3].round(decimals=1)  # many ties
    scores[5, 128:192] += 10.0  # the best all in one block
    want_values, _ = scores.topk(17, dim=1)
    values, positions = topk_by_blocks(scores, 17)
    assert torch.equal(values, want_values)
    assert torch.equal(scores.gather(1, positions), values)  # each position holds its score
    assert all(len(set(row.tolist())) == 17 for row in positions)  # no score taken twice
    assert set(positions[5].tolist()) == set(scores[5].topk(17).indices.tolist())
    short_values, _ = topk_by_blocks(scores[:, :1000], 17)  # not a multiple of the block: plain top-k
    assert torch.equal(short_values, scores[:, :1000].topk(17, dim=1).values)


def test_grouped_search_by_blocks_finds_what_the_plain_top_k_finds(monkeypatch):
    """Groups padded to a multiple of the block and searched by ``topk_by_blocks`` give the
    same scores and rows as the plain top-k over the same candidates."""
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(NUM_ROWS, DIM, generator=gen, dtype=torch.float64)
    index = make_index("torch", "ivf", nlist=16, nprobe=4, copy_weights=False)
    index.build(weight)
    queries = weight[index.rows_by_list()[:3000]]
    monkeypatch.setattr(index_mod, "TOPK_BLOCK", 0)
    plain_scores, plain_rows = index.search_by_list_groups(queries, 7, weight)
    monkeypatch.setattr(index_mod, "TOPK_BLOCK", 32)
    monkeypatch.setattr(index_mod, "TOPK_BLOCK_MIN_CANDIDATES", 0)
    calls = []
    blocks = index_mod.topk_by_blocks

    def spy(scores, k, block):
        calls.append((scores.shape[1], block))
        return blocks(scores, k, block)

    monkeypatch.setattr(index_mod, "topk_by_blocks", spy)
    scores, rows = index.search_by_list_groups(queries, 7, weight)
    assert calls and all(length % 32 == 0 and block == 32 for length, block in calls)
    assert torch.equal(scores, plain_scores) and torch.equal(rows, plain_rows)


@pytest.mark.parametrize("cosine", [False, True])
def test_grouped_search_in_small_pieces_equals_one_piece(monkeypatch, cosine):
    """The groups' candidates are gathered piece by piece (a bound on the rows gathered at
    once); pieces of a few groups, each group its own padded run, find the same as one."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(NUM_ROWS, DIM, generator=gen, dtype=torch.float64) * (
        1 + torch.rand(NUM_ROWS, 1, generator=gen)
    )
    index = make_index("torch", "ivf", nlist=64, nprobe=3, copy_weights=False, cosine=cosine)
    index.build(weight)
    queries = torch.nn.functional.normalize(weight[index.rows_by_list()[::7]], dim=1)
    whole = index.search_by_list_groups(queries, 9, weight)
    monkeypatch.setattr(index_mod, "_PIECE_CANDIDATES", 700)  # about one group a piece, some alone over it
    pieces = index.search_by_list_groups(queries, 9, weight)
    assert torch.equal(pieces[0], whole[0]) and torch.equal(pieces[1], whole[1])
    exact = (queries @ (torch.nn.functional.normalize(weight, dim=1) if cosine else weight).T).topk(9)
    assert recall_at_k(pieces[1], exact.indices) > 0.1  # a search, not noise (random rows: 0.001)


def test_paced_grouped_search_waits_after_each_piece_and_finds_the_same(monkeypatch):
    """A background (paced) build waits for its stream after each piece of a grouped search,
    so it never queues more than one piece ahead of a training step; the rows found are those
    of the unpaced search."""
    gen = torch.Generator().manual_seed(10)
    weight = torch.randn(NUM_ROWS, DIM, generator=gen, dtype=torch.float64)
    index = make_index("torch", "ivf", nlist=64, nprobe=3, copy_weights=False)
    index.build(weight)
    queries = weight[index.rows_by_list()[::5]]
    stream = _CountingStream()
    pieces, waits_before, search_piece = [], [], index_mod.TorchIVFIndex._search_piece

    def recording(self, piece, *args):
        pieces.append(len(piece))
        waits_before.append(stream.waits)
        return search_piece(self, piece, *args)

    monkeypatch.setattr(index_mod.TorchIVFIndex, "_search_piece", recording)
    monkeypatch.setattr(index_mod, "_PIECE_CANDIDATES", 700)  # about one group a piece
    whole = index.search_by_list_groups(queries, 9, weight)
    assert len(pieces) > 10
    unpaced_pieces, pieces[:], waits_before[:] = list(pieces), [], []
    with index_mod.paced(stream):
        paced = index.search_by_list_groups(queries, 9, weight)
    assert pieces == unpaced_pieces
    assert all(b > a for a, b in zip(waits_before, waits_before[1:])), waits_before  # a wait between pieces
    assert stream.waits > waits_before[-1]  # and after the last
    assert torch.equal(paced[0], whole[0]) and torch.equal(paced[1], whole[1])


def test_topk_blocks_benchmark_dry_run_writes_its_rows(tmp_path, monkeypatch):
    """benchmarks/topk_blocks.py on the CPU: every method and shape, the same values as
    torch.topk, the results JSON's fields; a block top-k that found other values fails it."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import topk_blocks

    monkeypatch.setenv("HYDRAHEAD_RESULTS_DIR", str(tmp_path))
    topk_blocks.main(["--dry-run", "--reps", "1", "--blocks", "64,128"])
    payload = json.loads((tmp_path / "topk_blocks.json").read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= payload.keys()
    assert len(payload["rows"]) == 2 * 3 and all(row["same_values"] for row in payload["rows"])
    assert {"method", "shape", "ms", "floor_ms", "ratio", "peak_mib"} <= payload["rows"][0].keys()
    monkeypatch.setattr(topk_blocks, "topk_by_blocks", lambda s, k, b: (s.topk(k, dim=1).values + 1, None))
    with pytest.raises(SystemExit, match="other values"):
        topk_blocks.main(["--dry-run", "--reps", "1", "--blocks", "64"])
