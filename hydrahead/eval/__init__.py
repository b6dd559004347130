"""Evaluation: metrics of top-k predictions (hydrahead.eval.metrics); the prediction tool is
``python -m hydrahead.tools.predict``."""

from hydrahead.eval.metrics import (
    SAMPLES,
    WITHOUT_POSITIVES,
    add_sums,
    means,
    multi_label_sums,
    ndcg_at_k,
    num_positives,
    precision_at_k,
    single_label_sums,
    topk_hits,
)

__all__ = [
    "SAMPLES",
    "WITHOUT_POSITIVES",
    "add_sums",
    "means",
    "multi_label_sums",
    "ndcg_at_k",
    "num_positives",
    "precision_at_k",
    "single_label_sums",
    "topk_hits",
]
