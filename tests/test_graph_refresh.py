"""head.graph_refresh_every: the labels' graph rows searched again and offered to the rows
they found, against brute force on one process and split over 3 gloo ranks; the selector's
refresh cadence, the labels each refresh takes and the IVF lists it files again; refreshes
of the moved rows with no index (head.graph_refresh_window); the trainer's deterministic
resume with refreshes."""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_ranks
from launcher import launch, train_losses

from hydrahead.distributed.sharding import shard_range
from hydrahead.head import graph as class_graph
from hydrahead.head.active import ActiveClassSelector
from hydrahead.head.index import make_index

C, D, K = 61, 8, 4  # 61 classes: shards of 21/20/20 over 3 ranks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scores(weight, cosine):
    w = F.normalize(weight.double(), dim=1) if cosine else weight.double()
    scores = w @ w.T
    scores.fill_diagonal_(-math.inf)
    return scores


def _offer_reference(table, scores, offers, k):
    """Row by row in Python: a class offered to a row it is in takes the offer's score; the
    row's best k offers join its entries; the best k of them stay."""
    table, scores = table.clone(), scores.clone()
    for row, offered in offers.items():
        entries = {int(c): float(s) for c, s in zip(table[row], scores[row]) if c >= 0}
        for cls, score in offered:
            if cls in entries:
                entries[cls] = score
        for cls, score in sorted(offered, key=lambda o: -o[1])[:k]:
            entries[cls] = score
        best = sorted(entries.items(), key=lambda e: -e[1])[:k]
        table[row] = torch.tensor([c for c, _ in best] + [-1] * (k - len(best)), dtype=table.dtype)
        scores[row] = torch.tensor([s for _, s in best] + [-math.inf] * (k - len(best)), dtype=scores.dtype)
    return table, scores


def test_offers_keep_each_rows_best_k_against_a_reference():
    gen = _gen(1)
    num_rows, k, start = 30, 4, 100  # the shard [100, 130) of a larger model
    table = torch.stack([torch.randperm(200, generator=gen)[:k] for _ in range(num_rows)]).int()
    table[3, 2:] = -1  # a row with fewer than k neighbours
    scores = torch.rand(num_rows, k, generator=gen).sort(dim=1, descending=True).values
    scores[3, 2:] = -math.inf
    classes = torch.tensor([5, 17, 104, 150, 190, 111])
    # Distinct rows per class, as a search finds them; some outside the shard.
    found = torch.stack([90 + torch.randperm(50, generator=gen)[:5] for _ in range(6)])
    found[found == start + 9] = 140  # row 9's offers come below
    found[2, 0] = 104  # a class found by its own row is never offered to it
    table[7, 1] = 5  # row 7 (class 107) holds class 5, which is offered to it again: its score renews
    found[0, 0] = 107
    found[5, 3] = -1  # nothing found
    found[:, 4] = start + 9  # six offers to row 9: only its best k compete
    found_scores = torch.rand(6, 5, generator=gen)
    # Row 9 holds the class whose offer to it is the worst of six: not among its best k
    # offers, it still takes that offer's (lower) score, and may drop out.
    worst = int(classes[found_scores[:, 4].argmin()])
    table[9, 1] = worst if worst not in table[9].tolist() else table[9, 1]
    scores[9, 1] = 0.999
    offers = {}
    for i, cls in enumerate(classes.tolist()):
        for j in range(5):
            row = int(found[i, j]) - start
            if 0 <= row < num_rows and int(found[i, j]) != cls:
                offers.setdefault(row, []).append((cls, float(found_scores[i, j])))
    assert len(offers[9]) == 6 and (5, float(found_scores[0, 0])) in offers[7] and worst in table[9].tolist()
    want_table, want_scores = _offer_reference(table, scores, offers, k)
    graph = class_graph.ClassGraph(table.clone(), scores.clone())
    class_graph.offer_neighbours(graph, classes, found, found_scores, start)
    assert torch.equal(graph.table, want_table)
    assert torch.equal(graph.scores, want_scores)
    assert not torch.equal(graph.table, table)  # the offers changed something


def _moved_weight():
    """(weights at the build, weights at the refresh): the labels' rows and a few others moved."""
    before = torch.randn(C, D, generator=_gen(2), dtype=torch.float64)
    after = before.clone()
    after[_LABELS.clamp(min=0)] += 1.5 * torch.randn(_LABELS.numel(), D, generator=_gen(3), dtype=torch.float64)
    after[[0, 30]] += 0.5  # rows that moved without being labels: not searched again
    return before, after


_LABELS = torch.tensor([4, 9, 4, 33, 60, -100, 21, 47])  # repeats, an ignored label, every rank's classes


def _expected_refresh(cosine):
    """The table and scores a refresh of _LABELS gives over the whole model, by brute force."""
    before, after = _moved_weight()
    old = _scores(before, cosine)
    table_scores, table = old.topk(K, dim=1)
    new = _scores(after, cosine)
    classes = _LABELS[_LABELS >= 0].unique()
    best_scores, best = new[classes].topk(K, dim=1)
    offers = {}
    for i, cls in enumerate(classes.tolist()):
        for j in range(K):
            offers.setdefault(int(best[i, j]), []).append((cls, float(best_scores[i, j])))
    table, table_scores = _offer_reference(table.int(), table_scores.float(), offers, K)
    table[classes], table_scores[classes] = best.int(), best_scores.float()
    return table, table_scores


def _refresh_shard(rank, world_size, cosine, index_type):
    start, stop = shard_range(C, world_size, rank)
    before, after = _moved_weight()
    index = make_index("torch", index_type, nlist=3, nprobe=3, cosine=cosine, copy_weights=False)
    table, scores = class_graph.build_class_graph(
        before[start:stop], start, C, K, index, cosine=cosine, block_rows=7, keep_scores=True
    )
    graph = class_graph.ClassGraph(table, scores, index)
    # Searched in blocks of 4 classes (the last one short).
    searched = class_graph.refresh_class_graph(graph, after[start:stop], _LABELS, start, C, cosine=cosine, block_rows=4)
    return start, stop, searched, graph.table, graph.scores


@pytest.mark.parametrize("cosine, index_type", [(False, "flat"), (True, "ivf")])
def test_refresh_on_one_process_matches_brute_force(cosine, index_type):
    """Flat, or an IVF probing all its lists (exact as well, over lists filed at the build)."""
    want_table, want_scores = _expected_refresh(cosine)
    _, _, searched, table, scores = _refresh_shard(0, 1, cosine, index_type)
    assert searched == 6  # distinct valid labels
    assert torch.equal(table, want_table)
    torch.testing.assert_close(scores, want_scores)
    build_table = _scores(_moved_weight()[0], cosine).topk(K, dim=1).indices.int()
    unsearched = [r for r in range(C) if r not in _LABELS.tolist()]
    assert not torch.equal(table[unsearched], build_table[unsearched])  # offers reached rows not searched


def test_refresh_over_three_ranks_matches_one_process():
    want_table, want_scores = _expected_refresh(True)
    for start, stop, searched, table, scores in run_ranks(_refresh_shard, 3, True, "flat"):
        assert searched == 6
        assert torch.equal(table, want_table[start:stop])
        torch.testing.assert_close(scores, want_scores[start:stop])


@pytest.mark.parametrize("search", ["probes", "groups"])
def test_refresh_over_an_ivf_searches_as_asked(search):
    """Over an IVF probing 2 of its 6 lists, a refresh finds what its search finds for the
    labels' rows (each row's own probes, or its group's lists); every build searches with
    the probes."""
    before, after = _moved_weight()
    index = make_index("torch", "ivf", nlist=6, nprobe=2, copy_weights=False)
    table, scores = class_graph.build_class_graph(before, 0, C, K, index, keep_scores=True)
    graph = class_graph.ClassGraph(table, scores, index)
    class_graph.refresh_class_graph(graph, after, _LABELS, 0, C, search=search)
    classes = _LABELS[_LABELS >= 0].unique()
    find = index.search_by_list_groups if search == "groups" else index.search
    _, rows = find(after[classes], K + 1, after)
    want = [[int(r) for r in found if r != c][:K] for c, found in zip(classes.tolist(), rows)]
    assert graph.table[classes].tolist() == want


def test_refresh_needs_the_scores_and_index():
    graph = class_graph.ClassGraph(torch.zeros(C, K, dtype=torch.int32))
    with pytest.raises(ValueError, match="keep_scores=True"):
        class_graph.refresh_class_graph(graph, torch.randn(C, D), _LABELS, 0, C)
    with pytest.raises(ValueError, match="window_steps >= 1"):
        class_graph.refresh_class_graph(class_graph.ClassGraph.empty(C, K, "cpu"), torch.randn(C, D), _LABELS, 0, C)


# ----------------------------------------------------------------------------------------
# Refreshes of the moved rows, with no index (head.graph_refresh_window)
# ----------------------------------------------------------------------------------------


def _moved_reference(refreshes, num_classes, k, window_steps, cosine):
    """Table and scores after ``refreshes`` [(step, weight, labels)] of an empty graph, by
    brute force: each class is searched over the rows refreshed within ``window_steps`` and
    its neighbours before the refresh, then offered to the rows it found."""
    table = torch.full((num_classes, k), -1, dtype=torch.int32)
    scores = torch.full((num_classes, k), -math.inf)
    moved_at = torch.full((num_classes,), -1)
    for step, weight, labels in refreshes:
        classes = labels[labels >= 0].unique()
        moved_at[classes] = step
        window = {row for row, at in enumerate(moved_at.tolist()) if at >= 0 and at > step - window_steps}
        similar = _scores(weight, cosine)
        found, offers = {}, {}
        for cls in classes.tolist():
            candidates = (window | {int(r) for r in table[cls] if r >= 0}) - {cls}
            found[cls] = sorted(candidates, key=lambda r: -float(similar[cls, r]))[:k]
            for row in found[cls]:
                offers.setdefault(row, []).append((cls, float(similar[cls, row])))
        table, scores = _offer_reference(table, scores, offers, k)
        for cls, rows in found.items():
            table[cls] = torch.tensor(rows + [-1] * (k - len(rows)), dtype=torch.int32)
            scores[cls] = torch.tensor([float(similar[cls, r]) for r in rows] + [-math.inf] * (k - len(rows)))
    return table, scores, moved_at


def _moved_refreshes():
    """Three refreshes of one model: labels that meet again, weights that move between them."""
    labels = [_LABELS, torch.tensor([4, 10, 33, 52, 18, 18]), torch.tensor([9, 52, 40, 4, 59, 2, 33])]
    weights = [torch.randn(C, D, generator=_gen(40 + i), dtype=torch.float64) for i in range(3)]
    return [(10 * (i + 1), weights[i], labels[i]) for i in range(3)]


def _moved_refresh_shard(rank, world_size, cosine, window_steps):
    start, stop = shard_range(C, world_size, rank)
    graph = class_graph.ClassGraph.empty(stop - start, K, "cpu")
    for step, weight, labels in _moved_refreshes():
        class_graph.refresh_class_graph(
            graph,
            weight[start:stop],
            labels,
            start,
            C,
            cosine=cosine,
            block_rows=4,
            step=step,
            window_steps=window_steps,
        )
    return start, stop, graph.table, graph.scores, graph.moved_at


@pytest.mark.parametrize("cosine, window_steps", [(False, 10), (True, 20), (True, 30)])
def test_moved_refresh_on_one_process_matches_brute_force(cosine, window_steps):
    """Windows of the last refresh, the last two and all three."""
    want_table, want_scores, want_moved = _moved_reference(_moved_refreshes(), C, K, window_steps, cosine)
    _, _, table, scores, moved_at = _moved_refresh_shard(0, 1, cosine, window_steps)
    assert torch.equal(table, want_table)
    # Rows never refreshed are in no window, however long: every neighbour was refreshed.
    assert set(table[table >= 0].tolist()) <= set((moved_at >= 0).nonzero().squeeze(1).tolist())
    torch.testing.assert_close(scores, want_scores)
    assert torch.equal(moved_at, want_moved)
    # The window decides: each graph differs from that of the narrowest or the widest window.
    other = _moved_reference(_moved_refreshes(), C, K, 30 if window_steps < 30 else 10, cosine)[0]
    assert not torch.equal(table, other)


def test_moved_refresh_through_the_group_topk_kernel_matches_brute_force(monkeypatch):
    """The window searched as on a GPU, by the list-group top-k kernel (here in float32 on
    Triton's interpreter, tiles of 2 rows so that the later windows take it)."""
    import hydrahead.head.index as index_mod
    from hydrahead.kernels import group_topk

    calls, kernel = [], group_topk.group_topk

    def spy(*args, **kwargs):
        calls.append(args[1].shape[0])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(group_topk, "group_topk", spy)
    monkeypatch.setattr(index_mod, "GROUP_TOPK", "kernel")
    monkeypatch.setattr(index_mod, "GROUP_TOPK_BLOCK_ROWS", 2)
    want_table, want_scores, _ = _moved_reference(_moved_refreshes(), C, K, 20, True)
    _, _, table, scores, _ = _moved_refresh_shard(0, 1, True, 20)
    assert len(calls) >= 2 and min(calls) > 2 * K  # the later windows (k + 1 tiles of 2 rows), every block
    assert torch.equal(table, want_table)
    torch.testing.assert_close(scores, want_scores)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moved_refresh_on_a_gpu_finds_the_brute_force_neighbours(monkeypatch):
    """bf16 rows on the GPU, the later windows (over 13 tiles of 128 rows) searched by the
    group top-k kernel in bf16: the refreshed classes hold the float64 brute force's
    neighbours, and their best scores agree to bf16's precision."""
    from hydrahead.kernels import group_topk

    calls, kernel = [], group_topk.group_topk

    def spy(*args, **kwargs):
        calls.append(args[1].shape[0])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(group_topk, "group_topk", spy)
    gen = torch.Generator().manual_seed(7)
    num_classes, dim, k = 4000, 64, 12
    weights = [torch.randn(num_classes, dim, generator=gen, dtype=torch.float64) for _ in range(3)]
    labels = [torch.randint(0, num_classes, (1000,), generator=gen) for _ in range(3)]
    refreshes = [(10 * (i + 1), weights[i], labels[i]) for i in range(3)]
    want_table, want_scores, _ = _moved_reference(refreshes, num_classes, k, 30, True)
    graph = class_graph.ClassGraph.empty(num_classes, k, "cuda")
    for step, weight, step_labels in refreshes:
        class_graph.refresh_class_graph(
            graph, weight.cuda().bfloat16(), step_labels.cuda(), 0, num_classes, cosine=True, step=step, window_steps=30
        )
    assert calls and min(calls) > 12 * 128
    refreshed = labels[2].unique()  # the last refresh's classes: searched over the widest window
    table, scores = graph.table.cpu()[refreshed], graph.scores.cpu()[refreshed]
    assert class_graph.neighbour_recall(table, want_table[refreshed]) > 0.97
    torch.testing.assert_close(scores[:, 0], want_scores[refreshed][:, 0], atol=0.02, rtol=0)


def test_moved_refresh_over_three_ranks_matches_one_process():
    want_table, want_scores, want_moved = _moved_reference(_moved_refreshes(), C, K, 20, True)
    for start, stop, table, scores, moved_at in run_ranks(_moved_refresh_shard, 3, True, 20):
        assert torch.equal(table, want_table[start:stop])
        torch.testing.assert_close(scores, want_scores[start:stop])
        assert torch.equal(moved_at, want_moved[start:stop])


# ----------------------------------------------------------------------------------------
# The selector
# ----------------------------------------------------------------------------------------

C1, G = 90, 6


def _selector(**options):
    base = dict(num_classes=C1, graph_k=3, index="torch", index_type="flat", recall_every=0)
    return ActiveClassSelector("graph", 0, C1, **{**base, **options})


def _batch(step):
    gen = _gen(100 + step)
    return torch.randn(G, D, generator=gen, dtype=torch.float64), torch.randint(0, C1, (G,), generator=gen)


def _weight(step):
    return torch.randn(C1, D, generator=_gen(200 + step), dtype=torch.float64)


class _Call(NamedTuple):
    """One refresh as the selector asked for it: where it ran, over which rows and labels,
    with which moved-row marks (or True: k-means anew; None: no lists)."""

    thread: str
    weight: torch.Tensor
    labels: torch.Tensor
    moved: torch.Tensor | bool | None


def _recording(selector) -> list[_Call]:
    """Record each refresh (``_Call``), then run it."""
    calls, original = [], selector._refresh

    def refresh(graph, weight, labels, moved, group, step):
        marks = moved.clone() if isinstance(moved, torch.Tensor) else moved
        calls.append(_Call(threading.current_thread().name, weight, labels.clone(), marks))
        return original(graph, weight, labels, moved, group, step)

    selector._refresh = refresh
    return calls


def test_refreshes_take_the_labels_since_the_last_one_and_builds_cover_theirs():
    selector = _selector(deterministic=True, rebuild_every=5, graph_refresh_every=3)
    calls = _recording(selector)
    labels, refreshed_at = {}, []
    for step in range(1, 10):
        features, labels[step] = _batch(step)
        before = len(calls)
        selector.select(step, features, labels[step], _weight(step))
        if len(calls) > before:
            refreshed_at.append(step)
            # The refreshed labels' rows are now their exact nearest classes by this step's weights.
            classes = labels[step].unique()
            want = _scores(_weight(step), False)[classes].topk(3, dim=1).indices
            assert torch.equal(selector.graph_state()[0][classes].long(), want)
    assert refreshed_at == [3, 6, 9]
    # Step 3: the labels of steps 1-3. The build of step 5 read the weights that steps 1-4
    # moved, so step 6 takes those of 5 and 6, and step 9 those of 6 (moved since) to 9.
    taken = [call.labels for call in calls]
    assert torch.equal(taken[0], torch.cat([labels[1], labels[2], labels[3]]))
    assert torch.equal(taken[1], torch.cat([labels[5], labels[6]]))
    assert torch.equal(taken[2], torch.cat([labels[s] for s in (6, 7, 8, 9)]))
    assert all(call.moved is None for call in calls)  # flat: no lists to file
    assert selector.last["graph_refreshed"] == taken[2].unique().numel()  # the newest refresh's classes


def test_an_ivf_refresh_files_the_rows_updated_since_the_last_one():
    selector = _selector(deterministic=True, rebuild_every=100, graph_refresh_every=2, index_type="ivf", nlist=4)
    calls = _recording(selector)
    updated = {}
    for step in range(1, 6):
        features, labels = _batch(step)
        updated[step] = selector.select(step, features, labels, _weight(step))
    assert len(calls) == 2  # steps 2 and 4
    for call, steps in zip(calls, [(1,), (2, 3)]):
        want = torch.zeros(C1, dtype=torch.bool)
        for step in steps:
            want[updated[step]] = True
        assert torch.equal(call.moved, want)
    # The lists now hold the moved rows where they are nearest by the weights of step 4.
    index = selector._current.index.index
    moved_rows = calls[1].moved.nonzero().squeeze(1)
    centroids = index._centroids
    nearest = (_weight(4).float()[moved_rows] @ centroids.T).argmax(1)
    assert torch.equal(index._assign[moved_rows].long(), nearest.to(index._assign.device).long())


def test_every_retrain_every_th_ivf_refresh_runs_k_means_anew():
    selector = _selector(
        deterministic=True, rebuild_every=100, graph_refresh_every=1, index_type="ivf", nlist=4, retrain_every=2
    )
    calls = _recording(selector)
    indexes = []
    for step in range(1, 5):
        features, labels = _batch(step)
        selector.select(step, features, labels, _weight(step))
        indexes.append(selector._current.index.index)
    assert [call.moved is True for call in calls] == [False, True, False, True]
    # A k-means run fits the lists to the rows as they are: those of step 2, then of step 4.
    fresh = make_index("torch", "ivf", nlist=4, nprobe=selector._index_options["nprobe"], copy_weights=False)
    fresh.build(_weight(4))
    assert torch.equal(indexes[3]._centroids, fresh._centroids) and torch.equal(indexes[3]._assign, fresh._assign)
    assert not torch.equal(indexes[2]._centroids, indexes[3]._centroids)


def test_a_graph_refreshed_from_its_moved_rows_starts_empty_and_is_never_rebuilt():
    """No index: the graph is empty until the first refresh, and the refreshes at 3, 6 and 9
    (each over the rows refreshed within the last 2 refreshes and the classes' neighbours)
    give the brute-force table, through rebuilds due every 2 steps."""
    selector = _selector(deterministic=True, rebuild_every=2, graph_refresh_every=3, graph_refresh_window=2)
    calls = _recording(selector)
    labels = {}
    for step in range(1, 10):
        features, labels[step] = _batch(step)
        selector.select(step, features, labels[step], _weight(step))
        if step < 3:
            assert (selector.graph_state()[0] == -1).all()
    assert selector._current.index.index is None and selector._dirty is None
    assert len(calls) == 3 and all(call.moved is None for call in calls)
    refreshes = [(step, _weight(step), call.labels) for step, call in zip((3, 6, 9), calls)]
    want_table, want_scores, _ = _moved_reference(refreshes, C1, 3, 6, False)
    assert torch.equal(selector.graph_state()[0], want_table)
    torch.testing.assert_close(selector.graph_scores(), want_scores)
    restored = _selector(deterministic=True, rebuild_every=2, graph_refresh_every=3, graph_refresh_window=2)
    (table, built_step), seen = selector.graph_state(), selector.seen_labels(3 * G)
    with pytest.raises(ValueError, match="moved_at"):
        restored.load_graph_state(table.clone(), built_step, selector.graph_scores().clone(), seen, _weight(9))
    restored.load_graph_state(
        table.clone(), built_step, selector.graph_scores().clone(), seen, _weight(9), selector.graph_moved_at().clone()
    )
    for step in range(10, 13):  # a refresh at 12, whose window holds the rows refreshed at 9
        batch = _batch(step)
        assert torch.equal(restored.select(step, *batch, _weight(step)), selector.select(step, *batch, _weight(step)))
    assert torch.equal(restored.graph_state()[0], selector.graph_state()[0])
    assert torch.equal(restored.graph_moved_at(), selector.graph_moved_at())


def test_background_refreshes_run_in_the_worker_and_land():
    selector = _selector(rebuild_every=100, graph_refresh_every=2)
    calls = _recording(selector)
    for step in range(1, 8):
        features, labels = _batch(step)
        selector.select(step, features, labels, _weight(step))
    selector._harvest(wait=True)
    # Due at steps 2, 4 and 6; one that falls due while the last still runs starts a step later.
    assert 1 <= len(calls) <= 3 and all(call.thread.startswith("knn-index") for call in calls)
    assert selector.last["graph_refreshed"] > 0
    # The newest refresh searched its labels' rows over the weights of the step that started it.
    classes = calls[-1].labels.unique()
    want = _scores(calls[-1].weight, False)[classes].topk(3, dim=1).indices
    assert torch.equal(selector.graph_state()[0][classes].long(), want)
    selector.close()


def test_a_restored_refreshed_graph_goes_on_as_the_uninterrupted_one():
    """graph_state, graph_scores and seen_labels saved after step 4 (a refresh at 3, the
    labels of 3 and 4 waiting for the one at 6) and loaded into a new selector: the steps
    after select the same rows and leave the same table and scores."""
    options = dict(deterministic=True, rebuild_every=100, graph_refresh_every=3)
    original = _selector(**options)
    for step in range(1, 5):
        original.select(step, *_batch(step), _weight(step))
    (table, built_step), scores = original.graph_state(), original.graph_scores()
    seen = original.seen_labels(3 * G)
    assert (seen >= 0).sum() == 2 * G  # the labels of steps 3 and 4
    restored = _selector(**options)
    restored.load_graph_state(table.clone(), built_step, scores.clone(), seen, _weight(4))
    for step in range(5, 10):  # refreshes at 6 and 9
        batch = _batch(step)
        assert torch.equal(restored.select(step, *batch, _weight(step)), original.select(step, *batch, _weight(step)))
    assert torch.equal(restored.graph_state()[0], original.graph_state()[0])
    assert torch.equal(restored.graph_scores(), original.graph_scores())
    with pytest.raises(ValueError, match="more than the 5 saved"):  # step 9's labels wait for the next
        original.seen_labels(G - 1)
    with pytest.raises(ValueError, match="resumes from its table, scores and seen labels"):
        _selector(**options).load_graph_state(table, built_step)


def _background_refreshes(rank, world_size):
    """Background refreshes on the build group of 2 ranks, each over its shard of one model."""
    import torch.distributed as dist

    build_group = dist.new_group(list(range(world_size)))
    start, stop = shard_range(C1, world_size, rank)
    selector = ActiveClassSelector(
        "graph",
        start,
        stop,
        num_classes=C1,
        graph_k=3,
        index="torch",
        index_type="flat",
        recall_every=0,
        rebuild_every=100,
        graph_refresh_every=2,
        build_group=build_group,
    )
    calls = _recording(selector)
    weights = []
    for step in range(1, 8):
        features, labels = _batch(step)
        weights.append(_weight(step))
        selector.select(step, features, labels, weights[-1][start:stop])
    selector._harvest(wait=True)
    table = selector.graph_state()[0]
    selector.close()
    # Which step the newest refresh started at: the one whose labels end its list.
    last = next(s for s in range(7, 0, -1) if torch.equal(calls[-1].labels[-G:], _batch(s)[1]))
    return start, [call.labels for call in calls], last, table


def test_background_refreshes_over_two_ranks_agree_and_match_brute_force():
    results = run_ranks(_background_refreshes, 2)
    (start0, calls0, last0, _), (_, calls1, last1, _) = results
    assert len(calls0) == len(calls1) >= 1 and last0 == last1  # the ranks started each refresh together
    assert all(torch.equal(a, b) for a, b in zip(calls0, calls1))
    classes = calls0[-1].unique()
    want = _scores(_weight(last0), False)[classes].topk(3, dim=1).indices
    table = torch.cat([table for _, _, _, table in sorted(results, key=lambda r: r[0])])
    assert torch.equal(table[classes].long(), want)


@pytest.mark.parametrize(
    "selection, options, message",
    [
        ("knn", dict(graph_refresh_every=2), "it takes selection=graph"),
        ("graph", dict(graph_refresh_every=-1), "graph_refresh_every must be an int >= 0"),
        ("graph", dict(graph_refresh_every=2, index="faiss"), "not faiss"),
        ("graph", dict(graph_refresh_window=2), "needs graph_refresh_every > 0"),
        ("graph", dict(graph_refresh_every=2, graph_refresh_window=-1), "graph_refresh_window must be an int >= 0"),
    ],
)
def test_bad_refresh_options_fail_clearly(selection, options, message):
    base = dict(num_classes=C1, graph_k=3, index="torch", index_type="flat", budget=20)
    with pytest.raises(ValueError, match=message):
        ActiveClassSelector(selection, 0, C1, **{**base, **options})


def test_refresh_config_key_is_checked():
    from hydrahead.config import ConfigError, load_config, validate

    validate(load_config(None, ["head.selection=graph", "head.graph_refresh_every=10"]))
    for overrides, match in [
        (["head.selection=knn", "head.graph_refresh_every=10"], "head.graph_refresh_every"),
        (["head.selection=graph", "head.graph_refresh_every=-1"], "head.graph_refresh_every"),
        (["head.selection=graph", "head.graph_refresh_every=10", "head.index=faiss"], "head.index torch or auto"),
        (["head.selection=graph", "head.graph_refresh_window=4"], "head.graph_refresh_every > 0"),
        (["head.selection=graph", "head.graph_refresh_every=10", "head.graph_refresh_window=-1"], "window"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate(load_config(None, overrides))


# ----------------------------------------------------------------------------------------
# The trainer: a deterministic run with refreshes resumes as if never stopped
# ----------------------------------------------------------------------------------------

REFRESHED = [
    "head.selection=graph",
    "head.graph_k=4",
    "head.index=torch",
    "head.index_type=flat",
    "head.index_deterministic=true",
    "head.rebuild_every=100",
    "head.graph_refresh_every=2",
    "train.eval_every=0",
    "train.steps=12",
    "head.num_classes=60",  # the labels of one refresh period (3 x 8 of 60 classes) meet again in the next
    "train.global_batch=8",
]


@pytest.mark.parametrize("index_type", ["flat", "ivf", "moved"])
def test_trainer_resumes_a_refreshed_graph_exactly(tmp_path, index_type):
    """Stopped at step 9 (a refresh at 8, the labels of 8 and 9 waiting for the one at 10),
    the resumed run's losses are the uninterrupted run's, bit for bit. Over an IVF probing 1
    of its 4 lists its lists come back too, with the rows moved since the last refresh (filed
    again at 10) and the refreshes' count (the 6th, at 12, runs k-means). Refreshed from
    its moved rows (no index, a window of 2 refreshes), the rows' refresh steps come back."""
    moved = ["head.graph_refresh_window=2"] if index_type == "moved" else []
    options = [
        *REFRESHED,
        *moved,
        f"head.index_type={'flat' if moved else index_type}",
        "head.index_nlist=4",
        "head.index_nprobe=1",
        "head.index_retrain_every=3",
    ]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(whole, 2, *options)
    launch(resumed, 2, *options, "train.stop_after=9")
    proc = launch(resumed, 2, *options)
    assert "resumed at step 9" in proc.stdout + proc.stderr
    assert "class graph is rebuilt" not in proc.stderr and "index is built anew" not in proc.stderr, proc.stderr[-2000:]
    want, got = train_losses(whole), train_losses(resumed)
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(10, 13)] == [want[s] for s in range(10, 13)]
