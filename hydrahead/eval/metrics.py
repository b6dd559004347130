"""Evaluation metrics of top-k predictions: pure torch, no collectives.

Predictions are class ids, best first, one row per sample (``pred_ids``, N x k, distinct
ids within a row, as ``ShardedClassifier.predict`` returns them).

Single-label data (``labels``, N): top-k accuracy, the share of samples whose label is
among their first k predictions.

Multi-label data (``positives``, N x L int, each row the sample's positive class ids
padded with -1; L is the largest number of positives of any sample): the usual
extreme-classification metrics, with rel_i = 1 when the i-th prediction is a positive:

    P@k    = |top-k predictions ∩ positives| / k
    DCG@k  = sum_{i<k} rel_i / log2(i + 2)
    IDCG@k = sum_{i<min(k, |positives|)} 1 / log2(i + 2)    (the DCG of a perfect ranking)
    nDCG@k = DCG@k / IDCG@k

A sample without positives scores 0 in P@k and nDCG@k and still counts in the mean, as
pyxclib (the usual evaluation code for the Extreme Classification Repository's data sets)
averages: published numbers compare. How many such samples there were is returned beside
the sums (``samples_without_positives``), so a reader can tell. A positive listed twice
counts once.

Distributed evaluation: every ``*_sums`` function returns per-metric sums and the sample
count as float64 scalars in a dict; ranks add the dicts of their own samples
(``add_sums``), stack the values for one all-reduce, and ``means`` turns the totals into
means. Sums of 0/1 hits are exact in float64 up to 2^53 samples.
"""

from __future__ import annotations

import torch

SAMPLES = "samples"  # the count every mean divides by
WITHOUT_POSITIVES = "samples_without_positives"
_COUNTS = (SAMPLES, WITHOUT_POSITIVES)


def _check_predictions(pred_ids: torch.Tensor, k: int) -> None:
    if pred_ids.dim() != 2:
        raise ValueError(f"pred_ids must be N x k class ids, got shape {tuple(pred_ids.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= pred_ids.shape[1]:
        raise ValueError(f"k must be an int in [1, {pred_ids.shape[1]}] (the predictions per sample), got {k!r}")


def _check_rows(name: str, value: torch.Tensor, dims: int, pred_ids: torch.Tensor) -> None:
    if value.dim() != dims or value.shape[0] != pred_ids.shape[0]:
        want = "(N,)" if dims == 1 else "N x L"
        raise ValueError(
            f"{name} must be {want} with N={pred_ids.shape[0]} rows like pred_ids, got shape {tuple(value.shape)}"
        )


def topk_hits(pred_ids: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Whether each sample's label is among its first ``k`` predictions (bool, N)."""
    _check_predictions(pred_ids, k)
    _check_rows("labels", labels, 1, pred_ids)
    return (pred_ids[:, :k] == labels[:, None]).any(dim=1)


def _relevance(pred_ids: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """rel[i, j]: the j-th prediction of sample i is one of its positives (float64, N x k)."""
    _check_predictions(pred_ids, k)
    _check_rows("positives", positives, 2, pred_ids)
    # N x k x L comparisons; the -1 padding never equals a class id.
    return (pred_ids[:, :k, None] == positives[:, None, :]).any(dim=2).double()


def num_positives(positives: torch.Tensor) -> torch.Tensor:
    """Distinct positive class ids of each row of a -1-padded N x L tensor (int64, N)."""
    if positives.dim() != 2:
        raise ValueError(f"positives must be N x L class ids padded with -1, got shape {tuple(positives.shape)}")
    ordered = positives.sort(dim=1).values
    distinct = ordered >= 0
    distinct[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    return distinct.sum(dim=1)


def _discounts(k: int, device) -> torch.Tensor:
    """1 / log2(i + 2) for ranks i = 0 .. k-1 (float64)."""
    return 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=device) + 2)


def precision_at_k(pred_ids: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """P@k of each sample: positives among the first ``k`` predictions, divided by k (float64, N)."""
    return _relevance(pred_ids, positives, k).sum(dim=1) / k


def ndcg_at_k(pred_ids: torch.Tensor, positives: torch.Tensor, k: int) -> torch.Tensor:
    """nDCG@k of each sample (float64, N); 0 for a sample without positives (module doc)."""
    relevance = _relevance(pred_ids, positives, k)
    discounts = _discounts(k, pred_ids.device)
    dcg = relevance @ discounts
    ideal_hits = num_positives(positives).clamp(max=k)
    # IDCG of a sample with n >= 1 positives: the sum of the first min(k, n) discounts. Without
    # positives the DCG is 0; dividing it by 1 keeps the 0.
    idcg = torch.cat([discounts.new_ones(1), discounts.cumsum(0)])[ideal_hits]
    return dcg / idcg


def _count(pred_ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(pred_ids.shape[0]), dtype=torch.float64, device=pred_ids.device)


def single_label_sums(pred_ids: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, torch.Tensor]:
    """``{"samples": N, "top1": hits at 1, "top5": ...}`` (float64 scalars) for each k of ``ks``."""
    sums = {SAMPLES: _count(pred_ids)}
    for k in ks:
        sums[f"top{k}"] = topk_hits(pred_ids, labels, k).sum(dtype=torch.float64)
    return sums


def multi_label_sums(pred_ids: torch.Tensor, positives: torch.Tensor, ks=(1, 3, 5)) -> dict[str, torch.Tensor]:
    """``{"samples": N, "samples_without_positives": ..., "P@k": sum, ..., "nDCG@k": sum, ...}``
    (float64 scalars) for each k of ``ks``; ``positives`` is N x L, padded with -1."""
    sums = {SAMPLES: _count(pred_ids), WITHOUT_POSITIVES: (num_positives(positives) == 0).sum(dtype=torch.float64)}
    for k in ks:
        sums[f"P@{k}"] = precision_at_k(pred_ids, positives, k).sum()
    for k in ks:
        sums[f"nDCG@{k}"] = ndcg_at_k(pred_ids, positives, k).sum()
    return sums


def add_sums(total: dict[str, torch.Tensor] | None, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``total + sums`` key by key (``total=None`` starts a running total)."""
    if total is None:
        return dict(sums)
    if total.keys() != sums.keys():
        raise ValueError(f"cannot add metric sums with keys {sorted(sums)} to a total with keys {sorted(total)}")
    return {name: total[name] + value for name, value in sums.items()}


def means(sums: dict[str, torch.Tensor | float]) -> dict[str, float | int]:
    """Each metric's sum divided by the sample count; the counts themselves as ints."""
    count = float(sums[SAMPLES])
    if count <= 0:
        raise ValueError("no samples: the metric means are undefined")
    return {name: int(float(value)) if name in _COUNTS else float(value) / count for name, value in sums.items()}
