"""Active-class selection: which rows of its shard a rank scores in one step.

Pure tensor functions, no process groups. Each returns the sorted, unique LOCAL rows
(``class id - class_start``) of the shard ``[class_start, class_stop)`` that the loss will
run over; ``remap_labels`` then turns the labels into positions within those rows.

- ``random_active``: Partial FC. Every positive of the global batch owned by the shard,
  plus random negatives.
- ``knn_active``: the nearest-neighbour rows of each sample, plus the positives,
  optionally filled with random negatives up to the budget.

Random negatives come from a priority per class, a counter hash of (seed, step, global
class id): a class's priority is the same whichever rank owns it, so no random state is
stored or communicated. Two rules use it:

- a fractional budget ``p`` (a float) picks negative ``c`` iff ``u(c) < p``, with ``u``
  the priority as a uniform in (0, 1). Membership depends only on (seed, step, c, p), so
  the chosen global classes are exactly the same for every world size; the count per
  shard is random, about ``positives + p * (C_r - positives)``.
- an integer budget ``b`` per shard takes the ``b - positives`` non-positive classes of
  the shard with the lowest priorities: exactly ``b`` rows, but the set depends on how
  the classes are split.

Both rules order classes the same way (lowest ``u`` first), and priorities of distinct
classes never tie (the hash is a bijection of the class id), so results are deterministic.
"""

from __future__ import annotations

import math

import torch

from hydrahead.checks import check_int
from hydrahead.counter_rng import counter_hash, counter_uniform

__all__ = [
    "fill_offsets",
    "knn_active",
    "knn_fixed_rows",
    "owned_local_rows",
    "owned_positives",
    "random_active",
    "remap_labels",
    "resolve_budget",
    "without_own_label",
]

_SELECT_STREAM = 3000  # counter-hash stream reserved for class selection (head init is 1000)
_CHUNK = 1 << 18  # class ids hashed per pass on the CPU: bounds the temporaries for a 25M-class shard
_CUDA_CHUNK = 1 << 22  # on a GPU: ~100 MB of temporaries, few enough passes that launches do not dominate
_SIGN_BIT = -(1 << 63)
_FILL_STRIDE = 2_147_483_647  # a prime (2^31 - 1) above any shard size: (o + i * p) mod C_r visits distinct rows


def resolve_budget(budget: int | float, shard_size: int) -> int:
    """Active classes per shard as a count: an int >= 1 is a count, a float in (0, 1] a
    fraction of the shard (rounded up). Clamped to ``shard_size``."""
    check_int("shard_size", shard_size, minimum=1)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int or a float, got {type(budget).__name__}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:  # also rejects NaN
            raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
        return min(shard_size, max(1, math.ceil(budget * shard_size)))
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    return min(shard_size, budget)


def owned_positives(labels: torch.Tensor, class_start: int, class_stop: int, ignore_index: int = -100) -> torch.Tensor:
    """Sorted unique local rows of the labels that fall in ``[class_start, class_stop)``."""
    _check_labels(labels)
    _check_range(class_start, class_stop)
    return _unique_rows(owned_local_rows(labels, class_start, class_stop, ignore_index), class_stop - class_start)


def random_active(
    labels: torch.Tensor,
    class_start: int,
    class_stop: int,
    budget: int | float,
    *,
    seed: int,
    step: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Owned positives plus random negatives, as sorted unique local rows.

    ``budget`` as an int: exactly ``min(budget, C_r)`` rows, the negatives being the
    lowest-priority non-positive classes of the shard. As a float in (0, 1]: every
    negative whose priority is below ``budget`` (world-size independent, see the module
    docstring). Positives are always kept, even when they alone exceed the budget, so the
    returned count can exceed it.
    """
    _check_step(seed, step)
    positives = owned_positives(labels, class_start, class_stop, ignore_index)
    shard_size = class_stop - class_start
    resolve_budget(budget, shard_size)  # validates
    key = _step_key(seed, step)
    if isinstance(budget, float):
        chosen = _below_threshold(key, class_start, class_stop, budget, labels.device)
        return torch.unique(torch.cat((positives, chosen)), sorted=True)
    num_negatives = min(budget, shard_size) - positives.numel()
    return _fill_lowest(positives, num_negatives, key, class_start, class_stop)


def fill_offsets(
    rows: torch.Tensor, chosen: torch.Tensor, shard_size: int, draw_probability: float | None = None
) -> torch.Tensor:
    """Sampled softmax's correction for an active set filled with random rows: (len(rows),)
    float32, ``log(s)`` on the logits of the fill rows (those of ``rows`` not in ``chosen``,
    the rows picked for themselves: positives, knn's or graph's neighbours; repeats and -1
    allowed), 0 on the others. No host read.

    Each fill row stands for ``s`` rows of the shard outside ``chosen``: ``1 / p`` where each
    was drawn with a known probability ``draw_probability`` (random's fractional budget),
    else their number over the fill's. The softmax over the active set then estimates the
    one over the whole shard, as if each fill row were repeated ``s`` times. A small fill
    estimates it noisily: one fill row may stand for nearly the whole shard.
    """
    if draw_probability is not None and not (isinstance(draw_probability, float) and 0 < draw_probability <= 1):
        raise ValueError(f"draw_probability must be a float in (0, 1] or None, got {draw_probability!r}")
    fill = ~torch.isin(rows, chosen)
    if draw_probability is not None:
        return fill.to(torch.float32) * math.log(1.0 / draw_probability)
    # Counted on the device, no host read: wherever there is a fill, every chosen row lies
    # within ``rows`` (a trimmed knn union keeps fewer rows than it chose, and has no fill),
    # so the rows outside the active set number shard_size - (rows - fill). Not checked:
    # the selector's rows hold every row it chose unless it trimmed them.
    num_fill = fill.sum()
    stands_for = (shard_size - rows.numel() + num_fill).double() / num_fill.clamp_min(1)
    return torch.where(fill, stands_for.log().float(), 0.0)


def without_own_label(
    neighbour_rows: torch.Tensor,
    labels: torch.Tensor,
    class_start: int,
    class_stop: int,
    k: int,
    scores: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each sample's first ``k`` neighbour rows other than its own label's row, (B, k), and
    their ``scores`` (the search's, beside the rows) when given.

    ``neighbour_rows`` is (B, k') local rows in best-first order, k' >= k, -1 where the
    index found fewer. The shard that owns a label drops that row; the others keep their
    first k (-1 ends a row that had only k). Searching k + 1 and dropping the label makes
    the k rows the sample's hardest negatives: the positive is in the active set anyway,
    so a neighbour slot spent on it is lost.
    """
    _check_labels(labels)
    _check_range(class_start, class_stop)
    _check_neighbour_rows(neighbour_rows)
    check_int("k", k, minimum=0)
    if neighbour_rows.shape[0] != labels.shape[0] or neighbour_rows.shape[1] < k:
        raise ValueError(
            f"neighbour_rows {tuple(neighbour_rows.shape)} must have a row per label ({labels.shape[0]}) "
            f"and at least k = {k} columns"
        )
    local = labels.to(neighbour_rows.device).long() - class_start
    owned = (labels.to(local.device) != ignore_index) & (local >= 0) & (local < class_stop - class_start)
    local = torch.where(owned, local, torch.full_like(local, -2))  # -2 matches no row, not even -1
    is_label = neighbour_rows == local[:, None]
    # A stable sort moves the label's entry (at most one per sample) behind the others, in
    # order; it becomes -1 (not found), which shows only when the search returned just k.
    order = torch.argsort(is_label.to(torch.uint8), dim=1, stable=True)[:, :k]
    rows = neighbour_rows.masked_fill(is_label, -1).gather(1, order)
    if scores is None:
        return rows, None
    _check_scores(scores, neighbour_rows)
    return rows, scores.masked_fill(is_label, float("-inf")).gather(1, order)


def knn_active(
    neighbour_rows: torch.Tensor,
    labels: torch.Tensor,
    class_start: int,
    class_stop: int,
    budget: int | float | None = None,
    *,
    seed: int,
    step: int,
    ignore_index: int = -100,
    neighbour_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Union of the neighbours' local rows and the owned positives, as sorted unique rows.

    ``neighbour_rows`` is (B, k) local rows from the shard's index, -1 where the index
    found fewer than k. With a ``budget``, a union smaller than ``resolve_budget(budget)``
    is filled with the lowest-priority remaining classes; a larger union is kept whole,
    so the returned count (what the caller logs) can exceed the budget, unless
    ``neighbour_scores`` (B, k: the search's scores, higher is nearer) are given: then it
    is trimmed to the budget, keeping every positive and the other rows in neighbour rank
    order (every sample's first neighbour, then every second, ...; by score within a
    rank). The positives alone may still exceed it.
    """
    _check_step(seed, step)
    _check_labels(labels)
    _check_range(class_start, class_stop)
    shard_size = class_stop - class_start
    _check_neighbour_rows(neighbour_rows)
    owned = owned_local_rows(labels, class_start, class_stop, ignore_index).to(neighbour_rows.device)
    candidates = torch.cat((neighbour_rows.reshape(-1).long(), owned))
    union = _unique_rows(candidates, shard_size, "neighbour_rows must be local rows in [0, {shard_size}) or -1")
    if budget is None:
        return union
    size = resolve_budget(budget, shard_size)
    if neighbour_scores is not None:
        _check_scores(neighbour_scores, neighbour_rows)
        if union.numel() > size:
            return _nearest_within(neighbour_rows, neighbour_scores, _unique_rows(owned, shard_size), size)
    return _fill_lowest(union, size - union.numel(), _step_key(seed, step), class_start, class_stop)


def _nearest_within(
    neighbour_rows: torch.Tensor, neighbour_scores: torch.Tensor, positives: torch.Tensor, size: int
) -> torch.Tensor:
    """``positives`` plus ``size - len(positives)`` other neighbour rows, sorted: every
    sample's first neighbour before any sample's second, and so on; within one rank the
    higher score first (a row found twice counts at its best place). Ranking by score alone
    would let the samples with the highest scores (with inner products, the longest
    features) take every slot, and others lose even their hardest negative."""
    room = size - positives.numel()
    if room <= 0:
        return positives
    batch, k = neighbour_rows.shape
    rows = neighbour_rows.reshape(-1).long()
    scores = neighbour_scores.reshape(-1)
    ranks = torch.arange(k, device=rows.device).repeat(batch)
    candidate = (rows >= 0) & ~torch.isin(rows, positives)
    rows, scores, ranks = rows[candidate], scores[candidate], ranks[candidate]
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(ranks[by_score], stable=True)]  # rank first, score within a rank
    rows = rows[order]
    distinct, inverse = torch.unique(rows, return_inverse=True)
    places = torch.arange(rows.numel(), device=rows.device)
    first = torch.full((distinct.numel(),), rows.numel(), device=rows.device, dtype=torch.long)
    first.scatter_reduce_(0, inverse, places, "amin")  # each distinct row's best place
    chosen = rows[torch.sort(first).values[:room]]
    return torch.sort(torch.cat((positives, chosen))).values


def knn_fixed_rows(
    neighbour_rows: torch.Tensor,
    labels: torch.Tensor,
    class_start: int,
    class_stop: int,
    *,
    seed: int,
    step: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``knn_active``'s union filled to exactly B·(k+1) rows (the whole shard if smaller), sorted.

    The size is known before any device work, so unlike the union alone it needs no host
    read: the head's later steps can be queued while the GPU is still busy. The fill takes
    rows outside the union in the order ``(o + i·p) mod C_r`` (``p`` a prime above any shard
    size, ``o`` from (seed, step)): about 5% of the rows at k = 16 are such random
    negatives, which depend on the shard's split (as an integer budget's fill does).
    Neighbour rows outside [0, C_r) other than -1 are dropped, not reported: a check would
    be the host read this avoids.
    """
    _check_step(seed, step)
    _check_labels(labels)
    _check_range(class_start, class_stop)
    _check_neighbour_rows(neighbour_rows)
    shard_size = class_stop - class_start
    if shard_size >= _FILL_STRIDE:
        raise ValueError(f"knn_fixed_rows: shards of at most {_FILL_STRIDE - 1} rows, got {shard_size}")
    device = neighbour_rows.device
    size = min(shard_size, neighbour_rows.numel() + labels.numel())
    if size == shard_size:
        return torch.arange(shard_size, device=device)
    candidates = torch.cat(
        (neighbour_rows.reshape(-1).long(), owned_local_rows(labels, class_start, class_stop, ignore_index).to(device))
    )
    candidates = torch.where(
        (candidates >= 0) & (candidates < shard_size), candidates, shard_size
    )  # shard_size: no row
    ordered = torch.sort(candidates).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    in_union = first & (ordered < shard_size)  # each row of the union once
    union_size = in_union.sum()  # on the device: never read
    # 2 x size distinct candidates for the fill (at least size - union_size lie outside the union).
    offset = _step_key(seed, step) % shard_size
    fill = (offset + torch.arange(min(shard_size, 2 * size), device=device) * _FILL_STRIDE) % shard_size
    taken = ordered[torch.searchsorted(ordered, fill).clamp_(max=ordered.numel() - 1)] == fill
    free_rank = torch.cumsum(~taken, 0) - 1
    use = ~taken & (free_rank < size - union_size)
    # Scatter the union to [0, union_size) and the fill after it; everything else to a dump slot.
    slots = torch.cat(
        (torch.where(in_union, torch.cumsum(in_union, 0) - 1, size), torch.where(use, union_size + free_rank, size))
    )
    rows = torch.empty(size + 1, dtype=torch.long, device=device).scatter_(0, slots, torch.cat((ordered, fill)))
    return torch.sort(rows[:size]).values


def remap_labels(
    labels: torch.Tensor,
    active_rows: torch.Tensor,
    class_start: int,
    class_stop: int,
    ignore_index: int = -100,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Each owned label's position in ``active_rows`` (sorted local rows); -1 elsewhere.

    With ``check`` (one host read) raises ValueError if ``active_rows`` is not sorted and
    unique or an owned label is missing from it: its loss would otherwise be silently
    wrong. Without, a missing label also maps to -1 (no host sync): for rows that hold
    every owned label by construction, as the selections above return.
    """
    _check_labels(labels)
    _check_range(class_start, class_stop)
    if active_rows.dim() != 1 or active_rows.dtype not in _INT_DTYPES:
        raise ValueError(f"active_rows must be a 1-D integer tensor, got shape {tuple(active_rows.shape)}")
    active_rows = active_rows.long()
    local = labels.long() - class_start
    owned = (labels != ignore_index) & (local >= 0) & (local < class_stop - class_start)
    if active_rows.numel():
        positions = torch.searchsorted(active_rows, local).clamp_(max=active_rows.numel() - 1)
        found = owned & (active_rows[positions] == local)
    else:
        positions, found = torch.zeros_like(local), torch.zeros_like(owned)
    if check:
        unsorted = (active_rows[1:] <= active_rows[:-1]).any()
        unsorted, missing = torch.stack((unsorted, (owned & ~found).any())).tolist()
        if unsorted:
            raise ValueError("active_rows must be sorted and unique")
        if missing:
            ids = (local[owned & ~found] + class_start).unique()[:8].tolist()
            raise ValueError(f"owned labels missing from active_rows (class ids, first 8): {ids}")
    return torch.where(found, positions, -1)


# --- priorities ---------------------------------------------------------------------


def _step_key(seed: int, step: int) -> int:
    """A seed for this step's priorities: folding the step into the seed keeps class ids as
    the hash index, so no (step, class) packing can overflow int64."""
    h = counter_hash(seed, _SELECT_STREAM, torch.tensor([step], dtype=torch.int64))
    return int(h.item())


def _below_threshold(key: int, class_start: int, class_stop: int, fraction: float, device) -> torch.Tensor:
    """Local rows whose priority, as a uniform in (0, 1), is below ``fraction``."""
    chosen = []
    step = _chunk(device)
    for start in range(class_start, class_stop, step):
        ids = torch.arange(start, min(start + step, class_stop), device=device)
        chosen.append(ids[counter_uniform(key, _SELECT_STREAM, ids) < fraction] - class_start)
    return torch.cat(chosen)


def _fill_lowest(rows: torch.Tensor, count: int, key: int, class_start: int, class_stop: int) -> torch.Tensor:
    """``rows`` (sorted unique local rows) plus the ``count`` lowest-priority others, sorted.

    Streams over the shard in chunks keeping a running top-``count``: memory is
    O(chunk + count), whatever the shard size.
    """
    shard_size = class_stop - class_start
    count = min(count, shard_size - rows.numel())
    if count <= 0:
        return rows
    if count == shard_size - rows.numel():
        return torch.arange(shard_size, device=rows.device)
    # Chunks at least as long as the running top-count keep the total topk work O(C_r).
    chunk = max(_chunk(rows.device), count)
    best_rows = torch.empty(0, dtype=torch.long, device=rows.device)
    best_keys = torch.empty(0, dtype=torch.long, device=rows.device)
    for start in range(0, shard_size, chunk):
        stop = min(start + chunk, shard_size)
        local = torch.arange(start, stop, device=rows.device)
        keep = torch.ones(stop - start, dtype=torch.bool, device=rows.device)
        lo, hi = torch.searchsorted(rows, torch.tensor([start, stop], device=rows.device)).tolist()
        keep[rows[lo:hi] - start] = False  # already active: not a candidate
        local = local[keep]
        # Flipping the sign bit makes signed order the hash's unsigned order, which is the
        # order of counter_uniform: the integer rule extends the threshold rule.
        keys = counter_hash(key, _SELECT_STREAM, local + class_start).bitwise_xor_(_SIGN_BIT)
        cand_rows, cand_keys = torch.cat((best_rows, local)), torch.cat((best_keys, keys))
        if cand_keys.numel() > count:
            cand_keys, index = torch.topk(cand_keys, count, largest=False, sorted=False)
            cand_rows = cand_rows[index]
        best_rows, best_keys = cand_rows, cand_keys
    return torch.sort(torch.cat((rows, best_rows))).values


def owned_local_rows(labels: torch.Tensor, class_start: int, class_stop: int, ignore_index: int) -> torch.Tensor:
    """Each label's local row where the shard owns it, -1 elsewhere (no host sync)."""
    local = labels.long() - class_start
    owned = (labels != ignore_index) & (local >= 0) & (local < class_stop - class_start)
    return torch.where(owned, local, -1)


def _unique_rows(
    candidates: torch.Tensor, shard_size: int, range_error: str = "rows out of [0, {shard_size})"
) -> torch.Tensor:
    """Sorted unique rows of ``candidates`` with -1 (no row) dropped. Costs unique's host
    read and one more of its two ends, which also checks every row is -1 or in the shard."""
    union = torch.unique(candidates, sorted=True)
    if union.numel() == 0:
        return union
    lowest, highest = torch.stack(
        (union[0], union[-1])
    ).tolist()  # one read (a list index would copy it to the device first)
    if lowest < -1 or highest >= shard_size:
        raise ValueError(range_error.format(shard_size=shard_size))
    return union[1:] if lowest == -1 else union


def _chunk(device) -> int:
    return _CUDA_CHUNK if torch.device(device).type == "cuda" else _CHUNK


# --- validation ---------------------------------------------------------------------

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_range(class_start: int, class_stop: int) -> None:
    check_int("class_start", class_start, minimum=0)
    check_int("class_stop", class_stop, minimum=class_start + 1)


def _check_neighbour_rows(neighbour_rows: torch.Tensor) -> None:
    if neighbour_rows.dim() != 2 or neighbour_rows.dtype not in _INT_DTYPES:
        raise ValueError(
            f"neighbour_rows must be a 2-D integer tensor (batch, k), got shape "
            f"{tuple(neighbour_rows.shape)} and dtype {neighbour_rows.dtype}"
        )


def _check_scores(scores: torch.Tensor, neighbour_rows: torch.Tensor) -> None:
    if scores.shape != neighbour_rows.shape or not scores.is_floating_point():
        raise ValueError(
            f"neighbour scores must be a floating tensor shaped as the rows {tuple(neighbour_rows.shape)}, "
            f"got {tuple(scores.shape)} {scores.dtype}"
        )


def _check_labels(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype not in _INT_DTYPES:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else None
        dtype = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {shape} and dtype {dtype}")


def _check_step(seed: int, step: int) -> None:
    check_int("seed", seed, minimum=-(1 << 63))
    check_int("step", step, minimum=0)
