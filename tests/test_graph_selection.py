"""head.selection=graph: the class graph against brute force on one process and split over
2 and 3 gloo ranks, the loss over its rows, the selector's rebuilds, recall and saved
tables, and the trainer through torchrun (background builds; a deterministic resume at
another world size)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dist_harness import run_ranks
from launcher import launch, metrics
from selector_timing import slow_background_builds, timed_steps

from hydrahead.distributed.sharding import shard_range
from hydrahead.head import ShardedClassifier, init_class_weights
from hydrahead.head import graph as class_graph
from hydrahead.head.active import ActiveClassSelector
from hydrahead.head.index import make_index
from hydrahead.train.checkpoint import latest_checkpoint


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute_force_graph(weight, k, cosine):
    """Each class's k nearest other classes, float64, best first."""
    w = F.normalize(weight.double(), dim=1) if cosine else weight.double()
    scores = w @ w.T
    scores.fill_diagonal_(-math.inf)
    return scores.topk(min(k, weight.shape[0] - 1), dim=1).indices


def _brute_force_topk(queries, weight, k, cosine, exclude):
    """Exact best k classes for each query (float64), leaving out ``exclude``."""
    q, w = queries.double(), weight.double()
    if cosine:
        q, w = F.normalize(q, dim=1), F.normalize(w, dim=1)
    scores = q @ w.T
    scores[torch.arange(q.shape[0]), exclude] = -math.inf
    return scores.topk(k, dim=1).indices


def _flat(cosine):
    return make_index("torch", "flat", cosine=cosine, copy_weights=False)


# ========================================================================================
# 1. The graph on one process
# ========================================================================================


@pytest.mark.parametrize("cosine", [False, True])
def test_graph_equals_brute_force_on_one_process(cosine):
    weight = torch.randn(200, 16, generator=_gen(1), dtype=torch.float64) * torch.rand(200, 1, generator=_gen(2))
    want = _brute_force_graph(weight, 5, cosine)
    # An exact index, queried in rounds of 37 rows (the last one short).
    table = class_graph.build_class_graph(weight, 0, 200, 5, _flat(cosine), cosine=cosine, block_rows=37)
    assert table.dtype == torch.int32 and table.shape == (200, 5)
    assert torch.equal(table.long(), want)
    # Some classes' rows alone (as the benchmark builds them), from an index over every row.
    index = _flat(cosine)
    index.build(weight)
    some_rows = torch.tensor([199, 3, 50, 0])
    assert torch.equal(class_graph.graph_rows(index, weight, some_rows, 5, cosine=cosine).long(), want[some_rows])
    # An IVF index probing every list is exact too; probing 2 of 10 misses neighbours.
    # Likewise searched by list groups (the rows taken list by list, in rounds of 37).
    every = make_index("torch", "ivf", nlist=10, nprobe=10, cosine=cosine, copy_weights=False)
    assert torch.equal(class_graph.build_class_graph(weight, 0, 200, 5, every, cosine=cosine).long(), want)
    grouped = class_graph.build_class_graph(weight, 0, 200, 5, every, cosine=cosine, block_rows=37, search="groups")
    assert torch.equal(grouped.long(), want)
    for search in class_graph.GRAPH_SEARCHES:
        some = make_index("torch", "ivf", nlist=10, nprobe=2, cosine=cosine, copy_weights=False)
        table = class_graph.build_class_graph(weight, 0, 200, 5, some, cosine=cosine, search=search)
        assert 0.3 < class_graph.neighbour_recall(table, want) < 1.0


def test_graph_k_is_clamped_to_the_other_classes():
    weight = torch.randn(6, 4, generator=_gen(3), dtype=torch.float64)
    table = class_graph.build_class_graph(weight, 0, 6, 50, _flat(False))
    assert table.shape == (6, 5)
    for c in range(6):
        assert sorted(table[c].tolist()) == [o for o in range(6) if o != c]
    with pytest.raises(ValueError, match="owns classes"):
        class_graph.build_class_graph(weight, 1, 7, 3, _flat(False))  # the one rank owns [0, 7), not [1, 7)
    with pytest.raises(ValueError, match="num_classes"):
        class_graph.build_class_graph(weight[:1], 0, 1, 3, _flat(False))


# ========================================================================================
# 2. Split over 2 and 3 ranks: each rank holds exactly its classes' rows of the graph
# ========================================================================================

NUM_CLASSES, DIM, BATCH, GRAPH_K = 53, 12, 20, 4  # 53 classes: shards of 27/26 and 18/18/17


def _full_weight(cosine):
    """The head's rows of every class, as ShardedClassifier initialises them at any split."""
    weight = torch.empty(NUM_CLASSES, DIM, dtype=torch.float64)
    init_class_weights(weight, 0, seed=7, std=0.5)
    return weight


def _global_batch():
    gen = _gen(11)
    features = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
    labels[::6] = -100
    return features, labels


def _graph_on_ranks(rank, world_size, cosine):
    start, stop = shard_range(NUM_CLASSES, world_size, rank)
    weight = _full_weight(cosine)
    features, labels = _global_batch()
    out = {"start": start, "stop": stop}
    # Rounds of 7 rows: rank 0's shard takes more rounds than its rows fill on the others.
    out["table"] = class_graph.build_class_graph(
        weight[start:stop], start, NUM_CLASSES, GRAPH_K, _flat(cosine), cosine=cosine, block_rows=7
    )
    # An IVF index probing all its lists is exact too, also when the build takes the rows
    # list by list and searches them by list groups.
    ivf = make_index("torch", "ivf", nlist=3, nprobe=3, cosine=cosine, copy_weights=False)
    out["table_ivf"] = class_graph.build_class_graph(
        weight[start:stop], start, NUM_CLASSES, GRAPH_K, ivf, cosine=cosine, block_rows=7, search="groups"
    )
    out["ivf_order"] = class_graph.query_order(ivf, stop - start, weight.device, "groups")
    out["label_ids"] = class_graph.label_neighbours(out["table"], labels, start)
    out["rows"] = class_graph.owned_rows(out["label_ids"], start, stop)
    queries = F.normalize(features, dim=1) if cosine else features
    out["exact"] = class_graph.exact_class_topk(
        queries, weight[start:stop], start, 6, cosine=cosine, exclude=labels.clamp(min=0)
    )

    # The head over the selector's graph rows: the loss and its feature gradient (this rank's part).
    head = ShardedClassifier(
        NUM_CLASSES,
        DIM,
        seed=7,
        init_std=0.5,
        dtype=torch.float64,
        momentum_dtype=torch.float64,
        impl="reference",
        margin_type="cosface" if cosine else "none",
        scale=8.0 if cosine else 1.0,
        margin=0.2 if cosine else 0.0,
    )
    selector = ActiveClassSelector(
        "graph",
        head.class_start,
        head.class_stop,
        num_classes=NUM_CLASSES,
        graph_k=GRAPH_K,
        index="torch",
        index_type="flat",
        deterministic=True,
        cosine=cosine,
        recall_every=1,
    )
    f = features.clone().requires_grad_()
    out["active"] = selector.select(1, f, labels, head.weight)
    loss = head.loss(f, labels, out["active"])
    loss.backward()
    out["loss"], out["grad"] = loss.detach(), f.grad
    out["graph_recall"], out["active_recall"] = selector.last["graph_recall"], selector.last["active_recall"]
    selector.close()
    return out


def _check_ranks(results, cosine):
    weight = _full_weight(cosine)
    features, labels = _global_batch()
    graph = _brute_force_graph(weight, GRAPH_K, cosine)
    valid = labels >= 0
    label_ids = torch.where(valid.unsqueeze(1), graph[labels.clamp(min=0)], -1)
    exact = _brute_force_topk(features, weight, 6, cosine, labels.clamp(min=0))
    active = set(labels[valid].tolist()) | set(label_ids[valid].flatten().tolist())
    for out in results:
        start, stop = out["start"], out["stop"]
        assert torch.equal(out["table"].long(), graph[start:stop])  # this shard's rows of the whole graph
        assert torch.equal(out["table_ivf"].long(), graph[start:stop])
        assert sorted(out["ivf_order"].tolist()) == list(range(stop - start))  # every row once
        assert torch.equal(out["label_ids"], label_ids)  # every label's neighbours, on every rank
        owned = (label_ids >= start) & (label_ids < stop)
        assert torch.equal(out["rows"], torch.where(owned, label_ids - start, -1))
        assert torch.equal(out["exact"], exact)
        assert sorted((out["active"] + start).tolist()) == sorted(c for c in active if start <= c < stop)
    assert sum(out["active"].numel() for out in results) == len(active)
    assert any(not torch.equal(out["ivf_order"], torch.arange(out["stop"] - out["start"])) for out in results)

    # The loss over the union of the ranks' rows is the plain cross-entropy over those classes.
    classes = torch.tensor(sorted(active))
    w = weight[classes]
    target = torch.searchsorted(classes, labels.clamp(min=0))
    f = features.clone().requires_grad_()
    if cosine:
        logits = F.normalize(f, dim=1) @ F.normalize(w, dim=1).T
        logits = 8.0 * (logits - 0.2 * F.one_hot(target, classes.numel()).double())
    else:
        logits = f @ w.T
    want = F.cross_entropy(logits, torch.where(valid, target, -100), ignore_index=-100)
    want.backward()
    for out in results:
        assert float(out["loss"]) == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(sum(out["grad"] for out in results), f.grad, rtol=0, atol=1e-12)

    # Recall, measured by the selector over all shards: the graph is exact and fresh, and the
    # features' graph_k hardest negatives (of the first 64 valid samples: all) are in the union or not.
    hardest = _brute_force_topk(features[valid], weight, GRAPH_K, cosine, labels[valid])
    found = torch.tensor([c in active for c in hardest.flatten().tolist()], dtype=torch.float64)
    for out in results:
        assert out["graph_recall"] == 1.0
        assert out["active_recall"] == pytest.approx(float(found.mean()), abs=1e-12)
    assert 0 < float(found.mean()) < 1  # some but not all: the check above can tell


def _two_rank_cases(rank, world_size):
    return _graph_on_ranks(rank, world_size, True), _background_builds(rank, world_size)


@pytest.fixture(scope="module")
def two_ranks():
    """Both 2-rank cases in one launch of the ranks (each costs seconds on a loaded machine)."""
    results = run_ranks(_two_rank_cases, 2)
    return [graph for graph, _ in results], [background for _, background in results]


def test_graph_over_two_ranks_holds_exactly_each_shards_neighbours(two_ranks):
    _check_ranks(two_ranks[0], True)


def test_graph_over_three_ranks_holds_exactly_each_shards_neighbours():
    _check_ranks(run_ranks(_graph_on_ranks, 3, False), False)


def _mixed_index_build(rank, world_size):
    """8,195 classes over 2 ranks (4,098 and 4,097 rows): with exact_max_rows 4,097 the auto
    index is IVF on rank 0 and flat on rank 1, whose default blocks differ (65,536 rows for a
    search by list groups, 4,096 otherwise); the ranks must still run the same rounds."""
    num_classes = 8195
    weight = torch.randn(num_classes, 4, generator=_gen(31))
    start, stop = shard_range(num_classes, world_size, rank)
    index = make_index("torch", "auto", exact_max_rows=4097, nlist=4, nprobe=4, copy_weights=False)
    table = class_graph.build_class_graph(weight[start:stop], start, num_classes, 3, index, search="groups")
    return start, table, class_graph.build_block_rows(index, None, "groups")


def test_ranks_agree_on_the_build_blocks_when_their_indexes_differ():
    results = run_ranks(_mixed_index_build, 2, timeout=120)
    assert sorted(blocks for _, _, blocks in results) == [
        class_graph.DEFAULT_BLOCK_ROWS,
        class_graph.GROUPED_BLOCK_ROWS,
    ]
    weight = torch.randn(8195, 4, generator=_gen(31))
    sample = torch.arange(0, 8195, 97)
    want = _brute_force_graph(weight, 3, False)[sample]
    table = torch.cat([table for _, table, _ in sorted(results, key=lambda r: r[0])])
    assert torch.equal(table[sample].long(), want)  # both indexes search every row exactly here


def test_graph_on_one_rank_matches_too():
    _check_ranks([_graph_on_ranks(0, 1, True)], True)


def _background_builds(rank, world_size):
    """Background graph builds on a group of their own, beside the step's own collectives."""
    import torch.distributed as dist

    build_group = dist.new_group(list(range(world_size)))
    start, stop = shard_range(NUM_CLASSES, world_size, rank)
    weight = _full_weight(False)[start:stop].clone()
    selector = ActiveClassSelector(
        "graph",
        start,
        stop,
        num_classes=NUM_CLASSES,
        graph_k=GRAPH_K,
        index="torch",
        index_type="ivf",
        nlist=4,
        nprobe=4,
        rebuild_every=2,
        max_index_age=4,
        recall_every=3,
        build_group=build_group,
    )
    built, ages = [], []
    for step in range(1, 8):
        features, labels = _global_batch()
        rows = selector.select(step, features, labels, weight)
        owned = labels[(labels >= start) & (labels < stop)] - start
        assert set(owned.tolist()) <= set(rows.tolist())
        weight[rows] += 0.1  # the step's update
        ages.append(selector.last["index_age"])
    selector._harvest(wait=True)
    built = selector._current.step
    recall = selector.last["graph_recall"]
    selector.close()
    return {"ages": ages, "built": built, "recall": recall}


def test_graph_background_builds_over_two_ranks(two_ranks):
    # The last build starts at step 6 (5 updates), or at 7 if a rank's previous build still
    # ran at 6; the ranks agree on it either way (their builds' collectives must pair up).
    outs = two_ranks[1]
    assert outs[0]["built"] == outs[1]["built"] in (5, 6)
    for out in outs:
        assert max(out["ages"]) <= 4  # max_index_age
        assert 0 <= out["recall"] <= 1


# ========================================================================================
# 3. The selector on one process: rebuild cadence, saved tables, fixed size, options
# ========================================================================================

C1 = 120


def _selector(**options):
    base = dict(num_classes=C1, graph_k=3, index="torch", index_type="flat", recall_every=0)
    return ActiveClassSelector("graph", 0, C1, **{**base, **options})


def _batch(seed):
    gen = _gen(seed)
    labels = torch.randint(0, C1, (10,), generator=gen)
    labels[3] = -100
    return torch.randn(10, DIM, generator=gen, dtype=torch.float64), labels


def _weight(seed):
    return torch.randn(C1, DIM, generator=_gen(seed), dtype=torch.float64)


def test_graph_search_by_list_groups_selects_what_the_probes_do_when_every_list_is_probed():
    """head.graph_search reaches the build: with every list probed both searches are exact,
    so both selectors pick the same rows; with fewer lists they build other graphs."""
    weight, (features, labels) = _weight(21), _batch(22)
    picked = {}
    for nprobe in (8, 2):
        for search in ("probes", "groups"):
            selector = _selector(index_type="ivf", nlist=8, nprobe=nprobe, deterministic=True, graph_search=search)
            picked[nprobe, search] = (selector.select(1, features, labels, weight), selector._current.index.table)
            selector.close()
    assert torch.equal(picked[8, "probes"][0], picked[8, "groups"][0])
    assert torch.equal(picked[8, "probes"][1], picked[8, "groups"][1])
    assert not torch.equal(picked[2, "probes"][1], picked[2, "groups"][1])


def test_graph_rebuilds_at_multiples_of_rebuild_every_inside_the_step():
    selector = _selector(deterministic=True, rebuild_every=3)
    builds, original = [], selector._build

    def counting_build(weight, step, *args, **kwargs):
        builds.append(step)
        built = original(weight, step, *args, **kwargs)
        assert torch.equal(built.index.table.long(), _brute_force_graph(weight, 3, False))  # from this step's rows
        return built

    selector._build = counting_build
    weight, ages = _weight(20), []
    for step in range(1, 11):
        selector.select(step, *_batch(30 + step), weight)
        ages.append(selector.last["index_age"])
        weight = weight + 0.3 * _weight(40 + step)
    assert builds == [0, 2, 5, 8]
    assert ages == [0, 1, 0, 1, 2, 0, 1, 2, 0, 1]
    assert selector._worker is None


def test_graph_background_rebuilds_never_stall_a_step():
    every, slow = 3, 1.0
    selector = _selector(rebuild_every=every)
    started = slow_background_builds(selector, slow)
    batch = lambda step: _batch(50 + step)  # noqa: E731
    # the build of step 3 ends in the pause after step 7
    seconds, built, _ = timed_steps(selector, _weight(21), batch, 10, pause_after=7, pause=slow + 0.3)
    # Step 3 starts a build; at step 6 it still runs, so the rebuild due there waits for
    # it to end (no step does) and starts at step 8, which also swaps in the build of 3.
    assert started == [0, 2, 7]
    assert built == [0, 0, 0, 0, 0, 0, 0, 2, 2, 2]
    assert all(s < slow / 2 for s in seconds[1:]), seconds


def test_graph_max_index_age_makes_a_step_wait():
    every, slow = 3, 1.0
    selector = _selector(rebuild_every=every, max_index_age=every)
    started = slow_background_builds(selector, slow)
    seconds, built, _ = timed_steps(selector, _weight(21), lambda step: _batch(50 + step), 10)
    # A step more than 3 updates past its index waits for the running build: step 5 (4
    # updates on an index of 0) for that of step 3, step 7 for that of 6, step 10 for that of 9.
    assert started == [0, 2, 5, 8]
    assert built == [0, 0, 0, 0, 2, 2, 5, 5, 5, 8]
    slow_steps = [step for step, s in enumerate(seconds, 1) if s >= slow / 2]
    assert slow_steps == [5, 7, 10], seconds


def test_saved_graph_table_selects_identically():
    weights = [_weight(60 + s) for s in range(10)]
    original = _selector(deterministic=True, rebuild_every=4)
    for step in range(1, 6):  # builds at steps 1 and 4
        original.select(step, *_batch(70 + step), weights[step])
    table, built_step = original.graph_state()
    assert built_step == 3 and table.shape == (C1, 3)

    restored, unrestored = (
        _selector(deterministic=True, rebuild_every=4),
        _selector(deterministic=True, rebuild_every=4),
    )
    empty = restored.empty_graph_table()
    assert empty.shape == table.shape and empty.dtype == table.dtype
    empty.copy_(table)
    restored.load_graph_state(empty, built_step)
    differs = False
    for step in range(6, 10):  # a rebuild at 8 from the same weights on both
        batch = _batch(70 + step)
        want = original.select(step, *batch, weights[step])
        assert torch.equal(restored.select(step, *batch, weights[step]), want), f"step {step}"
        assert restored.last["index_age"] == original.last["index_age"]
        if step == 6:  # without the table the graph is built from other weights
            differs = not torch.equal(unrestored.select(step, *batch, weights[step]), want)
    assert differs
    with pytest.raises(ValueError, match="graph table must be"):
        restored.load_graph_state(table[:, :2], 0)
    assert not _selector().saves_graph and _selector(deterministic=True).saves_graph


def test_graph_fixed_size_fills_the_union_to_g_times_k_plus_one():
    plain, fixed = _selector(), _selector(fixed_size=True)
    weight = _weight(80)
    features, labels = _batch(81)
    union = plain.select(1, features, labels, weight)
    rows = fixed.select(1, features, labels, weight)
    assert rows.numel() == 10 * 4 and set(union.tolist()) <= set(rows.tolist())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_classes=None), "needs num_classes >= 2"),
        (dict(num_classes=C1 + 1), r"owns classes \[0, 121\)"),
        (dict(graph_k=0), "graph_k must be an int >= 1"),
        (dict(fixed_size=True, budget=50), "no budget"),
        (dict(graph_search="lists"), "graph_search must be one of"),
    ],
)
def test_bad_graph_options_fail_clearly(options, message):
    with pytest.raises(ValueError, match=message):
        _selector(**options)


def test_graph_config_keys_are_checked():
    from hydrahead.config import ConfigError, load_config, validate

    validate(load_config(None, ["head.selection=graph", "head.graph_k=8", "head.knn_fixed_size=true"]))
    validate(load_config(None, ["head.selection=graph", "head.graph_search=groups"]))
    for overrides, match in [
        (["head.selection=graph", "head.graph_search=lists"], "head.graph_search"),
        (["head.selection=graph", "head.graph_k=0"], "head.graph_k"),
        (["head.selection=graph", "head.num_classes=1"], "head.num_classes >= 2"),
        (["head.selection=random", "head.budget=5", "head.knn_fixed_size=true"], "knn or graph"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate(load_config(None, overrides))


# ========================================================================================
# 4. The trainer through torchrun
# ========================================================================================

GRAPH = ["head.selection=graph", "head.graph_k=4", "head.index=torch", "head.index_type=ivf", "head.recall_every=2"]


def test_trainer_graph_background_logs_recall(tmp_path):
    """Two ranks, background builds every 3 steps on their own process group; a step whose graph
    is more than 6 updates old waits for the build (head.index_max_age), however slow the machine."""
    run_dir = tmp_path / "graph"
    launch(run_dir, 2, *GRAPH, "head.rebuild_every=3", "head.index_max_age=6", "train.eval_every=0")
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert "graph_recall" not in rows[0] and "active_recall" not in rows[0]  # step 1: nothing measured yet
    for row in rows:
        assert math.isfinite(row["loss"]) and 0 <= row["index_age"] <= 6
        assert 24 <= row["active_classes"] <= 51  # positives and neighbours of 48 labels, of 51/50 rows
        if row["step"] > 1:
            assert 0 <= row["graph_recall"] <= 1 and 0 < row["active_recall"] <= 1
    # Background: a rebuild step still serves the older graph (built inside the step, it would be 0 steps old).
    assert all(rows[step - 1]["index_age"] > 0 for step in (3, 6, 9, 12))
    assert any(row["graph_recall"] < 1 for row in rows[1:])


def test_trainer_deterministic_graph_resumes_at_another_world_size(tmp_path):
    """Saved by class at 2 ranks, the table serves the resumed 1-rank run until the next rebuild."""
    options = [*GRAPH, "head.index_type=flat", "head.rebuild_every=5", "head.index_deterministic=true"]
    run_dir = tmp_path / "graph"
    launch(run_dir, 2, *options, "train.stop_after=7")
    assert latest_checkpoint(run_dir).name == "step-7"
    first = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert [first[s]["index_age"] for s in range(1, 8)] == [0, 1, 2, 3, 0, 1, 2]
    # A fresh exact graph (steps 2 and 6, one update old) has most of the nearest classes.
    assert first[6]["graph_recall"] > 0.5
    proc = launch(run_dir, 1, *options)
    assert "resumed at step 7" in proc.stdout + proc.stderr
    assert "class graph is rebuilt" not in proc.stderr, proc.stderr[-2000:]
    rows = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert [rows[s]["index_age"] for s in range(8, 13)] == [3, 4, 0, 1, 2]  # the saved graph (step 5) served 8, 9
    assert all(math.isfinite(rows[s]["loss"]) for s in range(8, 13))


def test_two_ranks_build_the_graph_from_paid_rows_in_low_precision(tmp_path):
    """head.search_paid_rows with bf16 rows on uneven shards (101 and 100 classes): a rank
    whose whole shard was active owes nothing while the other owes steps; both hand the
    graph build rows of the stored dtype, so the build's exchange agrees on its sizes."""
    run_dir = tmp_path / "graph"
    options = ["head.num_classes=201", "head.budget=100", "head.weight_dtype=bf16", "head.momentum=0.9"]
    graph = [*GRAPH, "head.index_type=flat", "head.rebuild_every=2", "head.index_deterministic=true"]
    launch(run_dir, 2, *graph, *options, "head.search_paid_rows=true", "train.steps=4", "train.eval_every=0")
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
