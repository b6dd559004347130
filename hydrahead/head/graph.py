"""The class graph behind ``head.selection=graph``: each class's k nearest classes.

The 100M-class system's KNN softmax: a step's hard negatives are the graph neighbours of
the batch's labels, so the step looks the graph up instead of searching. A class's
neighbours are the ``k`` classes whose weight rows score highest against its own row, by
the head's similarity (inner product; cosine for the margin heads), over every class of
the model, the class itself left out. They do not depend on how the classes are split
over the ranks (up to ties, and to an IVF index, whose lists are the shard's own).

Who holds and computes what, the classes split by contiguous ranges over ``group``'s W
ranks (C classes, C_r on rank r, D the row width):

- table: rank r holds the neighbours of its own classes, a ``(C_r, k)`` tensor of global
  class ids (int32, -1 where fewer than k were found): 4·k bytes per class of the shard.
- build (``build_class_graph``): rank r indexes its own rows (a ``ClassIndex``). In
  rounds, every rank puts in ``block_rows`` of its rows as stored (an all-gather of
  W x B x D values, sent as bytes), each rank searches its index with all W·B rows for
  their k + 1 best, and an all-to-all hands each row's owner the candidates from every
  rank (W x B x (k + 1) float32 scores and int64 ids); the owner keeps the best k that
  are not the row itself. Every rank receives every row of the model once per build
  (C x D values in all: 51 GB at 100M x 512 in fp8) and runs C queries against its index.
  With ``search="groups"`` (torch IVF) each rank puts its rows in list by list, and the
  queries that share a nearest list are scored in one product against the rows of that
  list's neighbourhood (docs/selection.md: faster per list probed, lower recall).
- refresh (``refresh_class_graph``): the labels' rows (an all-reduce of n x D) searched
  again over every shard's index, or, for a graph refreshed from its moved rows
  (``ClassGraph.empty``), exactly over the rows each shard refreshed lately and the
  classes' current neighbours; all-gathers of the candidates, then offers.
- step (``label_neighbours``): the owner of each label of the global batch reads its
  row of the table; one all-reduce (max) of G x k int32 gives every rank the neighbours
  of every label, and each keeps those it owns (``owned_rows``).

The recall measurements at the end search exactly, over all shards, for a few queries
that every rank holds (``exact_class_topk``): each rank's best k, all-gathered, merged.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from hydrahead.checks import check_int
from hydrahead.distributed.collectives import group_rank, group_world_size
from hydrahead.distributed.sharding import shard_range
from hydrahead.head import index as class_index
from hydrahead.head.index import ClassIndex, exact_topk, piece_done

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "GRAPH_SEARCHES",
    "GROUPED_BLOCK_ROWS",
    "ClassGraph",
    "active_recall",
    "as_queries",
    "build_block_rows",
    "build_class_graph",
    "exact_class_topk",
    "graph_rows",
    "label_neighbours",
    "label_rows",
    "merge_candidates",
    "neighbour_recall",
    "offer_neighbours",
    "owned_rows",
    "query_order",
    "refresh_class_graph",
]

GRAPH_SEARCHES = ("probes", "groups")  # how a build searches: each query's probes, or by list groups
DEFAULT_BLOCK_ROWS = 4096  # rows each rank puts into one round of a build
# ... when its index searches by list groups: a block spans a few whole lists, not pieces of
# two (each piece of a list pays for gathering and scoring its neighbourhood once)
GROUPED_BLOCK_ROWS = 65536
_WINDOW_SLICE = 65536  # rows widened at once for a moved-rows refresh's search (64k x 512 float32: 128 MiB)


class ClassGraph:
    """A built class graph: ``table`` (C_r, k) int32, the neighbours of this shard's classes
    as global class ids, best first, -1 where fewer than k were found.

    For refreshes (``refresh_class_graph``) it also keeps ``scores`` (C_r, k) float32, each
    neighbour's similarity when it was last found (-inf for none), and either ``index``, the
    shard's index the build searched (built with ``copy_weights=False``: it holds lists, not
    rows), or ``moved_at`` (C_r,) int64, the step of the last refresh that searched each
    row's class (-1: none yet), for refreshes that search the recently moved rows instead."""

    # Its neighbours come from the weights at build time (the selector's index_age counts from then).
    searches_current_weights = False

    def __init__(
        self,
        table: torch.Tensor,
        scores: torch.Tensor | None = None,
        index: ClassIndex | None = None,
        moved_at: torch.Tensor | None = None,
    ):
        if table.dim() != 2 or table.dtype != torch.int32:
            raise ValueError(f"a class graph table is (C_r, k) int32, got {tuple(table.shape)} {table.dtype}")
        if scores is not None and (scores.shape != table.shape or scores.dtype != torch.float32):
            raise ValueError(
                f"class graph scores must be {tuple(table.shape)} float32, got {tuple(scores.shape)} {scores.dtype}"
            )
        if moved_at is not None and (tuple(moved_at.shape) != (table.shape[0],) or moved_at.dtype != torch.int64):
            raise ValueError(f"class graph moved_at must be ({table.shape[0]},) int64, got {tuple(moved_at.shape)}")
        self.table, self.scores, self.index, self.moved_at = table, scores, index, moved_at

    @classmethod
    def empty(cls, num_rows: int, k: int, device) -> "ClassGraph":
        """A graph with no neighbours yet, for refreshes of the moved rows to fill."""
        return cls(
            torch.full((num_rows, k), -1, dtype=torch.int32, device=device),
            torch.full((num_rows, k), -math.inf, dtype=torch.float32, device=device),
            moved_at=torch.full((num_rows,), -1, dtype=torch.int64, device=device),
        )


def as_queries(rows: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Weight rows as search queries: float32, unit length for cosine (as the index scores)."""
    queries = rows.detach().float()
    return torch.nn.functional.normalize(queries, dim=1) if cosine else queries


def merge_candidates(
    scores: torch.Tensor, ids: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of each row's candidates: (scores, ids), both (n, k), best first.

    ``scores`` and ``ids`` (n, m) hold candidates as global class ids, -1 for none (their
    score is ignored); ``exclude`` (n,) is an id to leave out of each row (the query's own
    class). Missing slots hold id -1 and score -inf.
    """
    valid = ids >= 0
    if exclude is not None:
        valid &= ids != exclude.unsqueeze(1)
    scores = scores.masked_fill(~valid, -math.inf)
    take = min(k, scores.shape[1])
    best, position = scores.topk(take, dim=1)
    chosen = ids.gather(1, position).masked_fill(best == -math.inf, -1)
    return _pad(best, chosen, k)


def _pad(scores: torch.Tensor, ids: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, m) results padded to (n, width) with score -inf and id -1 (m <= width)."""
    missing = width - scores.shape[1]
    if missing > 0:
        scores = torch.cat((scores, scores.new_full((scores.shape[0], missing), -math.inf)), 1)
        ids = torch.cat((ids, ids.new_full((ids.shape[0], missing), -1)), 1)
    return scores, ids


def _check_shard(weight: torch.Tensor, class_start: int, num_classes: int, group) -> tuple[int, int]:
    """(world size, rank) of ``group``, after checking that ``weight`` is this rank's shard."""
    check_int("num_classes", num_classes, minimum=2)
    world, rank = group_world_size(group), group_rank(group)
    expected = shard_range(num_classes, world, rank)
    if expected != (class_start, class_start + weight.shape[0]):
        raise ValueError(
            f"rank {rank} of {world} owns classes [{expected[0]}, {expected[1]}) of {num_classes}, but its "
            f"weight holds [{class_start}, {class_start + weight.shape[0]})"
        )
    return world, rank


@torch.no_grad()
def build_class_graph(
    weight: torch.Tensor,
    class_start: int,
    num_classes: int,
    k: int,
    index: ClassIndex,
    *,
    cosine: bool = False,
    group: dist.ProcessGroup | None = None,
    block_rows: int | None = None,
    search: str = "probes",
    keep_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """This shard's rows of the class graph: (C_r, k) int32 global class ids, best first.

    ``weight`` (C_r, D) is the shard of classes ``[class_start, class_start + C_r)``; every
    rank of ``group`` calls this at once with its own shard. ``index`` (unbuilt, with
    ``cosine`` as given here) is built over the shard and searched with every row of the
    model; an exact index gives the exact graph. k is clamped to ``num_classes - 1``.
    ``search``: ``probes``, each query's own probes; ``groups`` (torch IVF), the rows taken
    list by list and searched by list groups (``TorchIVFIndex.search_by_list_groups``).
    ``block_rows``: rows per rank and round (None: ``build_block_rows``'s default).
    ``keep_scores``: return (table, scores), scores (C_r, k) float32 the neighbours'
    similarities (-inf where none), as a refreshed graph keeps them.
    """
    world, _ = _check_shard(weight, class_start, num_classes, group)
    check_int("k", k, minimum=1)
    k = min(k, num_classes - 1)
    weight = weight.detach()
    index.build(weight)
    block_rows = build_block_rows(index, block_rows, search)
    num_rows, dim = weight.shape
    order = query_order(index, num_rows, weight.device, search)
    table = torch.full((num_rows, k), -1, dtype=torch.int32, device=weight.device)
    table_scores = (
        torch.full((num_rows, k), -math.inf, dtype=torch.float32, device=weight.device) if keep_scores else None
    )
    done = (lambda: (table, table_scores)) if keep_scores else (lambda: table)
    if world == 1:
        table[order], found_scores = _scored_graph_rows(
            index, weight, order, k, class_start=class_start, cosine=cosine, block_rows=block_rows, search=search
        )
        if keep_scores:
            table_scores[order] = found_scores
        return done()
    # Every rank runs the same rounds: the smallest block any rank's index asks for (an auto
    # index may be flat on one rank and IVF on the next, whose shard is one row larger).
    agreed = torch.tensor([block_rows], dtype=torch.int64, device=weight.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    block_rows = int(agreed)  # one host read per build
    widest = shard_range(num_classes, world, 0)[1]  # rank 0's shard is the largest: the number of rounds
    row_bytes = dim * weight.element_size()
    for start in range(0, widest, block_rows):
        # Every rank's next block_rows rows in its query order, as stored (sent as bytes: any
        # dtype, fp8 at 1 byte a value), zero rows past a shard's end.
        rows = order[start : start + block_rows]
        count = rows.numel()
        block = torch.zeros(block_rows, row_bytes, dtype=torch.uint8, device=weight.device)
        block[:count] = weight.contiguous().view(torch.uint8).index_select(0, rows)
        parts = [torch.empty_like(block) for _ in range(world)]
        dist.all_gather(parts, block, group=group)
        queries = as_queries(torch.cat(parts).view(weight.dtype), cosine)
        scores, ids = _candidates(index, queries, weight, k, class_start, search)
        # Block r of the candidates answers rank r's rows: send it there.
        got_scores, got_ids = torch.empty_like(scores), torch.empty_like(ids)
        dist.all_to_all_single(got_scores, scores.contiguous(), group=group)
        dist.all_to_all_single(got_ids, ids.contiguous(), group=group)
        scores = got_scores.reshape(world, block_rows, k + 1).transpose(0, 1).reshape(block_rows, -1)
        ids = got_ids.reshape(world, block_rows, k + 1).transpose(0, 1).reshape(block_rows, -1)
        best_scores, best = merge_candidates(scores[:count], ids[:count], k, exclude=rows + class_start)
        table[rows] = best.to(torch.int32)
        if keep_scores:
            table_scores[rows] = best_scores
        piece_done()
    return done()


def _grouped(index: ClassIndex, search: str) -> bool:
    """Whether a build searches by list groups: asked for, and the index has lists (torch IVF)."""
    if search not in GRAPH_SEARCHES:
        raise ValueError(f"graph search must be one of {GRAPH_SEARCHES}, got {search!r}")
    return search == "groups" and hasattr(index, "search_by_list_groups")


def build_block_rows(index: ClassIndex, block_rows: int | None = None, search: str = "probes") -> int:
    """Rows per block of a build's search: ``block_rows``, or by default ``GROUPED_BLOCK_ROWS``
    for a search by list groups and ``DEFAULT_BLOCK_ROWS`` for per-query probes (whose scores
    are a block x nprobe x longest-list tensor)."""
    if block_rows is None:
        return GROUPED_BLOCK_ROWS if _grouped(index, search) else DEFAULT_BLOCK_ROWS
    check_int("block_rows", block_rows, minimum=1)
    return block_rows


def query_order(index: ClassIndex, num_rows: int, device: torch.device, search: str = "probes") -> torch.Tensor:
    """The order in which a build takes the shard's rows as queries: list by list for a
    search by list groups (a block of queries then shares a few lists), row order otherwise.
    Every row once either way."""
    if _grouped(index, search):
        return index.rows_by_list().to(device)
    return torch.arange(num_rows, device=device)


@torch.no_grad()
def graph_rows(
    index: ClassIndex,
    weight: torch.Tensor,
    rows: torch.Tensor,
    k: int,
    *,
    class_start: int = 0,
    cosine: bool = False,
    block_rows: int | None = None,
    search: str = "probes",
) -> torch.Tensor:
    """(len(rows), k) int32: the graph rows of the classes at local ``rows``, when ``weight``
    (with ``index`` built over it) holds every class of the model, as on one rank."""
    return _scored_graph_rows(
        index, weight, rows, k, class_start=class_start, cosine=cosine, block_rows=block_rows, search=search
    )[0]


def _scored_graph_rows(index, weight, rows, k, *, class_start, cosine, block_rows, search):
    """``graph_rows`` and the neighbours' scores: (len(rows), k) int32 and float32."""
    out = torch.full((rows.numel(), k), -1, dtype=torch.int32, device=weight.device)
    out_scores = torch.full((rows.numel(), k), -math.inf, dtype=torch.float32, device=weight.device)
    block_rows = build_block_rows(index, block_rows, search)
    for start in range(0, rows.numel(), block_rows):
        chunk = rows[start : start + block_rows].to(weight.device)
        scores, ids = _candidates(index, as_queries(weight[chunk], cosine), weight, k, class_start, search)
        best_scores, best = merge_candidates(scores, ids, k, exclude=chunk + class_start)
        out[start : start + chunk.numel()] = best.to(torch.int32)
        out_scores[start : start + chunk.numel()] = best_scores
        piece_done()
    return out, out_scores


def _candidates(
    index: ClassIndex, queries: torch.Tensor, weight: torch.Tensor, k: int, class_start: int, search: str = "probes"
):
    """Each query's k + 1 best rows of the shard (room for the query's own class, dropped
    later) as (scores float32, global ids), padded to k + 1 columns."""
    find = index.search_by_list_groups if _grouped(index, search) else index.search
    scores, rows = find(queries, min(k + 1, weight.shape[0]), weight)
    return _pad(scores.float(), torch.where(rows >= 0, rows + class_start, -1), k + 1)


def label_neighbours(
    table: torch.Tensor, labels: torch.Tensor, class_start: int, ignore_index: int = -100, group=None
) -> torch.Tensor:
    """(G, k) int64: the graph neighbours of each label of the global batch (the same
    ``labels`` on every rank), as global class ids, the same on every rank; -1 for an
    ignored label or one no rank owns. One all-reduce of G x k int32 over ``group``."""
    local = labels.long() - class_start
    owned = (labels != ignore_index) & (local >= 0) & (local < table.shape[0])
    found = table[local.clamp(0, table.shape[0] - 1)]
    found = torch.where(owned.unsqueeze(1), found, torch.full_like(found, -1))
    if group_world_size(group) > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return found.long()


def owned_rows(ids: torch.Tensor, class_start: int, class_stop: int) -> torch.Tensor:
    """Global class ids as local rows of the shard ``[class_start, class_stop)``, -1 elsewhere."""
    inside = (ids >= class_start) & (ids < class_stop)
    return torch.where(inside, ids - class_start, -1)


# --- refreshes: the rows that moved, searched again -------------------------------------


@torch.no_grad()
def refresh_class_graph(
    graph: ClassGraph,
    weight: torch.Tensor,
    labels: torch.Tensor,
    class_start: int,
    num_classes: int,
    *,
    cosine: bool = False,
    group: dist.ProcessGroup | None = None,
    search: str = "probes",
    ignore_index: int = -100,
    block_rows: int | None = None,
    step: int | None = None,
    window_steps: int | None = None,
) -> int:
    """Search the graph rows of ``labels``' classes again from the current weights, in place;
    returns how many classes were searched.

    ``labels``: the class ids that steps trained since the last refresh (the same on every
    rank; repeats and ``ignore_index`` allowed), whose rows moved the most. Each class's row
    (put in by its owner, ``label_rows``) is searched in every shard's index for its k best
    over all shards, which replace its graph row. Each rank then offers each searched class
    to the rows of its shard among those k (``offer_neighbours``), so that a row not searched
    learns of the rows that moved close to it. Both depend only on the merged best k, not on
    how the classes are split over the ranks. ``graph`` must hold its scores and index
    (``build_class_graph(..., keep_scores=True)``). Collectives over ``group``: an all-reduce
    of n x D float32 (n classes) and all-gathers of n x (k + 1) scores and ids.
    ``block_rows``: queries per search (None: ``build_block_rows``'s default).

    A graph with ``moved_at`` (``ClassGraph.empty``) is searched without an index: ``step``
    stamps the searched classes, and each is scored exactly against the rows stamped within
    the last ``window_steps`` steps (this refresh's included: the rows that moved lately) and
    against its current neighbours (``_moved_candidates``); one more all-reduce, n x k int32.
    """
    if graph.scores is None or (graph.index is None and graph.moved_at is None):
        raise ValueError("refresh_class_graph needs a graph with its scores and index (keep_scores=True) or moved_at")
    if graph.moved_at is not None and (step is None or window_steps is None or window_steps < 1):
        raise ValueError("a graph refreshed from its moved rows needs the refresh's step and window_steps >= 1")
    _check_shard(weight, class_start, num_classes, group)
    k = graph.table.shape[1]
    labels = labels.to(weight.device).long()
    classes = labels[(labels != ignore_index) & (labels >= 0) & (labels < num_classes)].unique()  # sorted
    if classes.numel() == 0:
        return 0
    queries = as_queries(label_rows(weight, classes, class_start, group), cosine)
    found = []
    if graph.moved_at is not None:
        local = classes - class_start
        graph.moved_at[local[(local >= 0) & (local < graph.moved_at.shape[0])]] = step
        in_window = (graph.moved_at >= 0) & (graph.moved_at > step - window_steps)  # -1: never refreshed
        window_rows = in_window.nonzero().squeeze(1)
        window = (window_rows, _window_operand(weight.detach()[window_rows], cosine))  # for every block
        neighbours = label_neighbours(graph.table, classes, class_start, group=group)
        block = block_rows or DEFAULT_BLOCK_ROWS
        for start in range(0, queries.shape[0], block):
            found.append(
                _moved_candidates(
                    queries[start : start + block],
                    neighbours[start : start + block],
                    weight.detach(),
                    in_window,
                    window,
                    k,
                    class_start,
                    cosine,
                )
            )
            piece_done()
    else:
        # In blocks, as a build searches (a search's scores grow with its queries).
        block = build_block_rows(graph.index, block_rows, search)
        for start in range(0, queries.shape[0], block):
            found.append(
                _candidates(graph.index, queries[start : start + block], weight.detach(), k, class_start, search)
            )
            piece_done()
    scores, ids = torch.cat([s for s, _ in found]), torch.cat([i for _, i in found])
    scores, ids = _every_ranks_candidates(scores, ids, group)
    best_scores, best = merge_candidates(scores, ids, k, exclude=classes)
    offer_neighbours(graph, classes, best, best_scores, class_start)
    local = classes - class_start
    owned = (local >= 0) & (local < graph.table.shape[0])
    graph.table[local[owned]] = best[owned].to(torch.int32)
    graph.scores[local[owned]] = best_scores[owned]
    return classes.numel()


def _moved_candidates(
    queries: torch.Tensor,
    neighbours: torch.Tensor,
    weight: torch.Tensor,
    in_window: torch.Tensor,
    window: tuple[torch.Tensor, torch.Tensor],
    k: int,
    class_start: int,
    cosine: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's candidates for a refresh without an index: each query's k + 1 best rows
    of the ``window`` (the rows ``in_window`` and their ``_window_operand``), then its
    current ``neighbours`` (n, k global ids, -1 for none) that this shard owns outside the
    window, rescored; (n, 2k + 1) scores and global ids, -1 and -inf for none. A row is a
    candidate at most once per query."""
    n = queries.shape[0]
    window_rows, operand = window
    block_rows = class_index.GROUP_TOPK_BLOCK_ROWS
    by_kernel = class_index.group_topk_on(operand)
    if by_kernel:
        from hydrahead.kernels import group_topk  # Triton's import, only when searching

        by_kernel = group_topk.kernel_groups(window_rows.numel(), k + 1, block_rows)  # k tiles for a threshold
    if by_kernel:
        scores, rows = group_topk.group_topk(
            queries.to(operand.dtype).contiguous(), operand, [0], [n], [0], [operand.shape[0]], k + 1,
            block_rows=block_rows,
        )  # fmt: skip
        ids = torch.where(rows >= 0, window_rows[rows.clamp_min(0)] + class_start, -1)
        scores, ids = _pad(scores.float(), ids, k + 1)
    elif window_rows.numel():
        scores, rows = exact_topk(queries, operand, k + 1, cosine=cosine)
        scores, ids = _pad(scores.float(), window_rows[rows] + class_start, k + 1)
    else:
        scores, ids = _pad(queries.new_empty(n, 0), torch.empty(n, 0, dtype=torch.long, device=queries.device), k + 1)
    local = owned_rows(neighbours, class_start, class_start + weight.shape[0])
    held = local.clamp(min=0)
    keep = (local >= 0) & ~in_window[held]  # the window's rows are scored above
    held_scores = class_index.score_rows(queries.float(), weight, torch.where(keep, local, -1), cosine)
    held_ids = torch.where(keep, neighbours, -1)
    return torch.cat((scores, held_scores), 1), torch.cat((ids, held_ids), 1)


def _window_operand(rows: torch.Tensor, cosine: bool) -> torch.Tensor:
    """The window's rows as its search multiplies them: for the kernel, unit rows (cosine)
    in bf16 on a GPU (tensor cores, float32 sums: what the IVF search ranks with) or float32
    elsewhere, widened slice by slice; for ``exact_topk``, as stored (it normalises)."""
    if not class_index.group_topk_on(rows):
        return rows
    out = torch.empty(rows.shape, dtype=torch.bfloat16 if rows.is_cuda else torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], _WINDOW_SLICE):
        piece = rows[start : start + _WINDOW_SLICE].float()
        out[start : start + _WINDOW_SLICE] = torch.nn.functional.normalize(piece, dim=1) if cosine else piece
    return out


def offer_neighbours(
    graph: ClassGraph, classes: torch.Tensor, found: torch.Tensor, found_scores: torch.Tensor, class_start: int
) -> None:
    """Offer each of ``classes`` (n,) to the rows of this shard it found, in place.

    ``found`` (n, m): global class ids that class i's row scored ``found_scores`` against
    (-1 for none), each at most once a row. A row r of the shard keeps the best k of its
    neighbours and the classes offered to it (at most its k best offers compete). A class
    already among r's neighbours takes the score of its offer, whether or not that offer is
    among r's best k; r's own class is never offered. Rows with no offer are untouched.
    """
    num_rows, k = graph.table.shape
    targets = owned_rows(found, class_start, class_start + num_rows)
    offered = classes.to(found.device).long().unsqueeze(1).expand_as(found)
    keep = (targets >= 0) & (targets + class_start != offered)
    targets, offered, scores = targets[keep], offered[keep], found_scores[keep].float()
    if targets.numel() == 0:
        return
    # Each row's offers best first (a stable sort by score, then by row), the first k kept.
    by_score = scores.argsort(descending=True, stable=True)
    targets, offered, scores = targets[by_score], offered[by_score], scores[by_score]
    by_row = targets.argsort(stable=True)
    targets, offered, scores = targets[by_row], offered[by_row], scores[by_row]
    rows, slot, counts = torch.unique_consecutive(targets, return_inverse=True, return_counts=True)
    position = torch.arange(targets.numel(), device=targets.device) - (counts.cumsum(0) - counts)[slot]
    first = position < k
    offer_ids = torch.full((rows.numel(), k), -1, dtype=torch.long, device=targets.device)
    offer_scores = torch.full((rows.numel(), k), -math.inf, dtype=torch.float32, device=targets.device)
    offer_ids[slot[first], position[first]] = offered[first]
    offer_scores[slot[first], position[first]] = scores[first]
    # Neighbours offered again take their new scores, found by (row, class) key among all offers.
    current, current_scores = graph.table[rows].long(), graph.scores[rows]
    span = int(max(int(offered.max()), int(current.max()))) + 1
    offer_keys, order = (targets * span + offered).sort()
    current_keys = rows.unsqueeze(1) * span + current
    at = torch.searchsorted(offer_keys, current_keys).clamp_(max=offer_keys.numel() - 1)
    renewed = (offer_keys[at] == current_keys) & (current >= 0)
    current_scores = torch.where(renewed, scores[order][at], current_scores)
    held = ((offer_ids.unsqueeze(2) == current.unsqueeze(1)) & (current.unsqueeze(1) >= 0)).any(2)
    offer_ids = offer_ids.masked_fill(held, -1)  # already a neighbour, now with the offer's score
    best_scores, best = merge_candidates(
        torch.cat((current_scores, offer_scores), 1), torch.cat((current, offer_ids), 1), k
    )
    graph.table[rows] = best.to(torch.int32)
    graph.scores[rows] = best_scores


# --- recall against exact search over all shards ------------------------------------------


@torch.no_grad()
def exact_class_topk(
    queries: torch.Tensor,
    weight: torch.Tensor,
    class_start: int,
    k: int,
    *,
    cosine: bool = False,
    exclude: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """(n, k) int64: the exact best ``k`` classes over all shards for ``queries`` (n, D), the
    same on every rank (cosine: pass unit queries), leaving out ``exclude`` (n,) class ids.
    Each rank searches its shard exactly; the candidates are all-gathered and merged."""
    wanted = k + (exclude is not None)
    scores, rows = exact_topk(queries, weight.detach(), wanted, cosine=cosine)
    scores, ids = _pad(scores.float(), rows + class_start, wanted)
    scores, ids = _every_ranks_candidates(scores, ids, group)
    return merge_candidates(scores, ids, k, exclude)[1]


def _every_ranks_candidates(scores: torch.Tensor, ids: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's (n, m) candidates side by side, (n, W·m), the same on every rank: all-gathers over ``group``."""
    world = group_world_size(group)
    if world == 1:
        return scores, ids
    all_scores = [torch.empty_like(scores) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_scores, scores.contiguous(), group=group)
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    return torch.cat(all_scores, 1), torch.cat(all_ids, 1)


def label_rows(weight: torch.Tensor, labels: torch.Tensor, class_start: int, group=None) -> torch.Tensor:
    """(n, D) float32: the weight row of each label (every label a class id), the same on
    every rank: its owner puts it in, one all-reduce (sum) of n x D over ``group``."""
    local = labels.long() - class_start
    owned = (local >= 0) & (local < weight.shape[0])
    rows = weight.detach()[local.clamp(0, weight.shape[0] - 1)].float()
    rows = torch.where(owned.unsqueeze(1), rows, torch.zeros_like(rows))
    if group_world_size(group) > 1:
        dist.all_reduce(rows, group=group)
    return rows


def neighbour_recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Fraction of the exact ids (n, k; -1 ignored) that appear in their row of ``found`` (n, m)."""
    present = exact >= 0
    if not present.any():
        return 1.0
    hits = (exact.unsqueeze(2) == found.unsqueeze(1)).any(dim=2) & present
    return (hits.sum() / present.sum()).item()


def active_recall(
    exact: torch.Tensor, active_rows: torch.Tensor | None, class_start: int, class_stop: int, group=None
) -> float:
    """Fraction of the exact ids (n, k; global, -1 ignored; the same on every rank) that lie
    in the active rows (sorted local rows, None: all) of the shard that owns them. One
    all-reduce of one count over ``group``."""
    present = exact >= 0
    local = exact - class_start
    owned = present & (local >= 0) & (local < class_stop - class_start)
    if active_rows is None:
        hit = owned
    elif active_rows.numel() == 0:
        hit = torch.zeros_like(owned)
    else:
        position = torch.searchsorted(active_rows, local.clamp(min=0)).clamp_(max=active_rows.numel() - 1)
        hit = owned & (active_rows[position] == local)
    hits = hit.sum().reshape(1)
    if group_world_size(group) > 1:
        dist.all_reduce(hits, group=group)
    total = int(present.sum())
    return 1.0 if total == 0 else hits.item() / total
