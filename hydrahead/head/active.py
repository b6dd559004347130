"""Which rows of its shard a rank's head scores in one step, and the index behind ``knn``.

``ActiveClassSelector.select(step, features, labels, weight)`` returns the sorted local
rows of the shard that the loss and the update run over (``None`` for ``full``):

- ``random``: Partial FC: the owned positives of the global batch plus random negatives
  up to the budget (``selection.random_active``: keyed by (seed, step, class id)).
- ``knn``: the ``knn_k`` rows of highest score for each sample of the global batch (with
  ``knn_skip_label``, the default, other than the sample's own label: its hardest
  negatives), found in an index over the shard's weights, plus the owned positives, filled with
  random negatives up to the budget when one is set (``selection.knn_active``); with
  ``trim_to_budget`` a larger union is cut to the budget in neighbour rank order. Scores
  are cosines for the margin heads (normalised features and rows), inner products
  otherwise. Candidates are always scored with the stored weights as they are now; only
  the choice of candidates (the index's lists) can be stale. (With
  ``inactive_rows=continue`` a row that sat out steps is scored before it pays its
  deferred momentum and decay: the search sees where it was last written.)
- ``graph``: the ``graph_k`` nearest classes of each label of the global batch in the
  class graph (``hydrahead.head.graph``: each class's nearest classes over all shards by
  weight row, built from the weights at each rebuild), those this shard owns, plus the
  owned positives, filled as for knn. A step looks the graph up (one all-reduce of
  G x graph_k ids over ``group``); the search runs only in the rebuilds, over the same
  index backends as knn.

Index rebuilds (``knn``): the first step builds synchronously; after that a rebuild from
the current weights starts at every step that is a multiple of ``rebuild_every``. With
the torch IVF index a rebuild files again only the rows updated since the previous one
(the others have not moved, so their lists are what a full rebuild with the same
centroids would give), and every ``retrain_every``-th rebuild runs k-means anew and files
every row: at 25M rows that is ~2 s, against ~0.1 s for a rebuild in between.

- Background (default): the build runs in a worker thread (on its own CUDA stream on a
  GPU) while training goes on, and replaces the index at the first step after it ends.
  It is paced (``index.paced``): the worker waits for each piece of work it queues, so a
  step's kernels never queue behind more than one piece of the build's.
  It reads the live weights, so rows updated while it runs may be clustered from either
  version. No step waits for it: a rebuild that falls due while a build is still running
  starts at the first step after that build ends, and meanwhile the steps serve the
  newest index there is (``index_age`` in the metrics says how old). With
  ``max_index_age`` a step whose index is older than that waits for the running build.
- Deterministic (``deterministic=True``): the build runs in the step that starts it,
  from that step's weights, and serves from that step on. The index's state (centroids,
  the list of every row, the rows updated since the last build) goes into checkpoints, so
  a resumed run selects what the uninterrupted one did: exactly on the CPU; on a GPU the
  k-means sums add with atomics, so a later k-means run can differ in its last bits.

The class graph is built whole at each rebuild (no refiling). Its build runs collectives
when the head has several ranks, so every rank must start each build at the same step:
in the background (on ``build_group``, a process group of its own, in the worker thread)
a due rebuild starts once no rank has a build running, which the ranks agree on with a
one-int all-reduce over ``group`` at each step while a rebuild is due. Without a
``build_group`` a multi-rank graph is built inside the step. Deterministic graphs are
checkpointed as their tables (``graph_table``), by class: a resume at any world size
loads them.

Graph refreshes (``graph_refresh_every`` = N > 0): at every N-th step the rows of the
classes that were labels since the last refresh (this step's included) are searched
again from the current weights, over the index of the last build, and offered to the
rows they found (``class_graph.refresh_class_graph``): the rows a step moves most are the
labels', so the graph follows them for about N·G / C_r of a build's work. Refreshes run
where builds do (the worker, or the step), one job at a time: a refresh that falls due
while a build runs starts after it. A build covers the labels trained before the weights
it read. A background refresh writes the table in place: a step that looks it up
meanwhile may take some of a class's neighbours from before the refresh and some from
after (each a neighbour either way). Deterministic refreshed graphs over a torch IVF
checkpoint that index as knn's (``index_state``), with the moved rows' marks and the count
of refreshes towards the next k-means run. With ``graph_refresh_window`` = P > 0 there is
no index: the graph starts empty and is never rebuilt, and each refresh searches exactly
the rows refreshed in the last P refreshes and each class's neighbours; deterministic
runs checkpoint each row's refresh step (``graph_moved_at``) beside the table.

Statistics for the metrics log: ``active_classes`` (this step), ``knn_recall`` (the
fraction of the exact top-k rows that the index found, both without the sample's label
when the search skips it, measured every ``recall_every``
steps on ``recall_queries`` samples), ``graph_recall`` (the fraction of the exact
``graph_k`` nearest classes of the sampled labels' rows, over all shards and by the
current weights, that the graph holds as their neighbours), ``active_recall`` (random,
knn and graph: the fraction of the sampled samples' k hardest negatives - their exact top
k classes by feature over all shards, the label left out; k = ``graph_k`` for graph,
``knn_k`` otherwise - that the step's active sets hold), ``index_build_s`` (the newest
build), ``index_age`` (steps since the weights the index was built from), and for graph
refreshes ``graph_refresh_s`` and ``graph_refreshed`` (the newest refresh's time and the
classes it searched).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function

from hydrahead.distributed.collectives import group_rank, group_world_size
from hydrahead.distributed.sharding import shard_range
from hydrahead.head import graph as class_graph
from hydrahead.head import index as class_index
from hydrahead.head.selection import (
    fill_offsets,
    knn_active,
    knn_fixed_rows,
    owned_local_rows,
    random_active,
    resolve_budget,
    without_own_label,
)

logger = logging.getLogger("hydrahead.active")

SELECTIONS = ("full", "random", "knn", "graph")
SEARCHED = ("knn", "graph")  # selections with an index and its rebuilds
_SELECTOR_STATE = ("built_step", "rebuilds", "dirty")  # saved beside the index's own tensors
# Signatures of indexes saved before backends and types were named as the config names them.
_LEGACY_KINDS = {"torch": ("torch", "flat"), "torch_ivf": ("torch", "ivf")}


class _RowsOnDemand:
    """The rows a step searches: given, or made by a function at most once, when first read."""

    def __init__(self, source: torch.Tensor | Callable[[], torch.Tensor]):
        self._source, self._rows = source, None

    def __call__(self) -> torch.Tensor:
        if self._rows is None:
            self._rows = self._source() if callable(self._source) else self._source
        return self._rows


@dataclass
class _Refreshed:
    """A finished graph refresh: how many classes it searched, in how long."""

    classes: int
    seconds: float


@dataclass
class _Built:
    """An index and the weights it reflects: ``step`` = updates the weights had when read."""

    index: class_index.ClassIndex
    step: int
    seconds: float


def resolve_index(
    backend: str, index_type: str, *, num_rows: int, device: torch.device, deterministic: bool
) -> tuple[str, str]:
    """The ``head.index`` / ``head.index_type`` pair with ``auto`` resolved, in the same names.

    ``auto`` backend: FAISS when it can serve this device (``index.faiss_serves``) and the
    index need not be saved; torch otherwise (hnsw: FAISS, the only one that has it).
    ``auto`` type: exact (flat) up to ``EXACT_MAX_ROWS`` rows, ivf above.
    """
    if backend not in class_index.BACKENDS:
        raise ValueError(f"index must be one of {class_index.BACKENDS}, got {backend!r}")
    if index_type not in class_index.INDEX_TYPES:
        raise ValueError(f"index_type must be one of {class_index.INDEX_TYPES}, got {index_type!r}")
    if backend == "auto" and index_type == "hnsw":
        backend = "faiss"
    elif backend == "auto":
        backend = "faiss" if class_index.faiss_serves(device) and not deterministic else "torch"
    index_type = class_index.resolve_index_type(index_type, num_rows)
    if backend == "torch" and index_type not in class_index.TORCH_TYPES:
        raise ValueError(f"index_type={index_type} needs the faiss backend (the torch backend has flat and ivf)")
    if backend == "faiss" and deterministic:
        raise ValueError(
            "a deterministic index is saved in checkpoints: use the "
            "torch backend (FAISS indexes hold a copy of every row)"
        )
    return backend, index_type


class RowNorms:
    """1 / ||w_r|| of every row of a shard, for the GPU IVF search's cosine scores.

    Computed over the whole shard once (and again whenever every row moved: the head's
    ``settles`` count changed, or the shard's size did), then kept current by refreshing,
    at each ``current`` call, the rows the previous step was about to update
    (``will_update``): 4 bytes per row instead of summing every probed row's squares in
    every search. Any other write to the rows must come with a new ``rows_moved`` count
    (the head's ``settles`` does for settles; a resumed run starts a new selector).
    """

    def __init__(self) -> None:
        self.values: torch.Tensor | None = None
        self._rows_moved: int | None = None
        self._stale: torch.Tensor | None = None

    def current(self, weight: torch.Tensor, rows_moved: int) -> torch.Tensor:
        from hydrahead.kernels.shard_ce import inverse_row_norms

        weight = weight.detach()
        if self.values is None or rows_moved != self._rows_moved or self.values.shape[0] != weight.shape[0]:
            self.values, self._rows_moved = inverse_row_norms(weight), rows_moved
        elif self._stale is not None and self._stale.numel():
            self.values[self._stale] = inverse_row_norms(weight[self._stale])
        self._stale = None
        return self.values

    def forget(self) -> None:
        """Every row moved: the next ``current`` call computes every norm afresh."""
        self.values = None

    def will_update(self, rows: torch.Tensor) -> None:
        """``rows`` change before the next ``current`` call."""
        self._stale = rows


class ActiveClassSelector:
    """Per-step active rows of one shard ``[class_start, class_stop)``; owns the ``knn`` index."""

    def __init__(
        self,
        selection: str,
        class_start: int,
        class_stop: int,
        *,
        budget: int | float | None = None,
        knn_k: int = 16,
        knn_skip_label: bool = True,
        trim_to_budget: bool = False,
        graph_k: int = 16,
        graph_search: str = "probes",
        graph_refresh_every: int = 0,
        graph_refresh_window: int = 0,
        num_classes: int | None = None,
        fixed_size: bool = False,
        rebuild_every: int = 100,
        max_index_age: int | None = None,
        retrain_every: int = 10,
        index: str = "auto",
        index_type: str = "auto",
        nlist: int | None = None,
        nprobe: int = class_index.DEFAULT_NPROBE,
        deterministic: bool = False,
        cosine: bool = False,
        seed: int = 0,
        recall_every: int = 100,
        recall_queries: int = 64,
        ignore_index: int = -100,
        device: torch.device | str = "cpu",
        group=None,
        build_group=None,
        rows_move_every_step: bool = False,
        fill_correction: bool = False,
    ):
        """``group``: the head's ranks (graph: every step's exchange; every selection: the
        recall measurements). ``build_group``: a second group over the same ranks for a
        multi-rank graph's background builds. ``num_classes``: all shards' classes (graph).
        ``graph_search``: how graph builds search a torch IVF (``class_graph.GRAPH_SEARCHES``).
        ``graph_refresh_every``: steps between graph refreshes (0: none; torch indexes only,
        which score the current weights). ``graph_refresh_window``: P > 0, refreshes search
        the rows refreshed in the last P refreshes and each class's neighbours, with no index;
        the graph starts empty and is never rebuilt (``class_graph.refresh_class_graph``).
        ``max_index_age``: steps after which a background-built index makes a step wait for
        the running build (None: never; at least ``rebuild_every``). ``rows_move_every_step``:
        the weight given to ``select`` moves every row at every step (the rows with the steps
        they owe paid), so every IVF rebuild files every row again and the row norms are
        computed afresh at each search. ``fill_correction``: each selection also sets
        ``logit_offset``, sampled softmax's correction of its random fill (``fill_offsets``)."""
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if selection == "random" and budget is None:
            raise ValueError("selection=random needs a budget (active classes per shard, or a fraction)")
        self.shard_size = class_stop - class_start
        if budget is not None:
            resolve_budget(budget, self.shard_size)  # validates
        for name, value, minimum in (
            ("knn_k", knn_k, 1),
            ("graph_k", graph_k, 1),
            ("rebuild_every", rebuild_every, 1),
            ("graph_refresh_every", graph_refresh_every, 0),
            ("graph_refresh_window", graph_refresh_window, 0),
            ("retrain_every", retrain_every, 1),
            ("recall_every", recall_every, 0),
            ("recall_queries", recall_queries, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        for name, flag in (("knn_skip_label", knn_skip_label), ("trim_to_budget", trim_to_budget)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be a bool, got {flag!r}")
        if trim_to_budget and (selection != "knn" or budget is None or fixed_size):
            raise ValueError("trim_to_budget trims knn's union to its budget: it takes knn, a budget and no fixed_size")
        if max_index_age is not None and (
            isinstance(max_index_age, bool) or not isinstance(max_index_age, int) or max_index_age < rebuild_every
        ):
            raise ValueError(f"max_index_age must be null or an int >= rebuild_every, got {max_index_age!r}")
        self.selection, self.class_start, self.class_stop = selection, class_start, class_stop
        if fixed_size and (selection not in SEARCHED or budget is not None):
            raise ValueError("fixed_size fills the neighbours' union itself: it takes knn or graph and no budget")
        self.group, self.build_group = group, build_group
        self.num_classes = num_classes
        if graph_search not in class_graph.GRAPH_SEARCHES:
            raise ValueError(f"graph_search must be one of {class_graph.GRAPH_SEARCHES}, got {graph_search!r}")
        self.graph_search = graph_search
        if graph_refresh_every and selection != "graph":
            raise ValueError(
                f"graph_refresh_every refreshes the class graph: it takes selection=graph, not {selection}"
            )
        if graph_refresh_every and index == "faiss":
            raise ValueError("graph_refresh_every searches the current weights: it takes the torch index, not faiss")
        if graph_refresh_window and not graph_refresh_every:
            raise ValueError("graph_refresh_window sets what graph refreshes search: it needs graph_refresh_every > 0")
        self.graph_refresh_every, self.graph_refresh_window = graph_refresh_every, graph_refresh_window
        if selection == "graph":
            self._check_graph_shard()
            graph_k = min(graph_k, num_classes - 1)
        self.budget, self.knn_k, self.fixed_size = budget, min(knn_k, self.shard_size), fixed_size
        # Search one row more and drop the sample's own label (the positive is active anyway).
        self.knn_search_k = self.knn_k + 1 if knn_skip_label and self.knn_k < self.shard_size else self.knn_k
        self.trim_to_budget = trim_to_budget
        self.rows_move_every_step = rows_move_every_step
        if fill_correction and (selection == "full" or budget is None or fixed_size):
            raise ValueError(
                "fill_correction corrects the random fill of a budget: it takes random, knn or graph, "
                "a budget and no fixed_size"
            )
        self.fill_correction = fill_correction
        self.logit_offset: torch.Tensor | None = None  # the last selection's, with fill_correction
        self.graph_k = graph_k
        self.rebuild_every, self.retrain_every = rebuild_every, retrain_every
        self.max_index_age = max_index_age
        self.deterministic, self.cosine = deterministic, cosine
        self.seed, self.ignore_index = seed, ignore_index
        self.recall_every, self.recall_queries = recall_every, recall_queries
        self.device = torch.device(device)
        self.index_backend, self.index_type = None, None  # head.index and head.index_type, resolved
        self._index_options = dict(nlist=nlist, nprobe=nprobe, seed=seed, cosine=cosine, copy_weights=False)
        # A multi-rank graph build runs collectives: in the background only on a group of its own.
        self._builds_in_step = deterministic or (
            selection == "graph" and group_world_size(group) > 1 and build_group is None
        )
        if selection in SEARCHED:
            self.index_backend, self.index_type = resolve_index(
                # a refreshed graph keeps searching its index with the current weights: torch's
                "torch" if graph_refresh_every and index == "auto" else index,
                index_type,
                num_rows=self.shard_size,
                device=self.device,
                deterministic=deterministic,
            )
            self._check_faiss_gpu_limits(graph_k, nprobe)
            where = "inside the step" if self._builds_in_step else "in the background"
            if graph_refresh_window:
                logger.info(
                    "graph: no index, refreshed %s from the rows of the last %d refreshes over %d rows",
                    where,
                    graph_refresh_window,
                    self.shard_size,
                )
            else:
                logger.info(
                    "%s index: %s %s over %d rows (rebuilds %s)",
                    selection,
                    self.index_backend,
                    self.index_type,
                    self.shard_size,
                    where,
                )
        searches_ivf = selection == "knn" or (graph_refresh_every > 0 and not graph_refresh_window)
        torch_ivf = searches_ivf and (self.index_backend, self.index_type) == (
            "torch",
            "ivf",
        )
        # torch IVF: rows updated since the newest build began, or for a refreshed graph since
        # the last refresh (only they need filing again).
        self._dirty = torch.zeros(self.shard_size, dtype=torch.bool, device=self.device) if torch_ivf else None
        self._rebuilds = 0  # rebuilds since k-means last ran
        self._rows_moved = 0
        self._norms = RowNorms() if selection == "knn" and torch_ivf and cosine and self.device.type == "cuda" else None
        self._current: _Built | None = None
        self._pending: concurrent.futures.Future | None = None
        self._due = False  # a background rebuild fell due and has not started yet
        self._refresh_due = False  # a graph refresh fell due and has not started yet
        self._refreshes = 0  # graph refreshes so far (every retrain_every-th runs k-means anew)
        self._seen: list[tuple[int, torch.Tensor]] = []  # (step, labels) since the last graph refresh
        self._worker = None
        self._stream = None
        self.last = {
            "active_classes": None,
            "knn_recall": None,
            "graph_recall": None,
            "active_recall": None,
            "index_build_s": None,
            "index_age": None,
            "graph_refresh_s": None,
            "graph_refreshed": None,
        }

    def _check_graph_shard(self) -> None:
        """selection=graph: ``num_classes`` given, and this shard the range ``group``'s rank owns."""
        if self.num_classes is None or self.num_classes < 2:
            raise ValueError(f"selection=graph needs num_classes >= 2 (all shards' classes), got {self.num_classes}")
        world, rank = group_world_size(self.group), group_rank(self.group)
        owned = shard_range(self.num_classes, world, rank)
        if owned != (self.class_start, self.class_stop):
            raise ValueError(
                f"selection=graph: rank {rank} of {world} owns classes [{owned[0]}, {owned[1]}) of "
                f"{self.num_classes}, not [{self.class_start}, {self.class_stop})"
            )

    def _check_faiss_gpu_limits(self, graph_k: int, nprobe: int) -> None:
        """A FAISS GPU index fails at its first search past its k or nprobe limit: say so now."""
        on_faiss_gpu = (
            self.index_backend == "faiss"
            and self.index_type != "hnsw"
            and self.device.type == "cuda"
            and class_index.faiss_gpu_available()
        )
        if not on_faiss_gpu:
            return
        if self.selection == "knn":
            rows, what = self.knn_search_k, f"head.knn_k={self.knn_k}"
            if self.knn_search_k > self.knn_k:
                what += " (+ 1 for the label skipped, head.knn_skip_label)"
        else:
            rows, what = graph_k + 1, f"head.graph_k={graph_k} (+ 1 for the class itself, in graph builds)"
        class_index.check_faiss_gpu_search(rows, nprobe if self.index_type == "ivf" else 1, what)

    # ------------------------------------------------------------------------------------
    # Selection
    # ------------------------------------------------------------------------------------

    @torch.no_grad()
    def select(
        self,
        step: int,
        features: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor | Callable[[], torch.Tensor],
        rows_moved: int = 0,
    ) -> torch.Tensor | None:
        """Sorted local active rows for optimizer step ``step`` (1-based), or None for ``full``.

        ``features`` (G, D) and ``labels`` (G,) are the global batch, the same on every
        rank; ``weight`` is this shard's rows to search (C_r, D), or a function that makes
        them (such as a copy with the owed steps paid), called at most once and only when
        the step reads them: knn's search, a build, a graph refresh, a recall measurement,
        not a graph's lookup. ``rows_moved`` counts the times every row was moved outside an active set
        (the head's ``settles``): when it changes, the next IVF rebuild files every row again.
        """
        weight = _RowsOnDemand(weight)
        self.note_rows_moved(rows_moved)
        if self.rows_move_every_step:
            self._every_row_moved()
        if self.selection == "full":
            self.last["active_classes"] = self.shard_size
            return None
        measure = bool(self.recall_every) and step % self.recall_every == 0
        if self.selection == "random":
            rows = random_active(
                labels,
                self.class_start,
                self.class_stop,
                self.budget,
                seed=self.seed,
                step=step,
                ignore_index=self.ignore_index,
            )
        else:
            index = self._index_for(step, weight)
            if self.graph_refresh_every:
                self._refresh_for(step, labels, weight)
            if self.selection == "graph":
                with record_function("hydrahead::graph_lookup"):
                    label_ids = class_graph.label_neighbours(
                        index.table, labels, self.class_start, self.ignore_index, self.group
                    )
                neighbours, scores = class_graph.owned_rows(label_ids, self.class_start, self.class_stop), None
                if measure:
                    self._measure_graph_recall(labels, label_ids, weight())
            else:
                neighbours, scores = self._search(index, features, labels, weight(), rows_moved, measure)
            if self.fixed_size:  # no host read: the size is G·(k+1) whatever the union
                rows = knn_fixed_rows(
                    neighbours,
                    labels,
                    self.class_start,
                    self.class_stop,
                    seed=self.seed,
                    step=step,
                    ignore_index=self.ignore_index,
                )
            else:
                rows = knn_active(
                    neighbours,
                    labels,
                    self.class_start,
                    self.class_stop,
                    self.budget,
                    seed=self.seed,
                    step=step,
                    ignore_index=self.ignore_index,
                    neighbour_scores=scores if self.trim_to_budget else None,
                )
            if self._dirty is not None:
                self._dirty.index_fill_(0, rows, True)  # this step updates them (a fill: no host copy, no sync)
            if self._norms is not None:
                self._norms.will_update(rows)
        if self.fill_correction:
            self.logit_offset = self._fill_offsets(rows, labels, None if self.selection == "random" else neighbours)
        if measure:
            self._measure_active_recall(features, labels, rows, weight())
        self.last["active_classes"] = rows.numel()
        return rows

    def _fill_offsets(self, rows: torch.Tensor, labels: torch.Tensor, neighbours: torch.Tensor | None) -> torch.Tensor:
        """``fill_offsets`` of a selection: the rows chosen for themselves are the owned
        positives and, for knn and graph, the ``neighbours`` (local rows, -1 for none)."""
        chosen = owned_local_rows(labels, self.class_start, self.class_stop, self.ignore_index).to(rows.device)
        if neighbours is not None:  # -1 and repeats stay: fill_offsets needs no unique set (no host read)
            chosen = torch.cat((chosen, neighbours.reshape(-1).to(chosen.device, torch.long)))
        # random's fractional budget draws each row with that probability; knn and graph fill up to a count
        drawn_with = self.budget if neighbours is None and isinstance(self.budget, float) else None
        return fill_offsets(rows, chosen, self.shard_size, drawn_with)

    def _search(
        self,
        index,
        features: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor,
        rows_moved: int,
        measure: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """knn: each sample's ``knn_k`` best local rows (B, k), -1 where the index found fewer
        (with ``knn_skip_label`` the best rows other than its label's), and their scores."""
        queries = features.detach().float()
        if self.cosine:
            queries = torch.nn.functional.normalize(queries, dim=1)
        with record_function("hydrahead::knn_search"):
            if self._norms is not None and weight.is_cuda:
                norms = self._norms.current(weight, rows_moved)
                scores, neighbours = index.search(queries, self.knn_search_k, weight.detach(), row_inv_norms=norms)
            else:
                scores, neighbours = index.search(queries, self.knn_search_k, weight.detach())
            neighbours, scores = self._skip_labels(neighbours, labels, scores)
        if measure:
            self._measure_recall(queries, labels, neighbours, weight)
        return neighbours, scores

    def _skip_labels(
        self, rows: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.knn_search_k == self.knn_k:
            return rows, scores
        return without_own_label(
            rows, labels, self.class_start, self.class_stop, self.knn_k, scores, ignore_index=self.ignore_index
        )

    def note_rows_moved(self, rows_moved: int) -> None:
        """The head's ``settles`` count: when it changed, the next IVF rebuild files every row."""
        if rows_moved != self._rows_moved:
            self._every_row_moved()
        self._rows_moved = rows_moved

    def _every_row_moved(self) -> None:
        if self._dirty is not None:
            self._dirty.fill_(True)
        if self._norms is not None:
            self._norms.forget()

    def _measure_recall(
        self, queries: torch.Tensor, labels: torch.Tensor, neighbours: torch.Tensor, weight: torch.Tensor
    ) -> None:
        sample = slice(0, min(self.recall_queries, queries.shape[0]))
        _, exact = class_index.exact_topk(queries[sample], weight.detach(), self.knn_search_k, cosine=self.cosine)
        exact, _ = self._skip_labels(exact, labels[sample])
        self.last["knn_recall"] = class_index.recall_at_k(neighbours[sample], exact)

    def _recall_sample(self, labels: torch.Tensor) -> torch.Tensor:
        """The first ``recall_queries`` samples of the global batch whose label is not ignored."""
        return torch.nonzero(labels != self.ignore_index).squeeze(1)[: self.recall_queries]

    def _measure_graph_recall(self, labels: torch.Tensor, label_ids: torch.Tensor, weight: torch.Tensor) -> None:
        """graph_recall: the graph's neighbours of sampled labels against the exact nearest
        classes of their rows, over all shards, by the current weights."""
        sample = self._recall_sample(labels)
        sampled = labels[sample]
        rows = class_graph.label_rows(weight, sampled, self.class_start, self.group)
        rows = class_graph.as_queries(rows, self.cosine)
        exact = class_graph.exact_class_topk(
            rows, weight, self.class_start, self.graph_k, cosine=self.cosine, exclude=sampled, group=self.group
        )
        self.last["graph_recall"] = class_graph.neighbour_recall(label_ids[sample], exact)

    def _measure_active_recall(
        self, features: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor
    ) -> None:
        """active_recall: the sampled samples' exact hardest negatives over all shards (their
        label left out) that the ranks' active rows hold."""
        sample = self._recall_sample(labels)
        queries = features.detach()[sample].float()
        if self.cosine:
            queries = torch.nn.functional.normalize(queries, dim=1)
        k = self.graph_k if self.selection == "graph" else self.knn_k
        exact = class_graph.exact_class_topk(
            queries, weight, self.class_start, k, cosine=self.cosine, exclude=labels[sample], group=self.group
        )
        self.last["active_recall"] = class_graph.active_recall(
            exact, rows, self.class_start, self.class_stop, self.group
        )

    # ------------------------------------------------------------------------------------
    # The index and its rebuilds
    # ------------------------------------------------------------------------------------

    def _new_index(self) -> class_index.ClassIndex:
        return class_index.make_index(self.index_backend, self.index_type, device=self.device, **self._index_options)

    def _plan_build(self) -> tuple[class_index.ClassIndex | None, torch.Tensor | None]:
        """(index to update, mask of the rows to file again), or (None, None) for a full build.

        Taken when a build starts, on the training thread: a copy of the rows marked dirty so
        far is handed to the build (which turns it into row ids: on a GPU that reads the
        device, which the training thread must not wait for) and the marks start afresh.
        Every ``retrain_every``-th rebuild (and the first) runs k-means again and files
        every row.
        """
        if self._dirty is None or self._current is None or self._rebuilds + 1 >= self.retrain_every:
            self._rebuilds = 0
            if self._dirty is not None:
                self._dirty.zero_()
            return None, None
        self._rebuilds += 1
        marked = self._dirty.clone()
        self._dirty.zero_()
        return self._current.index, marked

    def _build(self, weight: torch.Tensor, step: int, previous=None, marked=None, group=None) -> _Built:
        """An index (knn) or class graph (graph, its collectives over ``group``) from ``weight``;
        ``previous`` and ``marked`` (a row mask): refile those rows of that index."""
        start = time.perf_counter()
        if self.selection == "graph" and self.graph_refresh_window:
            # Refreshes fill it from the rows that move; a graph of the untrained rows would be noise.
            index = class_graph.ClassGraph.empty(self.shard_size, self.graph_k, weight.device)
        elif self.selection == "graph":
            searched = self._new_index()
            built = class_graph.build_class_graph(
                weight,
                self.class_start,
                self.num_classes,
                self.graph_k,
                searched,
                cosine=self.cosine,
                group=group,
                search=self.graph_search,
                keep_scores=bool(self.graph_refresh_every),
            )
            if self.graph_refresh_every:  # refreshes search the same index and compare scores
                index = class_graph.ClassGraph(*built, index=searched)
            else:
                index = class_graph.ClassGraph(built)
        elif previous is None:
            index = self._new_index()
            index.build(weight.detach())
        else:
            index = previous.reassigned(weight.detach(), marked.nonzero().squeeze(1))
        if weight.is_cuda:
            # The build's stream (the side stream in the worker): once this returns, its
            # kernels are done and any stream may read the index.
            torch.cuda.current_stream(weight.device).synchronize()
        return _Built(index, step, time.perf_counter() - start)

    def _build_now(self, weight: torch.Tensor, step: int) -> _Built:
        if self.selection == "graph":
            self._new_lists()
            return self._build(weight, step, group=self.group)
        return self._build(weight, step, *self._plan_build())

    @property
    def _background_group(self):
        """A background graph job's collectives run over the build group, which nothing else uses."""
        return self.build_group if group_world_size(self.group) > 1 else self.group

    def _on_side_stream(self, job: Callable, weights_ready) -> object:
        """Worker thread: wait for the step's weights, run ``job`` on a stream of its own."""
        if weights_ready is None:
            return job()
        with torch.cuda.stream(self._stream), class_index.paced(self._stream):
            self._stream.wait_event(weights_ready)
            return job()

    def _submit(self, job: Callable, weight: torch.Tensor, *read_by_job) -> None:
        """Run ``job`` in the worker once the weights the training stream has queued are
        written; ``read_by_job``: tensors made on the training stream that the job reads."""
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="knn-index")
            if weight.is_cuda:
                self._stream = torch.cuda.Stream(weight.device)
        weights_ready = None
        if weight.is_cuda:
            weights_ready = torch.cuda.Event()
            weights_ready.record(torch.cuda.current_stream(weight.device))  # after read_by_job is made
            for tensor in read_by_job:
                if isinstance(tensor, torch.Tensor):
                    tensor.record_stream(self._stream)
        self._pending = self._worker.submit(self._on_side_stream, job, weights_ready)

    def _start_background_build(self, weight: torch.Tensor, step: int) -> None:
        if self.selection == "graph":  # built whole: no rows to file again
            self._new_lists()
            self._submit(functools.partial(self._build, weight, step, group=self._background_group), weight)
            return
        previous, marked = self._plan_build()
        self._submit(functools.partial(self._build, weight, step, previous, marked), weight, marked)

    def _install(self, built: _Built | _Refreshed) -> None:
        if isinstance(built, _Refreshed):
            self.last["graph_refresh_s"], self.last["graph_refreshed"] = built.seconds, built.classes
            return
        # The build read weights that every label trained by step `built.step` had moved.
        self._seen = [(step, labels) for step, labels in self._seen if step > built.step]
        if self.device.type == "cuda" and built.index is not None:
            # Tensors made on the side stream are now read on this one: keep the allocator from
            # reusing their memory for the side stream while this stream may still read them.
            main = torch.cuda.current_stream(self.device)
            for tensor in _tensors_of(built.index):
                if tensor.is_cuda:
                    tensor.record_stream(main)
        self._current = built
        self.last["index_build_s"] = built.seconds

    def _harvest(self, wait: bool) -> None:
        if self._pending is None or not (wait or self._pending.done()):
            return
        built, self._pending = self._pending.result(), None  # re-raises a failed build here
        self._install(built)

    def _refresh_for(self, step: int, labels: torch.Tensor, weight: _RowsOnDemand) -> None:
        """Note this step's labels; refresh the graph when a refresh is due and no job runs."""
        self._seen.append((step, labels.detach().clone()))
        if step % self.graph_refresh_every == 0:
            self._refresh_due = True
        if not self._refresh_due:
            return
        if self._builds_in_step:
            graph, seen, moved = self._current.index, self._take_seen(step), self._take_moved()
            self._install(self._refresh(graph, weight(), seen, moved, self.group, step))
        elif not self._due and self._idle_everywhere():
            rows, seen, moved = weight(), self._take_seen(step), self._take_moved()
            job = functools.partial(self._refresh, self._current.index, rows, seen, moved, self._background_group, step)
            self._submit(job, rows, seen, moved)
        else:
            return
        self._refresh_due = False

    def _new_lists(self) -> None:
        """A graph build files every row from the weights it reads: the refreshes' marks of
        moved rows start afresh, and so does their count towards the next k-means run."""
        if self._dirty is not None:
            self._dirty.zero_()
        self._refreshes = 0

    def _take_moved(self) -> torch.Tensor | bool | None:
        """A refreshed graph's torch IVF: a copy of the marks of the rows updated since the last
        refresh (the refresh files them again before it searches), the marks then cleared; or,
        at every ``retrain_every``-th refresh, True: k-means runs anew over the current rows."""
        if self._dirty is None:
            return None
        self._refreshes += 1
        if self._refreshes % self.retrain_every == 0:
            self._dirty.zero_()
            return True
        moved = self._dirty.clone()
        self._dirty.zero_()
        return moved

    def _take_seen(self, step: int) -> torch.Tensor:
        """The labels seen since the last refresh, to refresh now; this step's stay for the
        next refresh (the step is about to move their rows)."""
        labels = torch.cat([labels for _, labels in self._seen])
        self._seen = [self._seen[-1]]
        return labels

    def _refresh(
        self, graph: class_graph.ClassGraph, weight: torch.Tensor, labels: torch.Tensor, moved, group, step: int
    ) -> _Refreshed:
        start = time.perf_counter()
        if moved is True:  # lists fitted to the rows as they are now
            graph.index = self._new_index()
            graph.index.build(weight.detach())
        elif moved is not None:  # the rows that moved go to the lists they are nearest now
            graph.index = graph.index.reassigned(weight.detach(), moved.nonzero().squeeze(1))
        classes = class_graph.refresh_class_graph(
            graph,
            weight,
            labels,
            self.class_start,
            self.num_classes,
            cosine=self.cosine,
            group=group,
            search=self.graph_search,
            ignore_index=self.ignore_index,
            step=step,
            window_steps=self.graph_refresh_window * self.graph_refresh_every,
        )
        if weight.is_cuda:
            torch.cuda.current_stream(weight.device).synchronize()  # as a build: done when it returns
        return _Refreshed(classes, time.perf_counter() - start)

    def _too_old(self, updates: int) -> bool:
        return self.max_index_age is not None and updates - self._current.step > self.max_index_age

    def _idle_everywhere(self) -> bool:
        """No build running here (a multi-rank graph: on any rank of ``group``)."""
        idle = self._pending is None
        if self.selection != "graph" or group_world_size(self.group) == 1:
            return idle
        running = torch.tensor([0 if idle else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(running, op=dist.ReduceOp.MAX, group=self.group)
        return not running.item()

    def _index_for(self, step: int, weight: _RowsOnDemand) -> class_index.ClassIndex:
        """The index this step reads; ``weight()`` is made only for a build."""
        updates = step - 1  # the weights have had this many updates when step `step` starts
        # A graph refreshed from its moved rows is never rebuilt: a rebuild would empty it.
        rebuild_now = step % self.rebuild_every == 0 and not self.graph_refresh_window
        if self._current is None:
            self._install(self._build_now(weight(), updates))
        elif self._builds_in_step:
            if rebuild_now and self._current.step != updates:
                self._install(self._build_now(weight(), updates))
        else:
            self._harvest(wait=False)
            if rebuild_now and self._current.step != updates:
                self._due = True
            if self._too_old(updates) and self._pending is not None:
                self._harvest(wait=True)
            if self._due and self._idle_everywhere():
                self._start_background_build(weight(), updates)
                self._due = False
            if self._too_old(updates):
                self._harvest(wait=True)  # the build just started
        index = self._current.index
        self.last["index_age"] = 0 if index.searches_current_weights else updates - self._current.step
        return index

    # ------------------------------------------------------------------------------------
    # Checkpoints and shutdown
    # ------------------------------------------------------------------------------------

    @property
    def index_signature(self) -> dict:
        """What a saved index must match to be loaded: its backend and type, lists and metric."""
        return {
            "index": self.index_backend,
            "index_type": self.index_type,
            "nlist": self._index_options["nlist"],
            "cosine": self.cosine,
            "retrain_every": self.retrain_every,
        }

    def loads_index_of(self, signature: dict | None) -> bool:
        """Whether an index saved with ``signature`` (from a checkpoint's meta) fits this selector."""
        if signature is not None and "kind" in signature:  # saved before backends were named as the config names them
            signature = {**signature}
            signature["index"], signature["index_type"] = _LEGACY_KINDS.get(signature.pop("kind"), (None, None))
        return signature == self.index_signature

    @property
    def saves_index(self) -> bool:
        """Whether checkpoints carry the index: deterministic knn, and a deterministic
        refreshed graph's torch IVF (the lists its refreshes search and file rows into)."""
        refreshed_lists = self.selection == "graph" and self.graph_refresh_every and self._dirty is not None
        return (self.selection == "knn" or bool(refreshed_lists)) and self.deterministic

    @property
    def _saved_index(self) -> class_index.ClassIndex:
        """The index that checkpoints carry: knn's, or the one a refreshed graph searches."""
        return self._current.index.index if self.selection == "graph" else self._current.index

    def index_state(self) -> dict:
        """The current index as tensors plus ``built_step`` and ``rebuilds`` (for a refreshed
        graph: its refreshes since its build), when ``saves_index``."""
        if not self.saves_index or self._current is None:
            return {}
        state = {
            **self._saved_index.state_dict(),
            "built_step": torch.tensor(self._current.step),
            "rebuilds": torch.tensor(self._refreshes if self.selection == "graph" else self._rebuilds),
        }
        if self._dirty is not None:
            state["dirty"] = self._dirty
        return state

    def empty_index_state(self, dim: int) -> dict:
        """Tensors shaped like ``index_state()`` of this shard, for a checkpoint load to fill."""
        if not self.saves_index:
            return {}
        state = {"built_step": torch.tensor(0), "rebuilds": torch.tensor(0)}
        if self._dirty is not None:
            state["dirty"] = torch.empty(self.shard_size, dtype=torch.bool, device=self.device)
            nlist = class_index._resolve_nlist(self._index_options["nlist"], self.shard_size)
            state["centroids"] = torch.empty(nlist, dim, device=self.device)
            state["assign"] = torch.empty(self.shard_size, dtype=torch.long, device=self.device)
        return state

    def load_index_state(self, state: dict, weight: torch.Tensor) -> None:
        """Install a saved index (as from ``index_state``) over this shard's weights; a
        refreshed graph's after its table (``load_graph_state``)."""
        if not self.saves_index:
            return
        index = self._new_index()
        index.load_state_dict({k: v for k, v in state.items() if k not in _SELECTOR_STATE}, weight.detach())
        if self.selection == "graph":
            if self._current is None:  # no table was loaded: the next step builds graph and index anew
                return
            self._current.index.index, self._refreshes = index, int(state["rebuilds"])
        else:
            self._current = _Built(index, int(state["built_step"]), 0.0)
            self._rebuilds = int(state["rebuilds"])
        if self._dirty is not None:
            self._dirty.copy_(state["dirty"])

    @property
    def saves_graph(self) -> bool:
        """Whether checkpoints carry the class graph (deterministic graph)."""
        return self.selection == "graph" and self.deterministic

    @property
    def graph_signature(self) -> dict:
        """What a saved graph table must match to be loaded (its shape and similarity; with
        refreshes, their period, which sizes the labels saved beside it)."""
        signature = {"num_classes": self.num_classes, "graph_k": self.graph_k, "cosine": self.cosine}
        if self.graph_refresh_every:
            signature["graph_refresh_every"] = self.graph_refresh_every
        if self.graph_refresh_window:
            signature["graph_refresh_window"] = self.graph_refresh_window
        return signature

    def graph_state(self) -> tuple[torch.Tensor, int] | None:
        """(this shard's table, the updates its weights had) of the current graph, if any."""
        if self.selection != "graph" or self._current is None:
            return None
        return self._current.index.table, self._current.step

    def graph_scores(self) -> torch.Tensor | None:
        """This shard's neighbour scores of the current graph (refreshed graphs), else None."""
        return None if self._current is None else getattr(self._current.index, "scores", None)

    def graph_moved_at(self) -> torch.Tensor | None:
        """This shard's refresh steps of the current graph (refreshed from its moved rows), else None."""
        return None if self._current is None else getattr(self._current.index, "moved_at", None)

    def seen_labels(self, length: int) -> torch.Tensor:
        """The labels seen since the last refresh, in order, padded with -1 to ``length``
        (the same on every rank): what a resumed run's next refresh must search."""
        seen = [labels.long() for _, labels in self._seen]
        seen = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
        if seen.numel() > length:
            raise ValueError(f"{seen.numel()} labels seen since the last graph refresh, more than the {length} saved")
        padded = torch.full((length,), -1, dtype=torch.long, device=self.device)
        padded[: seen.numel()] = seen.to(self.device)
        return padded

    def empty_graph_table(self) -> torch.Tensor:
        """A table shaped like this shard's, for a checkpoint load to fill."""
        return torch.empty(self.shard_size, self.graph_k, dtype=torch.int32, device=self.device)

    def load_graph_state(
        self,
        table: torch.Tensor,
        built_step: int,
        scores: torch.Tensor | None = None,
        seen: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        moved_at: torch.Tensor | None = None,
    ) -> None:
        """Serve a saved graph (this shard's rows of its table) as if built after ``built_step``
        updates. With refreshes also its ``scores``, the ``seen`` labels (as ``seen_labels``
        saved them) and the shard's ``weight``, from which the index it searches is rebuilt;
        refreshed from its moved rows (``graph_refresh_window``), ``moved_at`` instead of an index."""
        if tuple(table.shape) != (self.shard_size, self.graph_k):
            raise ValueError(f"graph table must be ({self.shard_size}, {self.graph_k}), got {tuple(table.shape)}")
        table = table.to(self.device, torch.int32)
        if not self.graph_refresh_every:
            self._current = _Built(class_graph.ClassGraph(table), int(built_step), 0.0)
            return
        if scores is None or seen is None or weight is None:
            raise ValueError("a refreshed graph resumes from its table, scores and seen labels, and the shard's weight")
        scores = scores.to(self.device, torch.float32)
        if self.graph_refresh_window:
            if moved_at is None:
                raise ValueError("a graph refreshed from its moved rows resumes with their refresh steps (moved_at)")
            graph = class_graph.ClassGraph(table, scores, moved_at=moved_at.to(self.device, torch.int64))
        else:
            index = self._new_index()
            index.build(weight.detach())  # deterministic indexes: the build's own (k-means is seeded)
            graph = class_graph.ClassGraph(table, scores, index)
        self._current = _Built(graph, int(built_step), 0.0)
        seen = seen.to(self.device)
        self._seen = [(int(built_step) + 1, seen[seen != -1])]

    def close(self) -> None:
        """Wait for a pending build and stop the worker thread."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker, self._pending = None, None


def _tensors_of(index) -> list[torch.Tensor]:
    """Tensors an index holds (an ``auto`` index: its backend's)."""
    found = []
    for value in vars(index).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, class_index._IndexBase):
            found.extend(_tensors_of(value))
    return found
