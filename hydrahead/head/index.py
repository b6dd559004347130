"""Maximum-inner-product search over one shard's class weight rows.

The active-class selection ("KNN softmax") asks, per sample, for the K classes of its
shard whose weight rows score highest against the sample's feature. Every backend here
answers that behind one small interface (``ClassIndex``): ``build`` from the shard's
weights (C_r x D), ``search`` with a batch of queries (B x D), get back
``(scores, rows)``, both (B, k), best first, rows being LOCAL row numbers 0..C_r-1.

An index is named as the config names it (``head.index``, ``head.index_type``): a backend
and a type, ``make_index(backend, index_type)``:
  * ``faiss`` ``flat`` / ``ivf`` / ``hnsw`` - FAISS inner-product indexes; a GPU index when
    ``faiss.StandardGpuResources`` exists and the index lives on CUDA.
  * ``torch`` ``flat`` - exact chunked search in torch (the reference, any device).
  * ``torch`` ``ivf``  - inverted lists from a seeded k-means in torch; candidates are
    re-scored with the CURRENT weights, so a stale index only costs recall.
  * ``auto`` backend - FAISS where it can serve the weights' device, else torch, chosen at
    build time and logged; ``auto`` type - flat up to ``EXACT_MAX_ROWS`` rows, ivf above.

Every index is a plain inner-product index. For cosine similarity the caller normalises
both the queries and the weights it builds from (and re-scores with).

When an index finds fewer than k rows (IVF probing lists that hold fewer rows than k),
the missing slots hold row -1 with score -inf, at the end of each row of results; callers
filter ``rows >= 0``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

logger = logging.getLogger("hydrahead.index")

BACKENDS = ("auto", "faiss", "torch")
INDEX_TYPES = ("auto", "flat", "ivf", "hnsw")
TORCH_TYPES = ("flat", "ivf")  # the torch backend has no hnsw
FAISS_TYPES = ("flat", "ivf", "hnsw")
METRICS = ("ip",)
DEFAULT_CHUNK_SIZE = 32768  # weight rows per matmul in the exact search
DEFAULT_GATHER_ROWS = 65536  # candidate rows gathered per pass in torch_ivf
DEFAULT_NPROBE = 32
EXACT_MAX_ROWS = 2**20  # index_type `auto`: exact (flat) search up to this many rows, ivf above
_TRAIN_ROWS_PER_LIST = 256  # k-means sample size per centroid (as FAISS's default cap)
_TORCH_TRAIN_ROWS_PER_LIST = 64  # the torch IVF's sample: a rebuild of a 25M-row shard stays well under a second
_GROUP_SCORE_BYTES = 1 << 30  # float32 scores of one product in a list-grouped search
_SCORE_ALIGN = 8  # candidates per grouped product padded to a multiple of this (32-byte float32 score rows)
_PIECE_CANDIDATES = 1 << 18  # candidate rows gathered at once by a list-grouped search (512 MiB of float32 at D = 512)
# Scores per block in ``topk_by_blocks``; HYDRAHEAD_TOPK_BLOCK=0 takes the plain top-k. A group
# with at least TOPK_BLOCK_MIN_CANDIDATES candidates takes it and pads them to a multiple of
# the block: below that, its dozen launches cost the host more than the GPU saves (H200:
# 0.53 -> 0.42 ms for 3,052 x 12,288 scores, 1.76 -> 0.62 ms for 3,052 x 49,152).
TOPK_BLOCK = int(os.environ.get("HYDRAHEAD_TOPK_BLOCK", "128"))
# A list-grouped search's top-k without its scores written (``hydrahead.kernels.group_topk``):
# "cuda" (default) on CUDA devices, "kernel" anywhere (the CPU under Triton's interpreter),
# "torch" never. On an H100 it took a 25M-row graph build at 4 lists from 15.2 to 8.7 s (16
# lists: 14.3 against 16.2 s; docs/selection.md, "Top-k without the scores").
GROUP_TOPK_MODES = ("torch", "cuda", "kernel")
GROUP_TOPK = os.environ.get("HYDRAHEAD_GROUP_TOPK", "cuda")
GROUP_TOPK_BLOCK_ROWS = 128  # the kernel's candidate tile; a group needs k of them
# HYDRAHEAD_TOPK_BLOCK_MIN sets it: with the candidates gathered per piece the build is
# bound by the device rather than the host, and blocks at 4 lists (12,288 candidates) took
# one piece of 21 groups from 13.1 to 10.5 ms (group_topk_v1.json); not yet tried in a build.
TOPK_BLOCK_MIN_CANDIDATES = int(os.environ.get("HYDRAHEAD_TOPK_BLOCK_MIN", "16384"))
_FAISS_INSTALL_HINT = "pip install hydrahead[faiss-cpu] (or hydrahead[faiss-gpu])"


class ClassIndex(Protocol):
    """Inner-product search over a shard's class weight rows."""

    name: str

    def build(self, weight: torch.Tensor) -> None:
        """Index ``weight`` (C_r, D), any float dtype and device; copies what it needs."""

    def search(
        self, queries: torch.Tensor, k: int, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (scores float32, rows int64), both (B, k) best first, on the queries' device.

        k is clamped to C_r. ``weight``, if given, holds the current weights (same shape as
        at build time); scores are then computed with them.
        """


# ----------------------------------------------------------------------------------------
# Pure functions: the exact reference and the recall metric
# ----------------------------------------------------------------------------------------


def exact_topk(
    queries: torch.Tensor, weight: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE, *, cosine: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ weight.T`` without forming all B x C_r scores.

    Weight rows are scored ``chunk_size`` at a time and merged into a running top-k, so
    memory is O(B x chunk_size). Scores are computed in the wider of the inputs' dtype and
    float32 (float64 inputs stay float64, so this can serve as an exact reference); rows
    are int64, on the queries' device. k is clamped to C_r. ``cosine``: each weight row is
    divided by its L2 norm as it is scored (queries are taken as given).
    """
    _check_k(k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if queries.dim() != 2 or weight.dim() != 2 or queries.shape[1] != weight.shape[1]:
        raise ValueError(
            f"queries (B, D) and weight (C_r, D) must share D, got {tuple(queries.shape)} and {tuple(weight.shape)}"
        )
    num_rows = weight.shape[0]
    if num_rows == 0:
        raise ValueError("weight has no rows")
    k = min(k, num_rows)
    dtype = torch.float64 if torch.float64 in (queries.dtype, weight.dtype) else torch.float32
    q = queries.to(dtype)
    best_scores = best_rows = None
    for start in range(0, num_rows, chunk_size):
        chunk = weight[start : start + chunk_size].to(device=q.device, dtype=dtype)
        if cosine:
            chunk = torch.nn.functional.normalize(chunk, dim=1)
        scores, rows = (q @ chunk.T).topk(min(k, chunk.shape[0]), dim=1)
        rows += start
        if best_scores is not None:
            # Merge with the best so far: top-k of the union of two top-k lists.
            scores = torch.cat([best_scores, scores], dim=1)
            rows = torch.cat([best_rows, rows], dim=1)
            scores, pos = scores.topk(min(k, scores.shape[1]), dim=1)
            rows = rows.gather(1, pos)
        best_scores, best_rows = scores, rows
    return best_scores, best_rows


def recall_at_k(found_rows: torch.Tensor, exact_rows: torch.Tensor) -> float:
    """Fraction of the exact top-k rows (B, k) that appear in the found rows (B, k')."""
    if found_rows.shape[0] != exact_rows.shape[0]:
        raise ValueError(
            f"found_rows and exact_rows must have the same number of queries, got "
            f"{found_rows.shape[0]} and {exact_rows.shape[0]}"
        )
    if exact_rows.numel() == 0:
        return 1.0
    found = found_rows.to(exact_rows.device)
    # (B, k, 1) == (B, 1, k'): is each exact row anywhere in its query's found rows?
    hits = (exact_rows.unsqueeze(2) == found.unsqueeze(1)).any(dim=2)
    return hits.float().mean().item()


# ----------------------------------------------------------------------------------------
# Shared checks and result handling
# ----------------------------------------------------------------------------------------


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _pad_results(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, k') results to (B, k) with score -inf / row -1 (k' <= k)."""
    missing = k - scores.shape[1]
    if missing > 0:
        scores = torch.cat([scores, scores.new_full((scores.shape[0], missing), -math.inf)], 1)
        rows = torch.cat([rows, rows.new_full((rows.shape[0], missing), -1)], 1)
    return scores, rows


def group_topk_on(rows: torch.Tensor) -> bool:
    """Whether searches over ``rows`` take the list-group top-k kernel (no score written):
    HYDRAHEAD_GROUP_TOPK=cuda (the default) on a GPU, =kernel anywhere, =torch never."""
    if GROUP_TOPK not in GROUP_TOPK_MODES:
        raise ValueError(f"HYDRAHEAD_GROUP_TOPK must be one of {GROUP_TOPK_MODES}, got {GROUP_TOPK!r}")
    return GROUP_TOPK == "kernel" or (GROUP_TOPK == "cuda" and rows.is_cuda)


def score_rows(queries: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """float32 scores of each query against its own rows (B, M); rows -1 score -inf."""
    valid = rows >= 0
    gathered = weight[rows.clamp(min=0).to(weight.device)].to(queries.device, torch.float32)
    if cosine:
        gathered = torch.nn.functional.normalize(gathered, dim=2)
    scores = torch.bmm(gathered, queries.unsqueeze(2)).squeeze(2)
    return scores.masked_fill(~valid, -math.inf)


class _IndexBase:
    """Shape bookkeeping and validation shared by the backends."""

    name = "base"
    # True when searches read only the current weights passed in (nothing to go stale).
    searches_current_weights = False

    def __init__(self) -> None:
        self.num_rows: int | None = None
        self.dim: int | None = None

    def _check_build(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D float tensor (C_r, D), got {tuple(weight.shape)} {weight.dtype}")
        if weight.shape[0] == 0:
            raise ValueError("weight has no rows: cannot build an index over an empty shard")
        self.num_rows, self.dim = weight.shape

    def _check_search(self, queries: torch.Tensor, k: int, weight: torch.Tensor | None) -> int:
        """Validate a search call; return k clamped to C_r."""
        if self.num_rows is None:
            raise RuntimeError(f"{self.name} index: search() called before build()")
        _check_k(k)
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"{self.name} index: queries must be (B, {self.dim}) as the weights it was "
                f"built from, got {tuple(queries.shape)}"
            )
        if weight is not None and tuple(weight.shape) != (self.num_rows, self.dim):
            raise ValueError(
                f"{self.name} index: current weight must be ({self.num_rows}, {self.dim}) as "
                f"at build time, got {tuple(weight.shape)}"
            )
        return min(k, self.num_rows)


# ----------------------------------------------------------------------------------------
# Torch backends
# ----------------------------------------------------------------------------------------


class TorchExactIndex(_IndexBase):
    """Exact chunked search in torch on any device (see ``exact_topk``).

    With ``copy_weights=False`` nothing is stored: every search must pass the current
    weights and searches them directly, so the results are never stale.
    """

    name = "torch_flat"

    def __init__(
        self,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        device: torch.device | str | None = None,
        *,
        cosine: bool = False,
        copy_weights: bool = True,
    ):
        super().__init__()
        self.chunk_size, self.cosine, self.copy_weights = chunk_size, cosine, copy_weights
        self.device = torch.device(device) if device is not None else None
        self._weight: torch.Tensor | None = None

    @property
    def searches_current_weights(self) -> bool:
        return not self.copy_weights

    def build(self, weight: torch.Tensor) -> None:
        self._check_build(weight)
        if self.copy_weights:
            # A private copy in the weights' own dtype: chunks are widened to float32 when scored.
            self._weight = weight.detach().to(self.device or weight.device, copy=True)

    def search(self, queries, k, weight=None):
        k = self._check_search(queries, k, weight)
        if weight is None and not self.copy_weights:
            raise ValueError("torch index built with copy_weights=False: search() needs the current weights")
        # Exact search is as cheap with the current weights as with the copy: prefer them.
        source = weight.detach() if weight is not None else self._weight
        q = queries.detach().to(source.device, torch.float32)
        scores, rows = exact_topk(q, source, k, self.chunk_size, cosine=self.cosine)
        return scores.float().to(queries.device), rows.to(queries.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Nothing to save without a copy (the search reads the current weights)."""
        if self.copy_weights:
            raise RuntimeError("a torch index holding a weight copy is not saved; build it again instead")
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        self.build(weight)


_PACING = threading.local()
_COPY_ROWS = 1 << 20  # rows per slice of a paced weight copy (1 GiB at D = 512 in bf16)
_LIST_ROWS = 1 << 20  # rows per slice of the list table's grouping


@contextlib.contextmanager
def paced(stream):
    """Builds and refiles inside wait for ``stream`` after each piece of work they queue (a
    chunk of rows against the centroids, a slice of a copy or of the list grouping, a piece
    of a graph search's groups).

    A build on a side stream queues its kernels far ahead of the training stream; the GPU
    then hands the SMs to both queues, and a training kernel waits behind the build's
    queued work (a stream's priority cannot take SMs back from kernels already running).
    Paced, the build keeps at most one piece ahead: about a millisecond of an index build, 5-10
    ms of a graph search by list groups at 25M rows (pieces of 32,768 candidates, under a
    millisecond, made that build 10x slower beside steps and did not shorten the steps'
    stalls; docs/selection.md). ``stream`` None: no waiting (the synchronous builds, the CPU).
    """
    previous = getattr(_PACING, "stream", None)
    _PACING.stream = stream
    try:
        yield
    finally:
        _PACING.stream = previous


def piece_done() -> None:
    """The end of one piece of a build: under ``paced``, wait until the GPU has run it."""
    stream = getattr(_PACING, "stream", None)
    if stream is not None:
        stream.synchronize()


def topk_by_blocks(scores: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k, dim=1)`` (the same values; positions may differ only between equal
    scores) for k far below a row's length, which must be a multiple of ``block``. The k best
    scores lie in the k blocks of ``block`` consecutive scores whose maxima are highest (any
    other block's best has k better scores ahead of it), so one pass takes each block's
    maximum and the top-k then reads k·block scores per row, not the whole row."""
    num_rows, length = scores.shape
    if length % block or 2 * k * block > length:  # short rows: the plain top-k reads as much
        return scores.topk(k, dim=1)
    blocks = scores.view(num_rows, length // block, block)
    _, best_blocks = blocks.amax(dim=2).topk(k, dim=1)
    picked = blocks.gather(1, best_blocks.unsqueeze(2).expand(num_rows, k, block))
    values, where = picked.view(num_rows, k * block).topk(k, dim=1)
    return values, best_blocks.gather(1, where // block) * block + where % block


@dataclass
class _GroupPlan:
    """One group of a list-grouped search: its queries [first_query, last_query) in group
    order, its neighbourhood's lists, and where its candidates sit in its piece."""

    first_query: int
    last_query: int
    lists: list[int]
    list_lengths: list[int]
    num_candidates: int
    padded: int  # candidates rounded up to the alignment (or TOPK_BLOCK) the products need
    blocked: bool  # top-k by blocks
    offset: int = 0  # first candidate's position in the piece

    @property
    def num_queries(self) -> int:
        return self.last_query - self.first_query


def _group_plans(counts: list[int], hoods: list[list[int]], lengths: list[int], k: int) -> list[_GroupPlan]:
    """Each group's queries, lists (empty ones left out) and padded candidate count."""
    plans, start = [], 0
    for count, hood in zip(counts, hoods):
        lists = [lst for lst in hood if lengths[lst] > 0]
        num_candidates = sum(lengths[lst] for lst in lists)
        blocked = TOPK_BLOCK > 0 and num_candidates >= max(TOPK_BLOCK_MIN_CANDIDATES, 2 * k * TOPK_BLOCK)
        align = TOPK_BLOCK if blocked else _SCORE_ALIGN
        padded = -(-num_candidates // align) * align
        plans.append(
            _GroupPlan(start, start + count, lists, [lengths[lst] for lst in lists], num_candidates, padded, blocked)
        )
        start += count
    return plans


def _pieces(plans: list[_GroupPlan], max_candidates: int):
    """Consecutive groups whose candidates together stay within ``max_candidates`` rows (a
    group larger than that forms a piece of its own), with each group's offset in its piece."""
    piece, total = [], 0
    for plan in plans:
        if piece and total + plan.padded > max_candidates:
            yield piece
            piece, total = [], 0
        plan.offset = total
        piece.append(plan)
        total += plan.padded
    if piece:
        yield piece


def _runs(piece: list[_GroupPlan], table_width: int, device) -> torch.Tensor:
    """Positions in the flattened list table of every candidate of a piece, group after group,
    each group's run padded with repeats of its first candidate (their scores are set to -inf).
    Planned on the host as runs (start, length, step), made on the device in a few launches."""
    starts, lengths, steps = [], [], []
    for plan in piece:
        for lst, length in zip(plan.lists, plan.list_lengths):
            starts.append(lst * table_width)
            lengths.append(length)
            steps.append(1)
        if plan.padded > plan.num_candidates:
            starts.append(plan.lists[0] * table_width)
            lengths.append(plan.padded - plan.num_candidates)
            steps.append(0)
    if not starts:
        return torch.empty(0, dtype=torch.long, device=device)
    runs = torch.tensor([starts, lengths, steps], dtype=torch.long).to(device, non_blocking=True)
    starts_t, lengths_t, steps_t = runs
    total = sum(lengths)
    within = torch.arange(total, device=device) - torch.repeat_interleave(
        torch.cumsum(lengths_t, 0) - lengths_t, lengths_t, output_size=total
    )
    return torch.repeat_interleave(starts_t, lengths_t, output_size=total) + within * torch.repeat_interleave(
        steps_t, lengths_t, output_size=total
    )


def _copy_rows(weight: torch.Tensor, device) -> torch.Tensor:
    """A copy of ``weight`` on ``device``, slice by slice (a 25M-row shard is 25 GiB: one
    copy kernel would hold the memory bandwidth for several milliseconds)."""
    out = torch.empty(weight.shape, dtype=weight.dtype, device=device)
    for start in range(0, weight.shape[0], _COPY_ROWS):
        out[start : start + _COPY_ROWS].copy_(weight[start : start + _COPY_ROWS])
        piece_done()
    return out


def _nearest_centroid(
    x: torch.Tensor, centroids: torch.Tensor, chunk_size: int, cosine: bool = False, metric: str = "l2"
) -> torch.Tensor:
    """Index of each row's centroid, in chunks of rows: the L2-nearest (k-means) or the one
    of highest inner product (``metric="ip"``: how an IVF index files rows and probes).

    L2: argmin ||x - c||^2 = argmax (x.c - ||c||^2 / 2), ||x||^2 being the same for every
    c. On a GPU the products run in bfloat16 with a bf16 result: at 25M rows x 8,192
    centroids they are 2 x 10^14 FLOPs, and a near-tie between two centroids only decides
    which of two neighbouring lists a row joins. On the CPU they stay float32. ``cosine``
    normalises the rows first.
    """
    compute = torch.bfloat16 if x.is_cuda else torch.float32
    c = centroids.to(compute)
    half_sq_norms = (0.5 * (centroids * centroids).sum(1)).to(compute)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        if cosine:
            chunk = torch.nn.functional.normalize(chunk.float(), dim=1)
        if metric == "ip":
            scores = chunk.to(compute) @ c.T
        else:
            scores = torch.addmm(half_sq_norms, chunk.to(compute), c.T, beta=-1)
        out[start : start + chunk_size] = scores.argmax(1)
        piece_done()
    return out


def sample_rows(num_rows: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct row numbers out of ``num_rows`` drawn uniformly, seeded (CPU, int64).

    A permutation of all the rows costs O(num_rows): about a second for 25M rows, half of a
    k-means rebuild. Where the sample is a small share of the rows, draws with replacement,
    their distinct values and a random ``count`` of those cost O(count) (every set of
    ``count`` rows is as likely as any other, by symmetry); otherwise the permutation.
    """
    if not 0 <= count <= num_rows:
        raise ValueError(f"cannot draw {count} distinct rows out of {num_rows}")
    gen = torch.Generator().manual_seed(seed)
    if 4 * count >= num_rows:
        return torch.randperm(num_rows, generator=gen)[:count]
    distinct = torch.empty(0, dtype=torch.long)
    while distinct.numel() < count:  # a few percent of repeats: one more round at most, nearly always
        draws = torch.randint(num_rows, (count + count // 16 + 64,), generator=gen)
        distinct = torch.cat([distinct, draws]).unique()
    return distinct[torch.randperm(distinct.numel(), generator=gen)[:count]]


def kmeans(
    x: torch.Tensor, num_clusters: int, num_iters: int = 10, seed: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Lloyd's k-means (L2), seeded; returns float32 centroids (num_clusters, D) on x's device.

    Initial centroids are distinct rows of x; a cluster that empties keeps its centroid.
    The sums are exact in order on the CPU; on a GPU ``index_add_`` adds with atomics, so
    the last bits of a centroid can differ between two builds from the same rows.
    """
    gen = torch.Generator().manual_seed(seed)
    start = torch.randperm(x.shape[0], generator=gen)[:num_clusters].to(x.device)
    centroids = x[start].float()
    for _ in range(num_iters):
        assign = _nearest_centroid(x, centroids, chunk_size)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x.float())
        counts = torch.bincount(assign, minlength=num_clusters).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        piece_done()
    return centroids


class TorchIVFIndex(_IndexBase):
    """Inverted-file index in torch whose candidates are re-scored with the current weights.

    Build: k-means (L2, on a seeded sample of the rows) into ``nlist`` centroids; every
    row goes to the list of its nearest centroid. Lists are stored padded, as an
    (nlist, max_list_len) table of row numbers with -1 padding. A search probes the
    ``nprobe`` centroids of highest inner product with each query, scores the rows of those
    lists with the weights given to ``search`` (or the build-time copy) and keeps the
    top-k. On a GPU the scoring is one kernel that reads each probed list once for all the
    queries probing it (``hydrahead.kernels.ivf_scores``); elsewhere rows are gathered per
    query. The index itself is the centroids and the list of each row (``state_dict``).
    With ``cosine`` rows are normalised for clustering and scoring.
    """

    name = "torch_ivf"

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        num_iters: int = 10,
        seed: int = 0,
        chunk_size: int = DEFAULT_GATHER_ROWS,
        device: torch.device | str | None = None,
        *,
        cosine: bool = False,
        copy_weights: bool = True,
    ):
        super().__init__()
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.nlist_request, self.nprobe, self.num_iters, self.seed = nlist, nprobe, num_iters, seed
        self.chunk_size, self.cosine, self.copy_weights = chunk_size, cosine, copy_weights
        self.device = torch.device(device) if device is not None else None
        self.nlist: int | None = None
        self._weight = self._centroids = self._assign = self._table = self._lengths = None

    def build(self, weight: torch.Tensor) -> None:
        self._check_build(weight)
        device = self.device or weight.device
        source = weight.detach()
        if self.copy_weights:
            self._weight = source = _copy_rows(source, device)
        self.nlist = _resolve_nlist(self.nlist_request, self.num_rows)
        # Train on a seeded sample: k-means quality saturates long before all of 100M rows.
        num_train = min(self.num_rows, _TORCH_TRAIN_ROWS_PER_LIST * self.nlist)
        sample = sample_rows(self.num_rows, num_train, self.seed)
        train = source[sample.to(source.device)].to(device, torch.float32)
        if self.cosine:
            train = torch.nn.functional.normalize(train, dim=1)
        centroids = kmeans(train, self.nlist, self.num_iters, self.seed, DEFAULT_CHUNK_SIZE)
        # Rows are filed by inner product, the rule the search probes with.
        assign = _nearest_centroid(source, centroids.to(source.device), DEFAULT_CHUNK_SIZE, self.cosine, "ip")
        self._set_lists(centroids, assign.to(device))

    def reassigned(self, weight: torch.Tensor, rows: torch.Tensor) -> "TorchIVFIndex":
        """A new index with the same centroids and ``rows`` filed again from ``weight``.

        Rows not given keep their lists. When they are the only rows whose weights changed
        since this index was built, the result equals a rebuild with these centroids, for
        the cost of the changed rows alone.
        """
        if self._centroids is None:
            raise RuntimeError("torch_ivf index: reassigned() called before build()")
        if tuple(weight.shape) != (self.num_rows, self.dim):
            raise ValueError(
                f"torch_ivf index: weight must be ({self.num_rows}, {self.dim}), got {tuple(weight.shape)}"
            )
        new = copy.copy(self)
        assign = self._assign.clone()
        rows = rows.to(weight.device, torch.long)
        centroids = self._centroids.to(weight.device)
        for start in range(0, rows.numel(), DEFAULT_CHUNK_SIZE):
            chunk = rows[start : start + DEFAULT_CHUNK_SIZE]
            lists = _nearest_centroid(weight.detach()[chunk], centroids, DEFAULT_CHUNK_SIZE, self.cosine, "ip")
            assign[chunk.to(assign.device)] = lists.to(assign.device)
        if self.copy_weights:
            new._weight = _copy_rows(weight.detach(), self._weight.device)
        new._set_lists(self._centroids, assign)
        return new

    def rows_by_list(self) -> torch.Tensor:
        """Every row of the shard once, list by list (int64): the order in which a class-graph
        build takes the shard's rows as queries, so that a block of them shares a few lists."""
        if self._table is None:
            raise RuntimeError("torch_ivf index: rows_by_list() called before build()")
        return self._table[self._table >= 0].long()

    def search_by_list_groups(self, queries, k, weight=None, *, score_bytes: int = _GROUP_SCORE_BYTES):
        """As ``search``, for queries that mostly share their nearest lists (a class-graph build
        takes a list's rows together): the queries whose nearest list is L score, in one dense
        product, every row of the ``nprobe`` lists nearest L (L and the lists whose centroids
        score highest against L's), then a top-k.

        A query's candidates are thus its group's lists rather than its own probes (the same
        lists for the rows deep inside L; for a row near L's border, the lists that surround
        L). ``search`` reads each probed list once per block of queries in a kernel built for
        a few queries per list; grouped, each product is a GEMM of a list's rows against its
        neighbourhood and the top-k reads dense scores, with no padding to the longest list.
        ``score_bytes`` bounds one product's float32 scores (a group's queries in pieces).
        """
        k = self._check_search(queries, k, weight)
        if weight is None and not self.copy_weights:
            raise ValueError("torch_ivf index built with copy_weights=False: search needs the current weights")
        source = weight.detach() if weight is not None else self._weight
        q = queries.detach().to(source.device, torch.float32)
        centroids = self._centroids.to(source.device)
        nprobe = min(self.nprobe, self.nlist)
        nearest = _nearest_centroid(q, centroids, DEFAULT_CHUNK_SIZE, False, "ip")  # queries come normalised
        out_scores = torch.empty((q.shape[0], k), device=source.device)  # every entry written below
        out_rows = torch.empty((q.shape[0], k), dtype=torch.long, device=source.device)
        order = torch.argsort(nearest, stable=True)
        lists, counts = torch.unique_consecutive(nearest[order], return_counts=True)
        neighbourhoods = _list_neighbourhoods(centroids, lists, nprobe)
        compute = torch.bfloat16 if source.is_cuda else torch.float32
        # The block's host reads, once: group sizes, neighbourhoods, list lengths. The host then
        # plans every group's candidates as slices of one gathered piece (no per-list slicing,
        # no mask whose size the host would wait for) and queues the products without waiting.
        lengths = self._lengths.tolist()
        plans = _group_plans(counts.tolist(), neighbourhoods.tolist(), lengths, k)
        grouped = q.to(compute)[order]
        # Results in group order (each group's a contiguous run of queries), put back in query
        # order once at the end.
        grouped_scores, grouped_rows = torch.empty_like(out_scores), torch.empty_like(out_rows)
        table = self._table.to(source.device).reshape(-1)
        for piece in _pieces(plans, _PIECE_CANDIDATES):
            self._search_piece(piece, grouped, source, table, compute, k, score_bytes, grouped_scores, grouped_rows)
            piece_done()
        out_scores[order], out_rows[order] = grouped_scores, grouped_rows
        return out_scores.to(queries.device), out_rows.to(queries.device)

    def _search_piece(self, piece, grouped, source, table, compute, k, score_bytes, out_scores, out_rows) -> None:
        """The groups of one piece: their candidates gathered (and scaled to unit rows) in one
        pass, then each group's queries scored against its run of them and its best k kept,
        by the kernel (two launches for all of the piece's groups that have k tiles) or in
        torch, a product and a top-k per group; then every group's best k written with one
        gather of the candidates' row numbers."""
        from hydrahead.kernels import group_topk  # Triton's import, only when searching
        from hydrahead.kernels.exact_gemm import matmul_fp32

        first_query, last_query = piece[0].first_query, piece[-1].last_query
        positions = _runs(piece, self._table.shape[1], source.device)
        candidates = table[positions]
        rows = source.index_select(0, candidates)
        if self.cosine:  # each row over its norm, before the products: rows x D, not queries x rows
            wide = torch.float64 if rows.dtype == torch.float64 else torch.float32
            readable = rows if rows.element_size() > 1 else rows.to(compute)  # norms take no fp8
            inv_norm = 1.0 / torch.linalg.vector_norm(readable, dim=1, dtype=wide).clamp_min(1e-12)
            rows = readable * inv_norm.unsqueeze(1)  # promoted to ``wide``, then rounded once
        rows = rows.to(compute)
        queries = grouped[first_query:last_query]
        use_kernel = group_topk_on(rows)
        by_kernel = [
            plan
            for plan in piece
            if use_kernel
            and plan.num_queries
            and group_topk.kernel_groups(plan.num_candidates, k, GROUP_TOPK_BLOCK_ROWS)
        ]
        if by_kernel:
            best_scores, found = group_topk.group_topk(
                queries,
                rows,
                [plan.first_query - first_query for plan in by_kernel],
                [plan.last_query - first_query for plan in by_kernel],
                [plan.offset for plan in by_kernel],
                [plan.offset + plan.num_candidates for plan in by_kernel],
                k,
                block_rows=GROUP_TOPK_BLOCK_ROWS,
            )
        else:
            best_scores = torch.full((queries.shape[0], k), -math.inf, device=source.device)
            found = torch.full((queries.shape[0], k), -1, dtype=torch.long, device=source.device)
        kernel_ids = {id(plan) for plan in by_kernel}
        for plan in piece:
            if plan.num_candidates == 0 or id(plan) in kernel_ids:
                continue  # no candidates: the -inf and -1 above stay
            group_rows = rows[plan.offset : plan.offset + plan.padded]
            take = min(k, plan.num_candidates)
            per_product = max(1, score_bytes // (4 * plan.padded))
            for first in range(plan.first_query, plan.last_query, per_product):
                last = min(first + per_product, plan.last_query)
                scores = matmul_fp32(grouped[first:last], group_rows.T)
                if plan.padded > plan.num_candidates:
                    scores[:, plan.num_candidates :] = -math.inf  # the padding never ranks
                if plan.blocked:
                    best, position = topk_by_blocks(scores, take, TOPK_BLOCK)
                else:
                    best, position = scores.topk(take, dim=1)
                best_scores[first - first_query : last - first_query, :take] = best
                found[first - first_query : last - first_query, :take] = position + plan.offset
            piece_done()
        out_scores[first_query:last_query] = best_scores
        if candidates.numel() == 0:  # no group of the piece had a candidate
            out_rows[first_query:last_query] = -1
        else:
            out_rows[first_query:last_query] = torch.where(found >= 0, candidates[found.clamp_min(0)], -1)

    def _set_lists(self, centroids: torch.Tensor, assign: torch.Tensor) -> None:
        self._centroids, self._assign = centroids, assign
        self._table = _padded_lists(assign, self.nlist)
        self._lengths = (self._table >= 0).sum(1)  # rows per list, read by the GPU scoring kernel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The index as tensors: ``centroids`` (nlist, D) and ``assign`` (C_r,), each row's list."""
        if self._centroids is None:
            raise RuntimeError("torch_ivf index: state_dict() called before build()")
        return {"centroids": self._centroids, "assign": self._assign}

    def load_state_dict(self, state: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """Restore a saved index over ``weight``'s shape (no k-means, no assignment)."""
        self._check_build(weight)
        centroids, assign = state["centroids"], state["assign"]
        if centroids.dim() != 2 or centroids.shape[1] != self.dim or tuple(assign.shape) != (self.num_rows,):
            raise ValueError(
                f"torch_ivf state does not fit {self.num_rows} x {self.dim} weights: centroids "
                f"{tuple(centroids.shape)}, assign {tuple(assign.shape)}"
            )
        if assign.numel() and (int(assign.min()) < 0 or int(assign.max()) >= centroids.shape[0]):
            raise ValueError(
                f"torch_ivf state: list ids must be in [0, {centroids.shape[0]}), got "
                f"[{int(assign.min())}, {int(assign.max())}]"
            )
        device = self.device or weight.device
        if self.copy_weights:
            self._weight = weight.detach().to(device, copy=True)
        self.nlist = centroids.shape[0]
        self._set_lists(centroids.to(device, torch.float32), assign.to(device, torch.long))

    def search(self, queries, k, weight=None, *, row_inv_norms=None):
        """As ``ClassIndex.search``; ``row_inv_norms`` (C_r,) float32, 1 / ||w|| of the current
        weights' rows, spares the GPU scoring computing them (cosine only)."""
        k = self._check_search(queries, k, weight)
        if weight is None and not self.copy_weights:
            raise ValueError("torch_ivf index built with copy_weights=False: search() needs the current weights")
        source = weight.detach() if weight is not None else self._weight
        q = queries.detach().to(self._centroids.device, torch.float32)
        nprobe = min(self.nprobe, self.nlist)
        probes = (q @ self._centroids.T).topk(nprobe, dim=1).indices
        if source.is_cuda:
            scores, rows = self._search_lists(q, k, source, probes, row_inv_norms if self.cosine else None)
        else:
            scores, rows = self._search_gathered(q, k, source, probes)
        scores, rows = _pad_results(scores, rows, k)
        return scores.to(queries.device), rows.to(queries.device)

    def _search_lists(self, q, k, source, probes, inv_norms):
        """GPU: one kernel scores each probed list against all its queries; then a top-k."""
        from hydrahead.kernels.ivf_scores import probed_list_scores

        max_len = self._table.shape[1]
        scores = probed_list_scores(
            source,
            q.to(source.device),
            self._table,
            probes,
            normalize=self.cosine,
            lengths=self._lengths,
            inv_norms=inv_norms,
        )
        scores, pos = scores.topk(min(k, scores.shape[1]), dim=1)
        lists = probes.gather(1, torch.div(pos, max_len, rounding_mode="floor"))
        rows = self._table[lists, pos % max_len].masked_fill(scores == -math.inf, -1)
        return scores, rows

    def _search_gathered(self, q, k, source, probes):
        """Any device: gather each query's candidate rows and score them, in blocks."""
        candidates = self._table[probes].reshape(q.shape[0], -1)  # (B, nprobe * max_list_len)
        num_candidates = candidates.shape[1]
        # Queries in blocks so that at most ~chunk_size candidate rows are gathered at once.
        block = max(1, self.chunk_size // num_candidates)
        out_scores, out_rows = [], []
        for start in range(0, q.shape[0], block):
            cand = candidates[start : start + block]
            scores = score_rows(q[start : start + block], source, cand, self.cosine)
            scores, pos = scores.topk(min(k, num_candidates), dim=1)
            rows = cand.gather(1, pos).masked_fill(scores == -math.inf, -1)
            out_scores.append(scores)
            out_rows.append(rows)
        return torch.cat(out_scores), torch.cat(out_rows)


def _list_neighbourhoods(centroids: torch.Tensor, lists: torch.Tensor, size: int) -> torch.Tensor:
    """(len(lists), size) list ids: each list first, then the ``size - 1`` other lists whose
    centroids score highest against its centroid (inner product, the probing rule)."""
    scores = centroids[lists].float() @ centroids.float().T
    scores[torch.arange(lists.numel(), device=lists.device), lists] = math.inf  # the list itself first
    return scores.topk(size, dim=1).indices


def default_nlist(num_rows: int) -> int:
    """~4 sqrt(C_r) inverted lists, clamped to [1, C_r]."""
    return max(1, min(num_rows, round(4 * math.sqrt(num_rows))))


def _resolve_nlist(nlist: int | None, num_rows: int) -> int:
    return default_nlist(num_rows) if nlist is None else min(nlist, num_rows)


def _padded_lists(assign: torch.Tensor, nlist: int, slice_rows: int | None = None) -> torch.Tensor:
    """(nlist, max_list_len) table: row numbers of each list in ascending order, padded with -1.

    Built slice of rows by slice (a sort of each slice, placed after what earlier slices put
    in each list), not as one sort of all C_r rows: a paced build then waits behind a
    fraction of a millisecond of sorting, not one sort of 25M keys.
    """
    slice_rows = slice_rows or _LIST_ROWS
    counts = torch.bincount(assign, minlength=nlist)
    table = torch.full((nlist, int(counts.max())), -1, dtype=torch.long, device=assign.device)
    placed = torch.zeros(nlist, dtype=torch.long, device=assign.device)  # rows filed per list so far
    for start in range(0, assign.shape[0], slice_rows):
        part = assign[start : start + slice_rows]
        order = torch.argsort(part, stable=True)  # the slice's rows grouped by list, ascending within one
        lists = part[order]
        part_counts = torch.bincount(part, minlength=nlist)
        rank = torch.arange(part.shape[0], device=assign.device) - (torch.cumsum(part_counts, 0) - part_counts)[lists]
        table[lists, placed[lists] + rank] = order + start
        placed += part_counts
        piece_done()
    return table


# ----------------------------------------------------------------------------------------
# FAISS backend
# ----------------------------------------------------------------------------------------


def _import_faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError(f"the faiss index backend needs FAISS: {_FAISS_INSTALL_HINT}") from err
    return faiss


def faiss_available() -> bool:
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    return faiss_available() and hasattr(_import_faiss(), "StandardGpuResources")


FAISS_GPU_MAX_K = 2048  # FAISS's GPU k-selection returns at most this many rows, and probes at most this many lists


def check_faiss_gpu_search(k: int, nprobe: int, what: str) -> None:
    """Raise a ValueError naming ``what`` (the config keys behind ``k``) when a FAISS GPU index
    could not run a search of ``k`` rows over ``nprobe`` lists (it fails there at the first search)."""
    if k > FAISS_GPU_MAX_K:
        raise ValueError(
            f"{what} asks a FAISS GPU index for {k} rows per query; it returns at most {FAISS_GPU_MAX_K}: "
            "lower it, or use head.index=torch"
        )
    if nprobe > FAISS_GPU_MAX_K:
        raise ValueError(
            f"head.index_nprobe={nprobe}: a FAISS GPU index probes at most {FAISS_GPU_MAX_K} lists; "
            "lower it, or use head.index=torch"
        )


def faiss_serves(device: torch.device) -> bool:
    """Whether FAISS can index weights on ``device``: importable, with GPU support for a GPU
    (copying each step's queries to a CPU index costs more than the torch search there)."""
    return faiss_available() and (device.type != "cuda" or faiss_gpu_available())


def _to_numpy_f32(x: torch.Tensor, *, copy: bool = False):
    """``x`` as a contiguous float32 numpy array: a view of ``x``'s memory when it already
    is one (a float32 CPU tensor), unless ``copy``: then the array is always its own."""
    return x.detach().to("cpu", torch.float32, copy=copy).contiguous().numpy()


class FaissIndex(_IndexBase):
    """FAISS inner-product index: flat (exact), IVF or HNSW.

    Runs on a GPU when the index device is CUDA and this FAISS has GPU support
    (``faiss.StandardGpuResources``); HNSW has no GPU version and stays on the CPU.
    Vectors cross to FAISS as contiguous float32 numpy arrays; results come back as torch
    tensors on the queries' device. FAISS's "no result" (-1) keeps row -1, with score -inf.
    If ``search`` gets the current weights, the found rows are re-scored with them and
    re-sorted.
    """

    def __init__(
        self,
        faiss_type: str = "flat",
        nlist: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 64,
        seed: int = 0,
        device: torch.device | str | None = None,
        *,
        cosine: bool = False,
    ):
        super().__init__()
        self.cosine = cosine
        if faiss_type not in FAISS_TYPES:
            raise ValueError(f"faiss_type must be one of {FAISS_TYPES}, got {faiss_type!r}")
        if nlist is not None and nlist < 1:
            raise ValueError(f"nlist must be >= 1, got {nlist}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        self.faiss = _import_faiss()  # fail at construction, not at the first rebuild
        self.faiss_type, self.nlist_request, self.nprobe = faiss_type, nlist, nprobe
        self.hnsw_m, self.hnsw_ef_search, self.seed = hnsw_m, hnsw_ef_search, seed
        self.device = torch.device(device) if device is not None else None
        self.name = f"faiss_{faiss_type}"
        self.on_gpu = False
        self._index = self._quantizer = self._gpu_resources = None

    def build(self, weight: torch.Tensor) -> None:
        self._check_build(weight)
        faiss = self.faiss
        device = self.device or weight.device
        # normalize_L2 works in place: on a float32 CPU shard a view would normalise the head's own rows.
        w = _to_numpy_f32(weight, copy=self.cosine)
        if self.cosine:
            faiss.normalize_L2(w)
        dim = self.dim
        if self.faiss_type == "flat":
            index = faiss.IndexFlatIP(dim)
        elif self.faiss_type == "ivf":
            nlist = _resolve_nlist(self.nlist_request, self.num_rows)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = self.seed
            index.cp.max_points_per_centroid = _TRAIN_ROWS_PER_LIST  # FAISS samples the rest
            index.cp.min_points_per_centroid = 1  # small shards get few rows per list by design: no warning
            index.train(w)
            index.nprobe = min(self.nprobe, nlist)
            self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        else:
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(w)
        self.on_gpu = device.type == "cuda" and self.faiss_type != "hnsw" and hasattr(faiss, "StandardGpuResources")
        if device.type == "cuda" and not self.on_gpu:
            logger.info("%s index runs on the CPU (no FAISS GPU support for it here)", self.name)
        if self.on_gpu:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, device.index or 0, index)
        self._index = index

    def search(self, queries, k, weight=None):
        k = self._check_search(queries, k, weight)
        if self.faiss_type == "hnsw":
            self._index.hnsw.efSearch = max(self.hnsw_ef_search, k)  # fewer than k is useless
        scores_np, rows_np = self._index.search(_to_numpy_f32(queries), k)
        rows = torch.from_numpy(rows_np).to(queries.device, torch.long)
        if weight is not None:
            q = queries.detach().to(weight.device, torch.float32)
            scores = score_rows(q, weight.detach(), rows.to(weight.device), self.cosine)
            scores, pos = scores.sort(dim=1, descending=True)
            rows = rows.gather(1, pos.to(rows.device))
        else:
            scores = torch.from_numpy(scores_np)
        scores = scores.to(queries.device, torch.float32).masked_fill(rows < 0, -math.inf)
        return scores, rows


# ----------------------------------------------------------------------------------------
# Choosing a backend
# ----------------------------------------------------------------------------------------


class AutoIndex(_IndexBase):
    """Resolves an ``auto`` backend or type when it sees the weights (their device and C_r),
    and logs the choice when it changes.

    Backend ``auto``: on CUDA, FAISS on the GPU if this FAISS has GPU support, else torch
    (copying every step's queries to a CPU index would cost more than searching on the
    GPU); on the CPU, FAISS if importable, else torch. Type ``auto``: flat up to
    ``exact_max_rows`` rows, ivf above.
    """

    name = "auto"

    def __init__(
        self, backend: str = "auto", index_type: str = "auto", exact_max_rows: int = EXACT_MAX_ROWS, **options
    ):
        super().__init__()
        self.backend_choice, self.index_type, self.exact_max_rows = backend, index_type, exact_max_rows
        self.options = options
        self.backend: ClassIndex | None = None

    def _choose(self, weight: torch.Tensor) -> tuple[str, str]:
        backend = self.backend_choice
        if backend == "auto":
            backend = "faiss" if faiss_serves(torch.device(self.options.get("device") or weight.device)) else "torch"
        return backend, resolve_index_type(self.index_type, weight.shape[0], self.exact_max_rows)

    def build(self, weight: torch.Tensor) -> None:
        self._check_build(weight)
        backend, index_type = self._choose(weight)
        if self.backend is None or self.backend.name != f"{backend}_{index_type}":
            self.backend = _make_backend(backend, index_type, **self.options)
            logger.info(
                "index backend: %s for %d x %d weights on %s",
                self.backend.name,
                self.num_rows,
                self.dim,
                self.options.get("device") or weight.device,
            )
        self.backend.build(weight)
        self.name = f"auto:{self.backend.name}"

    @property
    def searches_current_weights(self) -> bool:
        return self.backend is not None and self.backend.searches_current_weights

    def search(self, queries, k, weight=None):
        if self.backend is None:
            raise RuntimeError("auto index: search() called before build()")
        return self.backend.search(queries, k, weight)

    def __getattr__(self, name: str):
        # The chosen backend's optional methods (rows_by_list, search_by_list_groups).
        if name in ("rows_by_list", "search_by_list_groups") and self.__dict__.get("backend") is not None:
            return getattr(self.__dict__["backend"], name)
        raise AttributeError(name)


def resolve_index_type(index_type: str, num_rows: int, exact_max_rows: int = EXACT_MAX_ROWS) -> str:
    """``auto``: flat (exact) up to ``exact_max_rows`` rows, ivf above; any other type as it is."""
    if index_type == "auto":
        return "flat" if num_rows <= exact_max_rows else "ivf"
    return index_type


def _make_backend(
    backend: str,
    index_type: str,
    *,
    nlist: int | None = None,
    nprobe: int = DEFAULT_NPROBE,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 64,
    chunk_size: int | None = None,
    num_iters: int = 10,
    seed: int = 0,
    device: torch.device | str | None = None,
    cosine: bool = False,
    copy_weights: bool = True,
) -> ClassIndex:
    if backend == "faiss":
        return FaissIndex(index_type, nlist, nprobe, hnsw_m, hnsw_ef_search, seed, device, cosine=cosine)
    if index_type == "flat":
        return TorchExactIndex(chunk_size or DEFAULT_CHUNK_SIZE, device, cosine=cosine, copy_weights=copy_weights)
    return TorchIVFIndex(
        nlist,
        nprobe,
        num_iters,
        seed,
        chunk_size or DEFAULT_GATHER_ROWS,
        device,
        cosine=cosine,
        copy_weights=copy_weights,
    )


def make_index(
    backend: str = "auto",
    index_type: str = "auto",
    *,
    metric: str = "ip",
    nlist: int | None = None,
    nprobe: int = DEFAULT_NPROBE,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 64,
    chunk_size: int | None = None,
    num_iters: int = 10,
    seed: int = 0,
    exact_max_rows: int = EXACT_MAX_ROWS,
    device: torch.device | str | None = None,
    cosine: bool = False,
    copy_weights: bool = True,
) -> ClassIndex:
    """Make an (unbuilt) class index: ``backend`` "auto", "faiss" or "torch", ``index_type``
    "auto", "flat", "ivf" or "hnsw" (FAISS only), as ``head.index`` and ``head.index_type``.

    metric: only "ip"; for cosine, normalise queries and weights before calling, or pass
    ``cosine``. nlist defaults to ~4 sqrt(C_r); nprobe is clamped to nlist. chunk_size:
    weight rows per matmul (torch flat) or candidate rows gathered per pass (torch ivf).
    device: where the index lives; defaults to the device of the weights it is built
    from. cosine: rows are normalised when indexed and scored (queries must be normalised
    by the caller). copy_weights=False: the torch backends keep no copy of the weights (a
    25M x 512 shard is 25 GB), so every search must pass the current ones; FAISS keeps
    its own always.
    """
    if backend not in BACKENDS:
        raise ValueError(f"index backend must be one of {BACKENDS}, got {backend!r}")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    if backend == "torch" and index_type not in ("auto", *TORCH_TYPES):
        raise ValueError(
            f"index_type={index_type} needs the faiss backend (the torch backend has {', '.join(TORCH_TYPES)})"
        )
    if metric not in METRICS:
        raise ValueError(
            f"index metric must be one of {METRICS}, got {metric!r}; for cosine similarity "
            "pass normalised queries and weights to an inner-product index"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    options = dict(
        nlist=nlist,
        nprobe=nprobe,
        hnsw_m=hnsw_m,
        hnsw_ef_search=hnsw_ef_search,
        chunk_size=chunk_size,
        num_iters=num_iters,
        seed=seed,
        device=device,
        cosine=cosine,
        copy_weights=copy_weights,
    )
    if backend == "faiss":
        _import_faiss()  # name the install now, not at the first build
    if "auto" in (backend, index_type):
        return AutoIndex(backend, index_type, exact_max_rows, **options)
    return _make_backend(backend, index_type, **options)
