"""Active-class selection end to end: the IVF scoring kernel, the index backends, the
selector (rows, rebuilds, recall, index state), equality with the full head, and the
trainer through torchrun (metrics, world-size independence, deterministic resume)."""

from __future__ import annotations

import math
import shutil
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_ranks
from launcher import cpu_hog, launch, launch_together, metrics, train_losses
from selector_timing import slow_background_builds, timed_steps

from hydrahead.head import ShardedClassifier
from hydrahead.head import index as index_mod
from hydrahead.head.active import ActiveClassSelector, resolve_index
from hydrahead.head.index import TorchExactIndex, TorchIVFIndex, _padded_lists, exact_topk, make_index, recall_at_k
from hydrahead.head.selection import knn_active, owned_positives, resolve_budget, without_own_label
from hydrahead.kernels.ivf_scores import list_pairs, probed_list_scores
from hydrahead.train.checkpoint import latest_checkpoint


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact_rows64(queries, weight, k, cosine):
    """Reference top-k local rows in float64 (cosine: both sides normalised)."""
    q, w = queries.double(), weight.double()
    if cosine:
        q, w = F.normalize(q, dim=1), F.normalize(w, dim=1)
    return (q @ w.T).topk(min(k, w.shape[0]), dim=1).indices


def _scores64(queries, weight, rows, cosine):
    """float64 score of each query with its own rows (rows >= 0)."""
    q, w = queries.double(), weight.double()
    if cosine:
        q, w = F.normalize(q, dim=1), F.normalize(w, dim=1)
    return torch.einsum("bd,bkd->bk", q, w[rows])


# ========================================================================================
# 1. probed_list_scores (Triton; the interpreter on CPU) against a torch reference
# ========================================================================================


def _kernel_problem(seed, num_rows, dim, batch, nlist, nprobe):
    gen = _gen(seed)
    weight = torch.randn(num_rows, dim, generator=gen)
    weight[5] = 0.0  # a zero row: its cosine is 0, not NaN
    queries = torch.randn(batch, dim, generator=gen)
    # Unequal lists (list 0 gets about half the rows), every list non-empty.
    assign = torch.where(
        torch.rand(num_rows, generator=gen) < 0.5, 0, torch.randint(0, nlist, (num_rows,), generator=gen)
    )
    assign[:nlist] = torch.arange(nlist)
    probes = torch.stack([torch.randperm(nlist, generator=gen)[:nprobe] for _ in range(batch)])
    return weight, queries, assign, probes


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(
    "num_rows,dim,batch,nlist,nprobe",
    # the second: lists > 64 rows, > 16 queries per list; the third also D > 128 (several dim steps)
    [(300, 40, 21, 7, 3), (301, 70, 37, 3, 2), (260, 150, 40, 2, 2)],
)
def test_probed_list_scores_match_torch_reference(num_rows, dim, batch, nlist, nprobe, normalize):
    weight, queries, assign, probes = _kernel_problem(num_rows + dim, num_rows, dim, batch, nlist, nprobe)
    if normalize:
        queries = F.normalize(queries, dim=1)
    table = _padded_lists(assign, nlist)
    max_len = table.shape[1]
    assert table.shape[0] == nlist and max_len == int(torch.bincount(assign).max())
    out = probed_list_scores(weight, queries, table, probes, normalize=normalize)
    assert out.shape == (batch, nprobe * max_len) and out.dtype == torch.float32

    rows = table[probes]  # (B, nprobe, max_len): each query's probed lists, -1 padding
    w = F.normalize(weight.double(), dim=1) if normalize else weight.double()
    ref = torch.einsum("bpld,bd->bpl", w[rows.clamp(min=0)], queries.double())
    ref = ref.masked_fill(rows < 0, -math.inf).reshape(batch, -1)
    padding = ref == -math.inf
    assert torch.equal(out == -math.inf, padding)
    torch.testing.assert_close(out.double()[~padding], ref[~padding], rtol=1e-5, atol=1e-5)
    zero_row = rows.reshape(batch, -1) == 5
    assert zero_row.any() and (out[zero_row] == 0).all()


def test_probed_list_scores_with_given_row_norms():
    """Cosine scores from norms the caller keeps equal the ones summed in the kernel's pass,
    and the kernel really reads them (wrong norms give wrong scores)."""
    weight, queries, assign, probes = _kernel_problem(7, 260, 150, 40, 4, 2)
    queries = F.normalize(queries, dim=1)
    table = _padded_lists(assign, 4)
    inv = torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12).reciprocal()
    summed = probed_list_scores(weight, queries, table, probes, normalize=True)
    given = probed_list_scores(weight, queries, table, probes, normalize=True, inv_norms=inv)
    torch.testing.assert_close(given, summed, rtol=1e-5, atol=1e-6)
    halved = probed_list_scores(weight, queries, table, probes, normalize=True, inv_norms=inv / 2)
    finite = torch.isfinite(summed) & (summed != 0)
    torch.testing.assert_close(halved[finite], summed[finite] / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inv_norms"):
        probed_list_scores(weight, queries, table, probes, normalize=True, inv_norms=inv[:-1])


def test_row_norms_follow_the_rows_each_step_updates():
    from hydrahead.head.active import RowNorms

    gen = _gen(8)
    weight = torch.randn(1000, 24, generator=gen)
    exact = lambda: torch.linalg.vector_norm(weight, dim=1).reciprocal()  # noqa: E731
    norms = RowNorms()
    torch.testing.assert_close(norms.current(weight, 0), exact())
    for _ in range(3):  # a step: its active rows are announced, then change
        rows = torch.unique(torch.randint(0, 1000, (50,), generator=gen))
        norms.will_update(rows)
        weight[rows] *= 1.5 + torch.rand(rows.numel(), 1, generator=gen)
        torch.testing.assert_close(norms.current(weight, 0), exact())
    weight[:10] *= 3.0  # rows moved outside any step (a settle): only a new rows_moved count shows it
    assert not torch.allclose(norms.current(weight, 0), exact())
    torch.testing.assert_close(norms.current(weight, 1), exact())


def test_list_pairs_is_a_consistent_csr():
    gen = _gen(11)
    batch, nprobe, nlist = 29, 4, 9
    probes = torch.stack([torch.randperm(nlist, generator=gen)[:nprobe] for _ in range(batch)])
    pair_ptr, pair_query, pair_slot = list_pairs(probes, nlist)
    assert pair_ptr.shape == (nlist + 1,) and pair_ptr[0] == 0 and pair_ptr[-1] == batch * nprobe
    assert (pair_ptr[1:] >= pair_ptr[:-1]).all()
    assert pair_query.dtype == pair_slot.dtype == torch.int32
    seen = set()
    for lst in range(nlist):
        lo, hi = int(pair_ptr[lst]), int(pair_ptr[lst + 1])
        assert hi - lo == int((probes == lst).sum())
        queries = pair_query[lo:hi].long()
        assert (queries[1:] >= queries[:-1]).all(), "pairs of a list in query order"
        for q, s in zip(queries.tolist(), pair_slot[lo:hi].tolist()):
            assert int(probes[q, s]) == lst
            seen.add((q, s))
    assert len(seen) == batch * nprobe  # every (query, slot) pair exactly once


def test_ivf_list_kernel_path_matches_the_gathered_path():
    """The GPU search path (kernel + top-k + row lookup) run on the CPU through the interpreter."""
    gen = _gen(12)
    weight, queries = torch.randn(300, 24, generator=gen), F.normalize(torch.randn(19, 24, generator=gen), dim=1)
    for cosine in (False, True):
        index = TorchIVFIndex(nlist=9, nprobe=3, cosine=cosine, copy_weights=False)
        index.build(weight)
        probes = (queries @ index._centroids.T).topk(3, dim=1).indices
        for k in (5, 200):  # 200: more than the candidates, so -1 / -inf slots
            s1, r1 = index._search_lists(queries, k, weight, probes, None)
            s2, r2 = index._search_gathered(queries, k, weight, probes)
            assert torch.equal(r1.sort(dim=1).values, r2.sort(dim=1).values)
            torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
            assert torch.equal(r1 < 0, s1 == -math.inf)


# ========================================================================================
# 2. Torch backends without a weight copy: errors, cosine scores, state round trip
# ========================================================================================


def test_torch_ivf_without_weight_copy():
    gen = _gen(21)
    weight = torch.randn(500, 16, generator=gen) * torch.rand(500, 1, generator=gen) * 3  # unequal norms
    queries = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    index = TorchIVFIndex(nlist=12, nprobe=4, seed=3, cosine=True, copy_weights=False)
    with pytest.raises(RuntimeError, match="before build"):
        index.state_dict()
    index.build(weight)
    assert index._weight is None, "copy_weights=False must keep no copy of the weights"
    with pytest.raises(ValueError, match="copy_weights=False.*current weights"):
        index.search(queries, 5)

    scores, rows = index.search(queries, 5, weight)
    assert (rows >= 0).all()
    torch.testing.assert_close(scores.double(), _scores64(queries, weight, rows, cosine=True), rtol=0, atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # Not the inner products: the norms differ, so cosine and dot order disagree somewhere.
    assert not torch.allclose(scores.double(), _scores64(queries, weight, rows, cosine=False), atol=1e-3)

    # Restore into an index built with other options, over weights that have moved on: the
    # lists come from the state (a rebuild would cluster the new weights), so searches match.
    state = {name: t.clone() for name, t in index.state_dict().items()}
    assert set(state) == {"centroids", "assign"} and state["centroids"].shape == (12, 16)
    moved = weight + torch.randn(weight.shape, generator=gen)
    restored = TorchIVFIndex(nlist=5, nprobe=4, seed=99, cosine=True, copy_weights=False)
    restored.load_state_dict(state, moved)
    for current in (weight, moved):
        s_a, r_a = index.search(queries, 7, current)
        s_b, r_b = restored.search(queries, 7, current)
        assert torch.equal(r_a, r_b) and torch.equal(s_a, s_b)
    rebuilt = TorchIVFIndex(nlist=12, nprobe=4, seed=3, cosine=True, copy_weights=False)
    rebuilt.build(moved)
    assert not torch.equal(rebuilt.state_dict()["assign"], state["assign"])  # so the check above can fail

    fresh = TorchIVFIndex(nprobe=4, cosine=True, copy_weights=False)
    bad_states = [
        {"centroids": state["centroids"][:, :15], "assign": state["assign"]},  # wrong D
        {"centroids": state["centroids"], "assign": state["assign"][:-1]},  # wrong number of rows
        {"centroids": state["centroids"][0], "assign": state["assign"]},  # 1-D centroids
    ]
    for bad in bad_states:
        with pytest.raises(ValueError, match="does not fit"):
            fresh.load_state_dict(bad, weight)
    with pytest.raises(ValueError, match="does not fit"):
        fresh.load_state_dict(state, weight[:-3])  # weights of another shard size


def _ip_lists64(weight, centroids, cosine):
    """Each row's list by the filing rule of the torch IVF index: the centroid of highest inner product."""
    w = F.normalize(weight.double(), dim=1) if cosine else weight.double()
    return (w @ centroids.double().T).argmax(1)


@pytest.mark.parametrize("cosine", [False, True])
def test_torch_ivf_reassigned_files_only_the_given_rows(cosine):
    gen = _gen(24)
    weight = torch.randn(400, 16, generator=gen)
    queries = F.normalize(torch.randn(30, 16, generator=gen), dim=1)
    index = TorchIVFIndex(nlist=15, nprobe=3, seed=1, cosine=cosine, copy_weights=False)
    index.build(weight)
    before = {name: t.clone() for name, t in index.state_dict().items()}
    assert torch.equal(
        before["assign"], _ip_lists64(weight, before["centroids"], cosine)
    )  # built: filed by inner product
    old_results = index.search(queries, 6, weight)

    changed = torch.randperm(400, generator=gen)[:60]
    moved = weight.clone()
    moved[changed] = 2 * torch.randn(60, 16, generator=gen)
    new = index.reassigned(moved, changed)
    after = new.state_dict()
    assert torch.equal(after["centroids"], before["centroids"])  # no k-means
    # Only the changed rows moved, so filing them alone equals filing every row again ...
    assert torch.equal(after["assign"], _ip_lists64(moved, before["centroids"], cosine))
    assert not torch.equal(after["assign"], before["assign"])  # ... and some did change lists
    # ... and the old index is untouched (the training thread may still be searching it).
    assert torch.equal(index.state_dict()["assign"], before["assign"])
    for got, want in zip(index.search(queries, 6, weight), old_results):
        assert torch.equal(got, want)
    # Its searches probe the new lists: a changed row is found where its new list is probed.
    _, rows = new.search(queries, 400, moved)
    probes = (queries.double() @ before["centroids"].double().T).topk(3, dim=1).indices
    for q in range(30):
        found = set(rows[q][rows[q] >= 0].tolist())
        assert found == set(torch.nonzero(torch.isin(after["assign"], probes[q])).flatten().tolist())
    with pytest.raises(ValueError, match="weight must be"):
        index.reassigned(moved[:-1], changed)


def test_torch_ivf_load_rejects_list_ids_out_of_range():
    weight = torch.randn(100, 8, generator=_gen(22))
    index = TorchIVFIndex(nlist=6, copy_weights=False)
    index.build(weight)
    state = index.state_dict()
    bad = {"centroids": state["centroids"], "assign": state["assign"].clone()}
    bad["assign"][0] = 6
    with pytest.raises(ValueError, match="list ids"):
        TorchIVFIndex(copy_weights=False).load_state_dict(bad, weight)
    bad["assign"][0] = -1
    with pytest.raises(ValueError, match="list ids"):
        TorchIVFIndex(copy_weights=False).load_state_dict(bad, weight)


def test_torch_exact_without_weight_copy():
    gen = _gen(23)
    weight = torch.randn(300, 12, generator=gen) * torch.rand(300, 1, generator=gen) * 3
    queries = F.normalize(torch.randn(10, 12, generator=gen), dim=1)
    index = TorchExactIndex(cosine=True, copy_weights=False)
    index.build(weight)
    assert index.searches_current_weights and index._weight is None
    with pytest.raises(ValueError, match="copy_weights=False"):
        index.search(queries, 4)
    scores, rows = index.search(queries, 4, weight)
    assert torch.equal(rows, _exact_rows64(queries, weight, 4, cosine=True))
    torch.testing.assert_close(scores.double(), _scores64(queries, weight, rows, True), rtol=0, atol=1e-5)
    assert index.state_dict() == {}
    restored = TorchExactIndex(cosine=True, copy_weights=False)
    restored.load_state_dict({}, weight)
    assert torch.equal(restored.search(queries, 4, weight)[1], rows)
    with pytest.raises(RuntimeError, match="not saved"):
        TorchExactIndex(copy_weights=True).state_dict()


# ========================================================================================
# 3. Recall of every backend against exact search, on clustered data
# ========================================================================================

RECALL_K = 10
RECALL_BACKENDS = [
    ("torch", dict(index_type="flat"), 1.0),
    ("torch", dict(index_type="ivf", nlist=100, nprobe=20), 0.9),
    ("faiss", dict(index_type="flat"), 1.0),
    ("faiss", dict(index_type="ivf", nlist=100, nprobe=20), 0.9),
    ("faiss", dict(index_type="hnsw"), 0.9),
]


@pytest.fixture(scope="module")
def clustered():
    """4,000 rows in 40 clusters (D=32), 200 queries each near a random row."""
    gen = _gen(31)
    centers = torch.randn(40, 32, generator=gen) * 3
    weight = centers[torch.randint(0, 40, (4000,), generator=gen)] + torch.randn(4000, 32, generator=gen)
    queries = weight[torch.randint(0, 4000, (200,), generator=gen)] + 0.3 * torch.randn(200, 32, generator=gen)
    return weight, queries


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize(
    "kind,options,target", RECALL_BACKENDS, ids=["torch_flat", "torch_ivf", "faiss_flat", "faiss_ivf", "faiss_hnsw"]
)
def test_backend_recall_on_clustered_data(clustered, kind, options, target, cosine):
    pytest.importorskip("faiss")
    weight, queries = clustered
    if cosine:
        queries = F.normalize(queries, dim=1)  # the caller normalises the queries
    exact = _exact_rows64(queries, weight, RECALL_K, cosine)
    assert torch.equal(exact_topk(queries.double(), weight.double(), RECALL_K, cosine=cosine)[1], exact)
    index = make_index(kind, cosine=cosine, **options)
    index.build(weight)
    scores, rows = index.search(queries, RECALL_K)
    recall = recall_at_k(rows, exact)
    assert recall >= target, f"{kind} {options}: recall {recall}"
    if target == 1.0:
        assert recall == 1.0
    found = rows >= 0
    torch.testing.assert_close(
        scores.double()[found], _scores64(queries, weight, rows.clamp(min=0), cosine)[found], rtol=1e-4, atol=1e-4
    )
    if "nprobe" in options:  # one probed list misses neighbours in the next clusters: the target can fail
        low = make_index(kind, cosine=cosine, **{**options, "nprobe": 1})
        low.build(weight)
        assert recall_at_k(low.search(queries, RECALL_K)[1], exact) < min(target, recall)


# ========================================================================================
# 4. ActiveClassSelector on one process
# ========================================================================================

START, STOP = 100, 257  # a shard not starting at class 0: 157 rows
SHARD = STOP - START
DIM = 16


def _selector(selection="knn", **options):
    options.setdefault("recall_every", 0)
    return ActiveClassSelector(selection, START, STOP, **options)


def _batch(seed, batch=24, num_classes=400):
    """Features and global labels: about a third owned by the shard, some ignored (-100)."""
    gen = _gen(seed)
    features = torch.randn(batch, DIM, generator=gen).double()
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[::4] = torch.randint(START, STOP, (len(labels[::4]),), generator=gen)
    labels[1::7] = -100
    return features, labels


def _weight(seed, rows=SHARD):
    gen = _gen(seed)
    return torch.randn(rows, DIM, generator=gen).double() * torch.rand(rows, 1, generator=gen).double()


def test_full_and_covering_budgets_return_every_row():
    features, labels = _batch(41)
    weight = _weight(42)
    every = torch.arange(SHARD)
    full = _selector("full")
    assert full.select(1, features, labels, weight) is None and full.last["active_classes"] == SHARD
    for selection, options in [
        ("random", dict(budget=SHARD)),
        ("random", dict(budget=10 * SHARD)),
        ("random", dict(budget=1.0)),
        ("knn", dict(budget=1.0, knn_k=1, index="torch", index_type="ivf", nlist=20, nprobe=1)),
        ("knn", dict(budget=SHARD, knn_k=1, index="torch", index_type="flat")),
        ("knn", dict(knn_k=SHARD, index="torch", index_type="flat")),
        ("knn", dict(knn_k=10**6, index="torch", index_type="flat")),
        ("knn", dict(knn_k=10**6, index="faiss", index_type="flat")),
    ]:
        selector = _selector(selection, **options)
        rows = selector.select(3, features, labels, weight)
        assert torch.equal(rows, every), (selection, options)
        assert selector.last["active_classes"] == SHARD
        selector.close()


@pytest.mark.parametrize(
    "selection,options",
    [
        ("random", dict(budget=2)),  # fewer than the positives: all positives still kept
        ("random", dict(budget=0.05)),
        ("knn", dict(knn_k=1, index="torch", index_type="ivf", nlist=30, nprobe=1)),
        ("knn", dict(knn_k=1, index="torch", index_type="flat", cosine=True)),
        ("knn", dict(knn_k=2, index="faiss", index_type="hnsw", budget=0.1)),
    ],
)
def test_positives_are_always_active(selection, options):
    weight = _weight(43)
    selector = _selector(selection, **options)
    for step in range(1, 4):
        features, labels = _batch(44 + step)
        rows = selector.select(step, features, labels, weight)
        owned = labels[(labels >= START) & (labels < STOP)] - START
        assert owned.numel() >= 5
        assert set(owned.tolist()) <= set(rows.tolist())
        assert torch.equal(owned_positives(labels, START, STOP), torch.unique(owned))
        assert torch.equal(rows, torch.unique(rows)) and rows.min() >= 0 and rows.max() < SHARD
        assert rows.numel() < SHARD  # a real subset, so the positives had to be added
    selector.close()


def _first_k_but_label(rows, labels, k):
    """Each row's first k entries other than its label's local row (labels outside the shard drop nothing)."""
    kept = []
    for found, label in zip(rows.tolist(), labels.tolist()):
        own = label - START if START <= label < STOP else None
        others = [row for row in found if row != own][:k]
        kept.append(others + [-1] * (k - len(others)))
    return torch.tensor(kept, dtype=torch.long)


def test_without_own_label_matches_a_loop():
    gen = _gen(47)
    for batch, width, k in [(9, 5, 4), (16, 3, 3), (5, 1, 0), (12, 7, 2)]:
        rows = torch.randint(-1, SHARD, (batch, width), generator=gen)
        _, labels = _batch(int(torch.randint(0, 1000, (1,), generator=gen)), batch=batch)
        # Plant each owned label in its row, at a random place, as an index would return it.
        for i, label in enumerate(labels.tolist()):
            if START <= label < STOP and torch.rand(1, generator=gen) < 0.7:
                rows[i, int(torch.randint(0, width, (1,), generator=gen))] = label - START
        assert without_own_label(rows, labels, START, STOP, k)[1] is None
        scores = torch.arange(batch * width, dtype=torch.float32).reshape(batch, width)  # names its entry
        got, got_scores = without_own_label(rows, labels, START, STOP, k, scores)
        assert torch.equal(got, _first_k_but_label(rows, labels, k)), (batch, width, k)
        # Each kept row brings its own entry's score: the same k entries the loop keeps.
        for i, label in enumerate(labels.tolist()):
            own = label - START if START <= label < STOP else None
            entries = [j for j in range(width) if rows[i, j].item() != own][:k]
            want = [scores[i, j].item() for j in entries] + [float("-inf")] * (k - len(entries))
            assert got_scores[i].tolist() == want, (batch, width, k, i)
    # An ignored sample keeps its rows, even where ignore_index is a class of this shard.
    rows = torch.tensor([[4, 1, 2], [4, 1, 2]])
    got, _ = without_own_label(rows, torch.tensor([START + 4, START + 4]), START, STOP, 2, ignore_index=START + 4)
    assert got.tolist() == [[4, 1], [4, 1]]
    assert without_own_label(rows, torch.tensor([START + 4, START + 1]), START, STOP, 2)[0].tolist() == [[1, 2], [4, 2]]
    with pytest.raises(ValueError, match="at least k"):
        without_own_label(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), START, STOP, 3)
    with pytest.raises(ValueError, match="a row per label"):
        without_own_label(torch.zeros(3, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), START, STOP, 1)


def _nearest_within_loop(rows, scores, labels, size):
    """The positives plus other rows in neighbour rank order (by score within a rank), as a loop."""
    positives = sorted({y - START for y in labels.tolist() if START <= y < STOP})
    entries = [
        (rank, -score, row)
        for found, values in zip(rows.tolist(), scores.tolist())
        for rank, (row, score) in enumerate(zip(found, values))
        if row >= 0 and row not in positives
    ]
    chosen = []
    for _, _, row in sorted(entries):
        if row not in chosen and len(chosen) < size - len(positives):
            chosen.append(row)
    return torch.tensor(sorted(positives + chosen), dtype=torch.long)


def test_knn_active_trims_a_large_union_in_neighbour_rank_order():
    gen = _gen(48)
    for batch, k, budget in [(24, 3, 20), (24, 5, 40), (12, 2, 3), (24, 1, 1000), (16, 4, 0.1)]:
        _, labels = _batch(int(torch.randint(0, 1000, (1,), generator=gen)), batch=batch)
        rows = torch.randint(-1, SHARD, (batch, k), generator=gen)
        scores = torch.randn(batch, k, generator=gen, dtype=torch.float64).float()  # distinct: no ties
        size = resolve_budget(budget, SHARD)
        got = knn_active(rows, labels, START, STOP, budget, seed=1, step=2, neighbour_scores=scores)
        union = knn_active(rows, labels, START, STOP, None, seed=1, step=2)
        if union.numel() > size:
            assert torch.equal(got, _nearest_within_loop(rows, scores, labels, size)), (batch, k, budget)
            positives = owned_positives(labels, START, STOP)
            assert got.numel() == max(size, positives.numel())
        else:  # small unions are filled as without scores
            assert torch.equal(got, knn_active(rows, labels, START, STOP, budget, seed=1, step=2)), (batch, k)
    with pytest.raises(ValueError, match="shaped as the rows"):
        knn_active(rows, labels, START, STOP, 10, seed=1, step=2, neighbour_scores=scores[:, :1])


@pytest.mark.parametrize("cosine", [True, False])
def test_trimmed_knn_keeps_every_samples_hardest_negative_within_the_budget(cosine):
    k, budget = 3, 24
    options = dict(knn_k=k, index="torch", index_type="flat", cosine=cosine, budget=budget)
    trimmed, whole = _selector(trim_to_budget=True, **options), _selector(**options)
    weight = _weight(57)
    for step in range(1, 4):
        features, labels = _batch(58 + step, batch=16)
        features = features.float().double() * torch.rand(16, 1, dtype=torch.float64) * 4  # varied norms
        rows = trimmed.select(step, features, labels, weight)
        assert whole.select(step, features, labels, weight).numel() > budget  # the union alone is larger
        assert rows.numel() == budget
        # The nearest rows in float64, each sample's label skipped, then rank order within the budget.
        q, w = (F.normalize(features, dim=1), F.normalize(weight, dim=1)) if cosine else (features, weight)
        scores, found = (q @ w.T).topk(k + 1, dim=1)
        kept = _first_k_but_label(found, labels, k)
        kept_scores = torch.tensor(
            [[scores[i, found[i].tolist().index(row)].item() for row in kept[i].tolist()] for i in range(len(kept))]
        )
        assert torch.equal(rows, _nearest_within_loop(kept, kept_scores, labels, budget)), f"step {step}"
        positives = owned_positives(labels, START, STOP)
        if budget - positives.numel() >= 16:  # room for one row per sample: every hardest negative is in
            assert set(kept[:, 0].tolist()) <= set(rows.tolist())
    trimmed.close()
    whole.close()


@pytest.mark.parametrize("cosine,skip_label", [(False, True), (True, True), (True, False)])
def test_knn_flat_rows_are_exact_topk_plus_positives(cosine, skip_label):
    k, budget = 3, 40
    options = dict(knn_k=k, index="torch", index_type="flat", cosine=cosine, knn_skip_label=skip_label)
    plain = _selector(rebuild_every=2, **options)
    filled = _selector(budget=budget, **options)
    weight = _weight(51)
    for step in range(1, 6):
        features, labels = _batch(52 + step, batch=12)
        owned = (labels >= START) & (labels < STOP)
        # Owned samples sit near their label's row, so the label is among their nearest rows.
        features[owned] = weight[labels[owned] - START] + 0.3 * features[owned]
        features = features.float().double()  # the selector searches in float32: no rounding between
        if skip_label:
            exact = _first_k_but_label(_exact_rows64(features, weight, k + 1, cosine), labels, k)
        else:
            exact = _exact_rows64(features, weight, k, cosine)
        positives = labels[owned] - START
        want = torch.unique(torch.cat([exact.flatten(), positives]))
        rows = plain.select(step, features, labels, weight)
        assert torch.equal(rows, want), f"step {step}"
        assert plain.last["index_age"] == 0  # the flat index searches the current weights
        more = filled.select(step, features, labels, weight)
        assert set(want.tolist()) <= set(more.tolist())
        assert more.numel() == max(resolve_budget(budget, SHARD), want.numel())
        # Between steps the weights move; the flat index must follow them.
        weight = weight + 0.5 * _weight(60 + step)
    plain.close()
    filled.close()


def _ivf_selector(**options):
    base = dict(knn_k=4, index="torch", index_type="ivf", nlist=10, nprobe=2, cosine=True, seed=5)
    return _selector(**{**base, **options})


@pytest.mark.parametrize("every_row_moves", [False, True])
def test_rows_that_move_every_step_are_all_filed_again_at_each_rebuild(every_row_moves):
    """head.search_paid_rows: the rows searched (their owed steps paid) all move at every step,
    so a rebuild between k-means runs files every row again, not only the selected ones."""
    selector = _ivf_selector(
        deterministic=True, rebuild_every=2, retrain_every=3, knn_k=2, rows_move_every_step=every_row_moves
    )
    weights = [_weight(66)]  # weights[u]: after u updates
    filed_as_built = []
    for step in range(1, 8):
        selector.select(step, *_batch(67 + step), weights[-1])
        built = selector._current
        state = built.index.state_dict()
        filed_as_built.append(torch.equal(state["assign"], _ip_lists64(weights[built.step], state["centroids"], True)))
        drift = 0.5 * torch.randn(SHARD, DIM, generator=_gen(300 + step), dtype=torch.float64)
        weights.append(weights[-1] + drift)  # every row moves, none announced as selected
    selector.close()
    if every_row_moves:
        assert all(filed_as_built)
    else:  # the refiles of steps 2 and 4 file the selected rows only; step 1 and 6 run k-means over all
        assert filed_as_built == [True, False, False, False, False, True, True]


def test_deterministic_rebuilds_at_multiples_of_rebuild_every(monkeypatch):
    every = 3
    selector = _ivf_selector(deterministic=True, rebuild_every=every, retrain_every=1)  # every rebuild a full one
    builds = []
    original = selector._build

    def counting_build(weight, step, *args, **kwargs):
        builds.append(step)
        built = original(weight, step, *args, **kwargs)
        # Built from exactly the weights of this step (fresh index, same options).
        reference = TorchIVFIndex(nlist=10, nprobe=2, seed=5, cosine=True, copy_weights=False)
        reference.build(weight)
        assert torch.equal(built.index.state_dict()["assign"], reference.state_dict()["assign"])
        assert torch.equal(built.index.state_dict()["centroids"], reference.state_dict()["centroids"])
        return built

    selector._build = counting_build
    weight = _weight(61)
    ages, built_steps = [], []
    for step in range(1, 11):
        features, labels = _batch(62 + step)
        selector.select(step, features, labels, weight)
        ages.append(selector.last["index_age"])
        built_steps.append(selector._current.step)
        weight = weight + 0.3 * _weight(80 + step)  # the step's update
    assert builds == [0, 2, 5, 8]  # steps 1 (the first), 3, 6, 9: updates = step - 1
    assert built_steps == [0, 0, 2, 2, 2, 5, 5, 5, 8, 8]
    assert ages == [0, 1, 0, 1, 2, 0, 1, 2, 0, 1]
    assert selector._worker is None, "deterministic builds run in the step, not in a thread"
    selector.close()


def test_incremental_rebuilds_keep_every_row_in_its_list():
    """Between k-means runs a rebuild files again only the rows selected (so updated) since
    the previous one; as the head moves only those rows, every row stays where a full filing
    with the same centroids would put it."""
    selector = _ivf_selector(deterministic=True, rebuild_every=2, retrain_every=3, nlist=10, nprobe=2, knn_k=2)
    kinds = []
    original = selector._build

    def recording_build(weight, step, previous=None, rows=None):
        kinds.append((step, "full" if previous is None else "refile"))
        return original(weight, step, previous, rows)

    selector._build = recording_build
    weights = [_weight(66)]  # weights[u]: after u updates
    centroids = []
    for step in range(1, 10):
        rows = selector.select(step, *_batch(67 + step), weights[-1])
        built = selector._current
        state = built.index.state_dict()
        centroids.append(state["centroids"].clone())
        # Every row in the list that filing all rows of the build's weights would give.
        want = _ip_lists64(weights[built.step], state["centroids"], cosine=True)
        assert torch.equal(state["assign"], want), f"step {step}"
        assert rows.numel() < SHARD
        # The head's update: the selected rows move, no other row does.
        weight = weights[-1].clone()
        weight[rows] += 0.5 * torch.randn(rows.numel(), DIM, generator=_gen(200 + step), dtype=torch.float64)
        weights.append(weight)
    assert kinds == [(0, "full"), (1, "refile"), (3, "refile"), (5, "full"), (7, "refile")]
    assert torch.equal(centroids[0], centroids[4]) and not torch.equal(centroids[4], centroids[5])
    assert torch.equal(centroids[5], centroids[8])
    selector.close()


def test_background_rebuilds_bound_the_age_and_swap_in():
    every, slow = 2, 1.0
    selector = _ivf_selector(rebuild_every=every, max_index_age=2 * every)
    build = selector._build

    def slow_build(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(slow)  # only the background builds are slow
        return build(*args, **kwargs)

    selector._build = slow_build
    weight = _weight(71)
    ages, built_steps, seconds = [], [], []

    def step(s):
        features, labels = _batch(72 + s)
        start = time.perf_counter()
        selector.select(s, features, labels, weight)
        seconds.append(time.perf_counter() - start)
        ages.append(selector.last["index_age"])
        built_steps.append(selector._current.step)

    try:
        step(1)  # synchronous first build
        step(2)  # starts a background build from updates=1; does not wait for it
        time.sleep(slow + 0.5)  # it finishes meanwhile ...
        step(3)  # ... and is swapped in here without waiting
        for s in range(4, 9):  # 4 starts a build; 5, 6 within 2 * every; 7 must wait, then starts the one due at 6
            step(s)
    finally:
        selector.close()
    assert built_steps == [0, 0, 1, 1, 1, 1, 3, 3]
    assert ages == [0, 1, 1, 2, 3, 4, 3, 4]
    assert max(ages) <= 2 * every
    waited = seconds[6]
    assert waited >= slow / 2, f"step 7 is past the age bound and must wait for the build: {seconds}"
    for s in (2, 3, 4, 5, 6, 8):
        assert seconds[s - 1] < slow / 2, f"step {s} must not wait: {seconds}"
    assert selector._worker is None and selector._pending is None


def test_background_rebuilds_never_stall_a_step_by_default():
    every, slow = 2, 1.0
    selector = _ivf_selector(rebuild_every=every)
    started = slow_background_builds(selector, slow)
    batch = lambda step: _batch(72 + step)  # noqa: E731
    seconds, _, ages = timed_steps(selector, _weight(71), batch, 9, pause_after=7, pause=slow + 0.3)
    # Step 2 starts a build that runs past step 7: the steps serve the first index, older
    # each step, and the rebuilds due at 4 and 6 wait for it; step 8 swaps it in and starts one.
    assert started == [0, 1, 7]
    assert ages == [0, 1, 2, 3, 4, 5, 6, 6, 7]
    assert all(s < slow / 2 for s in seconds[1:]), seconds
    with pytest.raises(ValueError, match="max_index_age"):
        _ivf_selector(rebuild_every=every, max_index_age=every - 1)


def test_knn_recall_measured_every_recall_every():
    weight = _weight(81)
    flat = _selector(knn_k=5, index="torch", index_type="flat", cosine=True, recall_every=3)
    ivf = _ivf_selector(knn_k=5, nprobe=1, recall_every=3, recall_queries=7, deterministic=True)
    measured = []
    for step in range(1, 8):
        features, labels = _batch(82 + step, batch=16)
        for selector in (flat, ivf):
            selector.last["knn_recall"] = None
            selector.select(step, features, labels, weight)
        if step % 3:
            assert flat.last["knn_recall"] is None and ivf.last["knn_recall"] is None, f"step {step}"
            continue
        assert flat.last["knn_recall"] == 1.0
        # The IVF recall: its own search of the first 7 samples against exact float64 search.
        queries = F.normalize(features[:7].float(), dim=1)
        # Both sides search one row more and drop the sample's label (knn_skip_label).
        _, found = ivf._current.index.search(queries, 6, weight)
        found = _first_k_but_label(found, labels[:7], 5)
        want = recall_at_k(found, _first_k_but_label(_exact_rows64(queries, weight, 6, cosine=True), labels[:7], 5))
        assert ivf.last["knn_recall"] == pytest.approx(want, abs=1e-6)
        measured.append(want)
    assert len(measured) == 2 and min(measured) < 1.0  # one probe of 10 lists misses some


def test_index_state_round_trip_selects_identically():
    every = 4
    # Rebuilds at 1 (k-means), 4 and 8 (rows updated since filed again), 12 (k-means).
    options = dict(deterministic=True, rebuild_every=every, retrain_every=3, nlist=12, nprobe=1, knn_k=3)
    original = _ivf_selector(**options)
    weights = [_weight(90 + s) for s in range(14)]  # a very different weight each step
    for step in range(1, 7):  # builds at steps 1 and 4
        original.select(step, *_batch(100 + step), weights[step])
    state = original.index_state()
    assert {"centroids", "assign", "built_step"} <= set(state) and int(state["built_step"]) == 3

    restored = _ivf_selector(**options)
    # What a checkpoint load does: tensors shaped like the state, filled in place.
    empty = restored.empty_index_state(DIM)
    assert set(empty) == set(state)
    for name in state:
        assert empty[name].shape == state[name].shape and empty[name].dtype == state[name].dtype, name
        empty[name].copy_(state[name])
    restored.load_index_state(empty, weights[6])
    assert restored._current.step == 3

    unrestored = _ivf_selector(**options)
    differs = False
    for step in range(7, 14):  # rebuilds at 8 and 12 from the same weights on both
        batch = _batch(100 + step)
        want = original.select(step, *batch, weights[step])
        assert torch.equal(restored.select(step, *batch, weights[step]), want), f"step {step}"
        if step == 7:  # without the state the index is rebuilt from other weights
            differs = not torch.equal(unrestored.select(step, *batch, weights[step]), want)
    assert differs, "a selector without the saved index should select differently (else this test proves nothing)"
    for selector in (original, restored, unrestored):
        selector.close()

    assert _selector("random", budget=3, deterministic=True).index_state() == {}  # only knn saves an index
    flat = _selector(index="torch", index_type="flat", deterministic=True)
    assert flat.index_state() == {}  # nothing built yet
    flat.select(1, *_batch(120), weights[0])
    assert "built_step" in flat.index_state() and set(flat.index_state()) == set(flat.empty_index_state(DIM))
    assert not {"centroids", "assign"} & set(flat.index_state())  # the flat index searches the weights themselves


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(selection="topk"), "selection must be one of"),
        (dict(selection="random"), "needs a budget"),
        (dict(knn_k=0), "knn_k must be an int >= 1"),
        (dict(knn_skip_label=1), "knn_skip_label must be a bool"),
        (dict(trim_to_budget=True), "trim_to_budget trims"),
        (dict(trim_to_budget=True, budget=10, selection="graph", num_classes=STOP), "trim_to_budget trims"),
        (dict(rebuild_every=0), "rebuild_every must be an int >= 1"),
        (dict(recall_every=-1), "recall_every must be an int >= 0"),
        (dict(budget=0), "budget must be >= 1"),
        (dict(budget=1.5), r"fractional budget must be in \(0, 1\]"),
        (dict(index="torch", index_type="hnsw"), "hnsw needs the faiss backend"),
        (dict(index="faiss", deterministic=True), "deterministic index.*use the torch backend"),
        (dict(index="annoy"), "index must be one of"),
        (dict(index_type="pq"), "index_type must be one of"),
    ],
)
def test_bad_selector_options_fail_clearly(options, message):
    options = {"selection": "knn", **options}
    with pytest.raises(ValueError, match=message):
        ActiveClassSelector(options.pop("selection"), START, STOP, **options)


def test_saved_index_signatures_old_and_new():
    selector = _selector(knn_k=2, index="torch", index_type="ivf", nlist=7, deterministic=True)
    signature = selector.index_signature
    assert signature["index"] == "torch" and signature["index_type"] == "ivf" and selector.loads_index_of(signature)
    older = {"kind": "torch_ivf", **{k: v for k, v in signature.items() if k not in ("index", "index_type")}}
    assert selector.loads_index_of(older)  # saved before backends took the config's names
    assert not selector.loads_index_of({**older, "kind": "torch"}) and not selector.loads_index_of(
        {**signature, "nlist": 8}
    )
    assert not selector.loads_index_of(None)


def test_resolve_index_choices():
    cpu = torch.device("cpu")
    assert resolve_index("auto", "auto", num_rows=100, device=cpu, deterministic=False) == ("faiss", "flat")
    assert resolve_index("auto", "auto", num_rows=100, device=cpu, deterministic=True) == ("torch", "flat")
    big = index_mod.EXACT_MAX_ROWS + 1
    assert resolve_index("auto", "auto", num_rows=big, device=cpu, deterministic=True) == ("torch", "ivf")
    assert resolve_index("torch", "ivf", num_rows=100, device=cpu, deterministic=False) == ("torch", "ivf")
    assert resolve_index("auto", "hnsw", num_rows=100, device=cpu, deterministic=False) == ("faiss", "hnsw")
    assert resolve_index("faiss", "ivf", num_rows=100, device=cpu, deterministic=False) == ("faiss", "ivf")


# ========================================================================================
# 5. Active rows covering the shard train exactly like the full head
# ========================================================================================

EQ_CLASSES, EQ_DIM, EQ_BATCH, EQ_STEPS = 61, 12, 18, 3
EQ_CASES = {
    "random": dict(selection="random", budget=1.0),
    "knn_flat": dict(selection="knn", knn_k=10**6, index="torch", index_type="flat"),
    "knn_ivf_fill": dict(selection="knn", knn_k=2, budget=10**6, index="torch", index_type="ivf", nlist=6, nprobe=1),
}


def _eq_head(margin_type):
    head = ShardedClassifier(
        EQ_CLASSES,
        EQ_DIM,
        seed=7,
        init_std=0.5,
        dtype=torch.float64,
        momentum=0.9,
        weight_decay=1e-3,
        momentum_dtype=torch.float64,
        impl="reference",
        margin_type=margin_type,
        scale=8.0 if margin_type != "none" else 1.0,
        margin=0.2 if margin_type != "none" else 0.0,
    )
    head.set_lr(0.5)
    return head


def _eq_batch(step):
    gen = _gen(1000 + step)
    features = torch.randn(EQ_BATCH, EQ_DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, EQ_CLASSES, (EQ_BATCH,), generator=gen)
    labels[::5] = -100
    return features, labels


def _full_vs_active(rank, world_size, case, margin_type):
    """3 steps of the full head and of the head over the selector's rows, side by side."""
    full, active = _eq_head(margin_type), _eq_head(margin_type)
    options = dict(EQ_CASES[case])
    selector = ActiveClassSelector(
        options.pop("selection"),
        active.class_start,
        active.class_stop,
        seed=3,
        rebuild_every=2,
        cosine=margin_type != "none",
        **options,
    )
    out = {"loss_full": [], "loss_active": [], "grad_full": [], "grad_active": []}
    for step in range(1, EQ_STEPS + 1):
        features, labels = _eq_batch(step)
        for head, name in ((full, "full"), (active, "active")):
            f = features.clone().requires_grad_()
            rows = selector.select(step, f, labels, head.weight) if name == "active" else None
            if rows is not None:
                assert torch.equal(rows, torch.arange(head.num_local_classes))
            loss = head.loss(f, labels, rows)
            loss.backward()
            head.finish_step()
            out[f"loss_{name}"].append(loss.detach())
            out[f"grad_{name}"].append(f.grad)
    selector.close()
    for name, head in (("full", full), ("active", active)):
        out[f"weight_{name}"] = head.weight.detach().clone()
        out[f"momentum_{name}"] = head.momentum_buffer.clone()
    out["moved"] = (full.weight.detach() - _eq_head(margin_type).weight.detach()).abs().max()
    return out


def _assert_same_training(out):
    assert float(out["moved"]) > 1e-3, "the weights must have moved for the comparison to mean anything"
    for a, b in zip(out["loss_full"], out["loss_active"]):
        assert float(a) == pytest.approx(float(b), rel=1e-12, abs=1e-12)
    for a, b in zip(out["grad_full"], out["grad_active"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for name in ("weight", "momentum"):
        torch.testing.assert_close(out[f"{name}_full"], out[f"{name}_active"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case,margin_type", [("random", "none"), ("knn_flat", "cosface"), ("knn_ivf_fill", "none")])
def test_covering_selection_equals_the_full_head_one_process(case, margin_type):
    _assert_same_training(_full_vs_active(0, 1, case, margin_type))


def _two_rank_cases(rank, world_size):
    return [
        _full_vs_active(rank, world_size, case, margin)
        for case, margin in (("random", "none"), ("knn_flat", "cosface"), ("knn_ivf_fill", "none"))
    ]


def test_covering_selection_equals_the_full_head_two_ranks():
    results = run_ranks(_two_rank_cases, 2)
    for rank_results in results:
        for out in rank_results:
            _assert_same_training(out)
    # The ranks hold different shards but agree on the (global) loss.
    for a, b in zip(results[0], results[1]):
        assert [float(x) for x in a["loss_active"]] == [float(x) for x in b["loss_active"]]
        assert a["weight_active"].shape[0] + b["weight_active"].shape[0] == EQ_CLASSES


# ========================================================================================
# 6. The trainer through torchrun (2 gloo ranks)
# ========================================================================================

KNN_BACKGROUND = [
    "head.selection=knn",
    "head.budget=0.5",
    "head.index=torch",
    "head.index_type=ivf",
    "head.rebuild_every=3",
    "head.recall_every=2",
]
KNN_DETERMINISTIC = [
    "head.selection=knn",
    "head.index=torch",
    "head.index_type=ivf",
    "head.rebuild_every=5",
    "head.index_deterministic=true",
    "head.budget=0.4",
]
RANDOM = ["head.selection=random", "head.budget=0.3"]


@pytest.fixture(scope="module")
def knn_background_run(tmp_path_factory):
    """Background rebuilds, stopped after step 7 and rerun to the end."""
    run_dir = tmp_path_factory.mktemp("knn") / "background"
    first = launch(run_dir, 2, *KNN_BACKGROUND, "train.stop_after=7")
    second = launch(run_dir, 2, *KNN_BACKGROUND)
    return run_dir, first, second


def test_trainer_knn_logs_selection_metrics(knn_background_run):
    run_dir, _, _ = knn_background_run
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for row in rows:
        assert math.isfinite(row["loss"])
        assert {"active_classes", "index_build_s", "index_age"} <= row.keys(), row
        # budget 0.5 of 51/50 rows: at least 26/25 rows a shard, at most the shard
        assert 25 <= row["active_classes"] <= 51
        assert 0 <= row["index_age"] <= 6 and row["index_build_s"] >= 0
        if row["step"] % 2 == 0:  # head.recall_every=2
            assert 0 <= row["knn_recall"] <= 1
    assert "knn_recall" not in rows[0]  # step 1 is not a multiple of 2: nothing measured yet
    assert any(row["index_age"] > 0 for row in rows), "rebuilds every 3 steps: the index is sometimes older"


def test_trainer_knn_background_mode_resumes(knn_background_run):
    run_dir, first, second = knn_background_run
    assert "resumed at step 7" in second.stdout + second.stderr
    assert latest_checkpoint(run_dir).name == "step-12"
    assert "knn index is rebuilt" not in second.stderr  # background mode saves no index: no warning either
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 13)) and all(math.isfinite(v) for v in losses.values())


def test_trainer_random_selection_is_world_size_independent(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch_together((one, 1, *RANDOM, "train.eval_every=0"), (two, 2, *RANDOM, "train.eval_every=0"))
    a, b = train_losses(one), train_losses(two)
    assert a.keys() == b.keys() == set(range(1, 13))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), f"step {step}"
    rows = {r["step"]: r for r in metrics(one) if "loss" in r}
    assert all(30 <= rows[s]["active_classes"] < 101 for s in rows)  # ~0.3 of 101 plus positives, not all
    assert "knn_recall" not in rows[12] and "index_age" not in rows[12]


@pytest.fixture(scope="module")
def deterministic_runs(tmp_path_factory):
    """Deterministic knn: an uninterrupted run, and one stopped after step 7 (between the
    rebuilds at steps 5 and 10) that each test copies and resumes its own way."""
    root = tmp_path_factory.mktemp("deterministic")
    straight, stopped = root / "straight", root / "stopped"
    launch_together((straight, 2, *KNN_DETERMINISTIC), (stopped, 2, *KNN_DETERMINISTIC, "train.stop_after=7"))
    assert latest_checkpoint(stopped).name == "step-7"
    return straight, stopped


@pytest.mark.parametrize("stop_after, threads", [(7, 2), (6, 3)])
def test_trainer_deterministic_knn_resume_equals_uninterrupted(deterministic_runs, tmp_path, stop_after, threads):
    """Bit for bit, on another thread count than the uninterrupted run's and with the machine
    loaded: stopped between rebuilds (7), or preempted at an evaluation step (6), whose
    settle of the head's deferred steps the preempted run and the next step's index must
    see as the uninterrupted run does."""
    straight, stopped_at_7 = deterministic_runs
    resumed = tmp_path / "resumed"
    with cpu_hog(1):
        if stop_after == 7:
            shutil.copytree(stopped_at_7, resumed)
        else:
            launch(resumed, 2, *KNN_DETERMINISTIC, faults=f"preempt@{stop_after}:1", threads=threads)
            assert (resumed / "PREEMPTED").read_text().split() == ["step", str(stop_after)]
        proc = launch(resumed, 2, *KNN_DETERMINISTIC, threads=threads)
    assert f"resumed at step {stop_after}" in proc.stdout + proc.stderr
    assert "knn index is rebuilt" not in proc.stderr, proc.stderr[-2000:]
    want, got = train_losses(straight), train_losses(resumed)
    assert sorted(want) == list(range(1, 13))
    assert got == want
    ages = {r["step"]: r["index_age"] for r in metrics(resumed) if "loss" in r}
    assert ages == {r["step"]: r["index_age"] for r in metrics(straight) if "loss" in r}
    assert (
        ages[stop_after + 1] == stop_after - 4 and ages[10] == 0
    )  # the saved index (built at step 5) served the next step


def test_trainer_deterministic_knn_resume_on_another_world_size(deterministic_runs, tmp_path):
    """The per-shard index cannot be reused: a warning, a rebuild, a finished run."""
    straight, stopped = deterministic_runs
    resharded = tmp_path / "resharded"
    shutil.copytree(stopped, resharded)
    proc = launch(resharded, 1, *KNN_DETERMINISTIC)
    assert "was saved by 2 ranks, not 1" in proc.stderr and "knn index is rebuilt" in proc.stderr, proc.stderr[-2000:]
    want, other = train_losses(straight), train_losses(resharded)
    assert sorted(other) == list(range(1, 13)) and all(other[s] == want[s] for s in range(1, 8))
    assert all(math.isfinite(other[s]) for s in range(8, 13))
    assert {r["step"]: r["index_age"] for r in metrics(resharded) if "loss" in r}[8] == 0  # rebuilt at step 8


def test_trainer_deterministic_knn_resume_with_another_nlist(deterministic_runs, tmp_path):
    _, stopped = deterministic_runs
    changed = tmp_path / "changed"
    shutil.copytree(stopped, changed)
    proc = launch(changed, 2, *KNN_DETERMINISTIC, "head.index_nlist=5", check=False)
    output = proc.stdout + proc.stderr
    refused = proc.returncode != 0 and "cannot resume" in output and "head.index_nlist" in output
    rebuilt = proc.returncode == 0 and "knn index is rebuilt" in output and max(train_losses(changed)) == 12
    assert refused or rebuilt, output[-3000:]


# Every row of every shard active: knn must train exactly as the full softmax does. 102
# classes split evenly (102, 51/51, 34/34/34 rows); cosface on float32 CPU rows, where the
# auto index is FAISS's.
ALL_ROWS = ["head.num_classes=102", "train.steps=4", "train.eval_every=0", "head.weight_decay=0.001"]
KNN_COVERING = {
    "below": lambda nproc: ["head.knn_k=2", "head.budget=1.0"],  # each sample's 2 nearest, filled to the shard
    "at": lambda nproc: [f"head.knn_k={102 // nproc}"],
    "above": lambda nproc: ["head.knn_k=1000"],
}


# Each world size with one of the three ways of covering the shard (a launch costs ~8 s on
# 2 cores): 1 rank knn_k below the shard with a fill, 2 ranks at it, 3 ranks above it.
COVERING_BY_RANKS = [(1, "below"), (2, "at"), (3, "above")]


@pytest.mark.parametrize("nproc, covering", COVERING_BY_RANKS)
def test_trainer_knn_with_every_row_active_trains_as_the_full_softmax(tmp_path, nproc, covering):
    full, knn = tmp_path / "full", tmp_path / "knn"
    launch_together(
        (full, nproc, *ALL_ROWS), (knn, nproc, *ALL_ROWS, "head.selection=knn", *KNN_COVERING[covering](nproc))
    )
    rows = [r for r in metrics(knn) if "loss" in r]
    assert all(r["active_classes"] == 102 // nproc for r in rows)
    assert {r["step"]: r["loss"] for r in rows} == train_losses(full)


def test_trainer_random_without_budget_fails_clearly(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, 2, "head.selection=random", check=False, timeout=120)
    assert proc.returncode != 0
    assert "head.budget" in proc.stderr and "head.selection=random" in proc.stderr, proc.stderr[-2000:]
    assert not run_dir.exists()


def test_trainer_knn_fixed_size_scores_exactly_g_times_k_plus_one_rows(tmp_path):
    """head.knn_fixed_size: every step's active set per shard is G·(k+1) rows (48 x 3 here)."""
    run_dir = tmp_path / "fixed"
    launch(
        run_dir,
        2,
        "head.selection=knn",
        "head.knn_k=2",
        "head.knn_fixed_size=true",
        "head.num_classes=2000",
        "head.index=torch",
        "head.index_type=ivf",
        "head.rebuild_every=5",
        "train.eval_every=0",
    )
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["active_classes"] == 48 * 3 and math.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["head.selection=random", "head.budget=10", "head.knn_fixed_size=true"], "needs head.selection=knn"),
        (["head.selection=knn", "head.budget=10", "head.knn_fixed_size=true"], "leave head.budget null"),
        (["head.selection=knn", "head.knn_trim_to_budget=true"], "knn_trim_to_budget trims"),
        (["head.selection=graph", "head.budget=10", "head.knn_trim_to_budget=true"], "knn_trim_to_budget trims"),
        (["head.selection=knn", "head.momentum=0", "head.search_paid_rows=true"], "search_paid_rows searches"),
        (["head.selection=random", "head.budget=10", "head.search_paid_rows=true"], "search_paid_rows searches"),
        (["head.selection=knn", "head.inactive_rows=frozen", "head.search_paid_rows=true"], "search_paid_rows"),
        (["head.settle_every=4097"], "at most 4096"),
        (["head.settle_every=0"], "head.settle_every"),
        (["head.settle_every=10", "head.momentum=0"], "settle_every=10 pays the steps"),
        (["head.settle_every=10", "head.inactive_rows=frozen"], "settle_every=10 pays the steps"),
        (["head.selection=knn", "head.fill_correction=true"], "fill_correction corrects"),
        (
            [
                "head.selection=random",
                "head.budget=9",
                "head.fill_correction=true",
                "head.impl=triton",
                "head.grad_filter=1e-4",
            ],
            "exact gemm kernels",
        ),
        (
            [
                "head.selection=knn",
                "head.budget=9",
                "head.fill_correction=true",
                "head.impl=triton",
                "head.exact_kernels=stationary",
            ],
            "exact gemm kernels",
        ),
        (
            [
                "head.selection=knn",
                "head.budget=9",
                "head.fill_correction=true",
                "head.impl=triton",
                "head.weight_dtype=fp8_e4m3",
            ],
            "exact gemm kernels",
        ),
    ],
)
def test_knn_fixed_size_and_trim_options_are_checked(overrides, match):
    from hydrahead.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=match):
        validate(load_config(None, overrides))


def test_trainer_passes_knn_skip_label_and_trim_to_the_selector(tmp_path):
    """One step per setting: trimmed, the union (positives + 3 neighbours of 48 samples) is cut
    to exactly the budget; untrimmed it is kept whole; skip_label decides the search's k."""
    settings = {
        "trimmed": ["head.knn_trim_to_budget=true"],
        "whole": ["head.knn_trim_to_budget=false"],
        "label kept": ["head.knn_trim_to_budget=true", "head.knn_skip_label=false"],
    }
    seen = run_ranks(_one_knn_step_on_rank, 1, str(tmp_path), settings)[0]
    assert seen["trimmed"] == (4, 60.0)
    assert seen["label kept"] == (3, 60.0)
    search_k, rows = seen["whole"]
    assert search_k == 4 and rows > 60


def _one_knn_step_on_rank(rank, world_size, root, settings):
    from launcher import TINY

    from hydrahead.config import load_config
    from hydrahead.data.build import batches
    from hydrahead.distributed.setup import DistEnv
    from hydrahead.train.trainer import Trainer

    seen = {}
    for name, overrides in settings.items():
        knn = ["head.selection=knn", "head.knn_k=3", "head.budget=60", "head.num_classes=2000", "head.index=torch"]
        cfg = load_config(None, [f"run.dir={root}/{name}", *TINY, *knn, "head.index_type=flat", *overrides])
        trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
        data = batches(trainer.train_data, start_step=0, global_batch=48, rank=rank, world_size=world_size)
        trainer.train_step(*next(data), timed=False)
        data.close()
        seen[name] = (trainer.selector.knn_search_k, float(trainer.selector.last["active_classes"]))
        trainer.selector.close()
    return seen


def test_trainer_searches_the_rows_with_their_owed_steps_paid(tmp_path):
    """head.search_paid_rows: with head momentum the rows a step searches are those the loss
    will read (owed steps paid), not the stored ones; off, the stored ones, which a settle
    (head.settle_every=3: after step 3) makes the paid ones."""
    seen = run_ranks(_searched_rows_on_rank, 1, str(tmp_path))[0]
    # (searched the paid rows, searched the stored tensor, the paid rows equal the stored ones), steps 3 and 4
    assert seen["paid"] == ([(True, False, False)] * 2, 0)
    assert seen["stored"] == ([(False, True, False), (True, True, True)], 1)


def _searched_rows_on_rank(rank, world_size, root):
    from launcher import TINY

    from hydrahead.config import load_config
    from hydrahead.data.build import batches
    from hydrahead.distributed.setup import DistEnv
    from hydrahead.train.trainer import Trainer

    seen = {}
    for name, paid, settle_every in (("paid", True, "null"), ("stored", False, "3")):
        knn = ["head.selection=knn", "head.knn_k=3", "head.budget=60", "head.num_classes=2000", "head.index=torch"]
        options = ["head.index_type=flat", "head.momentum=0.9", "optim.warmup_steps=0"]  # moving from the first step
        options += [f"head.search_paid_rows={str(paid).lower()}", f"head.settle_every={settle_every}"]
        cfg = load_config(None, [f"run.dir={root}/{name}", *TINY, *knn, *options])
        trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
        assert trainer.selector.rows_move_every_step == paid
        searched, calls, select = [], [], trainer.selector.select

        def recording_select(step, features, labels, weight, rows_moved, select=select, trainer=trainer):
            calls.append(step)
            weight = weight() if callable(weight) else weight  # the paid rows come as their maker
            if len(calls) >= 3:  # rows active at step 1 and not at step 2 owe the third a step
                stored = trainer.head.weight.detach()
                paid_rows = trainer.head.rows_as_the_loss_reads_them()
                searched.append(
                    (torch.equal(weight, paid_rows), weight is trainer.head.weight, torch.equal(paid_rows, stored))
                )
            return select(step, features, labels, weight, rows_moved)

        trainer.selector.select = recording_select
        data = batches(trainer.train_data, start_step=0, global_batch=48, rank=rank, world_size=world_size)
        for _ in range(4):
            trainer._set_learning_rates()  # as train() does before each step
            trainer.train_step(*next(data), timed=False)
        data.close()
        trainer.selector.close()
        seen[name] = searched, trainer.head.settles
    return seen


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(selection="knn", knn_k=2048), r"knn_k=2048 \(\+ 1 for the label skipped.*at most 2048"),
        (dict(selection="knn", knn_k=2100, knn_skip_label=False), r"knn_k=2100 asks .* 2100 rows"),
        (dict(selection="knn", knn_k=8, index_type="ivf", nprobe=4096), "index_nprobe=4096"),
        (dict(selection="graph", graph_k=2048), r"graph_k=2048 \(\+ 1 for the class itself"),
    ],
)
def test_searches_past_faiss_gpu_limits_fail_when_the_selector_is_made(monkeypatch, options, match):
    """A FAISS GPU index returns at most 2,048 rows and probes at most 2,048 lists; without
    this check the first step's search would fail inside FAISS."""
    pytest.importorskip("faiss")
    monkeypatch.setattr(index_mod, "faiss_gpu_available", lambda: True)  # as on a GPU build of FAISS
    made = dict(index="faiss", index_type="flat", device="cuda", num_classes=5000)
    with pytest.raises(ValueError, match=match):
        ActiveClassSelector(class_start=0, class_stop=5000, **{**made, **options})
    within = {**made, "selection": options["selection"], "knn_k": 2047, "graph_k": 2047}
    on_cpu = {**made, **options, "device": "cpu"}  # FAISS on the CPU has no such limit
    for fine in (within, on_cpu):
        selector = ActiveClassSelector(class_start=0, class_stop=5000, **fine)
        assert selector.index_backend == "faiss"
        selector.close()


@pytest.mark.parametrize("selection", ["knn", "random"])
def test_fill_correction_offsets_the_random_fill_alone(selection):
    """head.fill_correction: log((C_r - chosen) / fill) on each fill row, 0 on the rows chosen
    for themselves (positives; knn: each sample's nearest rows other than its label)."""
    features, labels = _batch(91)
    weight = _weight(92)
    budget = 60
    selector = _selector(selection, budget=budget, knn_k=2, index="torch", index_type="flat", fill_correction=True)
    rows = selector.select(1, features, labels, weight)
    offsets = selector.logit_offset
    chosen = owned_positives(labels, START, STOP)
    if selection == "knn":
        _, nearest = exact_topk(features.float(), weight.float(), 3)
        nearest, _ = without_own_label(nearest, labels, START, STOP, 2)
        chosen = torch.unique(torch.cat((chosen, nearest.reshape(-1))))
    fill = ~torch.isin(rows, chosen)
    assert rows.numel() == budget and 0 < int(fill.sum()) < budget
    expected = fill.float() * math.log((SHARD - chosen.numel()) / int(fill.sum()))
    torch.testing.assert_close(offsets, expected)
    selector.close()
    for nothing_to_correct in ("full", "knn"):  # every row, or knn without a budget: no fill
        with pytest.raises(ValueError, match="fill_correction"):
            _selector(nothing_to_correct, fill_correction=True)


def test_trainer_hands_the_fill_correction_to_the_loss(tmp_path):
    """head.fill_correction: the loss gets the selector's offsets, one per active row; without
    it, none."""
    seen = run_ranks(_loss_offsets_on_rank, 1, str(tmp_path))[0]
    rows, offsets, nonzero = seen["corrected"]
    assert rows == offsets == 100 and 0 < nonzero < 100
    assert seen["plain"] == (100, None, None)


def _loss_offsets_on_rank(rank, world_size, root):
    from launcher import TINY

    from hydrahead.config import load_config
    from hydrahead.data.build import batches
    from hydrahead.distributed.setup import DistEnv
    from hydrahead.train.trainer import Trainer

    seen = {}
    for name, corrected in (("corrected", "true"), ("plain", "false")):
        knn = ["head.selection=knn", "head.knn_k=1", "head.budget=100", "head.num_classes=2000", "head.index=torch"]
        options = ["head.index_type=flat", "head.impl=reference", f"head.fill_correction={corrected}"]
        cfg = load_config(None, [f"run.dir={root}/{name}", *TINY, *knn, *options])
        trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
        loss = trainer.head.loss

        def recording_loss(features, labels, active_rows, *, loss=loss, **options):
            offset = options.get("logit_offset")
            assert offset is None or offset is trainer.selector.logit_offset
            seen[name] = (
                active_rows.numel(),
                None if offset is None else offset.numel(),
                None if offset is None else int((offset != 0).sum()),
            )
            return loss(features, labels, active_rows, **options)

        trainer.head.loss = recording_loss
        data = batches(trainer.train_data, start_step=0, global_batch=48, rank=rank, world_size=world_size)
        trainer._set_learning_rates()
        trainer.train_step(*next(data), timed=False)
        data.close()
        trainer.selector.close()
    return seen


def test_fused_head_takes_the_fill_correction_as_the_reference_does(tmp_path):
    """head.fill_correction with head.impl=triton (the exact gemm kernels, fp32 rows): the same
    step's loss and updated rows as the reference head's."""
    seen = run_ranks(_corrected_step_on_rank, 1, str(tmp_path))[0]
    (ref_loss, ref_rows, ref_offsets), (loss, rows, offsets) = seen["reference"], seen["triton"]
    assert 0 < ref_offsets == offsets < 60  # the fill's rows carry offsets, the positives none
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    assert float((rows - ref_rows).norm() / ref_rows.norm()) < 1e-5


def _corrected_step_on_rank(rank, world_size, root):
    from launcher import TINY

    from hydrahead.config import load_config
    from hydrahead.data.build import batches
    from hydrahead.distributed.setup import DistEnv
    from hydrahead.train.trainer import Trainer

    seen = {}
    for impl in ("reference", "triton"):
        options = ["head.selection=random", "head.budget=60", "head.fill_correction=true", "head.weight_dtype=fp32"]
        cfg = load_config(None, [f"run.dir={root}/{impl}", *TINY, *options, f"head.impl={impl}"])
        trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
        data = batches(trainer.train_data, start_step=0, global_batch=48, rank=rank, world_size=world_size)
        trainer._set_learning_rates()
        out = trainer.train_step(*next(data), timed=False)
        data.close()
        offsets = int((trainer.selector.logit_offset != 0).sum())
        seen[impl] = (float(out["loss"]), trainer.head.weight.detach().clone(), offsets)
        trainer.selector.close()
    return seen


def test_paid_rows_are_made_only_in_the_steps_that_read_them(tmp_path):
    """head.search_paid_rows copies the shard with its debts paid: knn's search reads it every
    step, a graph only when it builds (steps 1, 3 and 6 here: builds in the step every 3)."""
    made = run_ranks(_paid_copies_on_rank, 1, str(tmp_path))[0]
    assert made["knn"] == [1, 2, 3, 4, 5, 6]
    assert made["graph"] == [1, 3, 6]


def _paid_copies_on_rank(rank, world_size, root):
    from launcher import TINY

    from hydrahead.config import load_config
    from hydrahead.data.build import batches
    from hydrahead.distributed.setup import DistEnv
    from hydrahead.train.trainer import Trainer

    made = {}
    for selection in ("knn", "graph"):
        options = [f"head.selection={selection}", "head.knn_k=2", "head.graph_k=2", "head.budget=60"]
        options += ["head.index=torch", "head.index_type=flat", "head.momentum=0.9", "head.search_paid_rows=true"]
        options += ["head.rebuild_every=3", "head.index_deterministic=true", "head.recall_every=0"]
        cfg = load_config(None, [f"run.dir={root}/{selection}", *TINY, *options])
        trainer = Trainer(cfg, DistEnv(rank, world_size, rank, torch.device("cpu"), "gloo", None, None))
        steps, current, paid = [], [0], trainer.head.rows_as_the_loss_reads_them

        def counting_paid(paid=paid, steps=steps, current=current):
            steps.append(current[0])
            return paid()

        trainer.head.rows_as_the_loss_reads_them = counting_paid
        data = batches(trainer.train_data, start_step=0, global_batch=48, rank=rank, world_size=world_size)
        for step in range(1, 7):
            current[0] = step
            trainer._set_learning_rates()
            trainer.train_step(*next(data), timed=False)
            trainer.step = step
        data.close()
        trainer.selector.close()
        made[selection] = steps
    return made
