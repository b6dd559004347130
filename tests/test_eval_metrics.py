"""Evaluation metrics (top-k accuracy, P@k, nDCG@k) and the extreme-classification text reader."""

from __future__ import annotations

import math

import pytest
import torch

from hydrahead.data.xc_text import read_xc_text
from hydrahead.eval.metrics import (
    add_sums,
    means,
    multi_label_sums,
    ndcg_at_k,
    num_positives,
    precision_at_k,
    single_label_sums,
    topk_hits,
)

# ---------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------

# Four samples, five predictions each, positives padded with -1.
PRED_IDS = torch.tensor(
    [
        [3, 1, 4, 5, 9],  # positives {1, 9, 7}: hits at ranks 1 and 4 (0-based)
        [2, 0, 6, 8, 1],  # positives {2}: a hit at rank 0
        [0, 1, 2, 3, 4],  # no positives
        [0, 5, 4, 8, 2],  # positives {4, 0} (4 listed twice): hits at ranks 0 and 2
    ]
)
POSITIVES = torch.tensor(
    [
        [1, 9, 7, -1],
        [2, -1, -1, -1],
        [-1, -1, -1, -1],
        [4, 4, 0, -1],
    ]
)
# P@k = hits among the first k / k
#   sample 0: P@1 = 0/1, P@3 = 1/3, P@5 = 2/5
#   sample 1: P@1 = 1/1, P@3 = 1/3, P@5 = 1/5
#   sample 2: 0 everywhere (no positives)
#   sample 3: P@1 = 1/1, P@3 = 2/3, P@5 = 2/5
PRECISION = {1: [0.0, 1.0, 0.0, 1.0], 3: [1 / 3, 1 / 3, 0.0, 2 / 3], 5: [0.4, 0.2, 0.0, 0.4]}
# Discounts 1/log2(i + 2): rank 0 -> 1, rank 1 -> 1/log2(3) = 0.6309297535714575,
# rank 2 -> 1/log2(4) = 0.5, rank 3 -> 1/log2(5), rank 4 -> 1/log2(6) = 0.38685280723454163.
#   sample 0: DCG@1 = 0, DCG@3 = 0.6309297535714575,
#             DCG@5 = 0.6309297535714575 + 0.38685280723454163 = 1.0177825608059992
#             3 positives: IDCG@1 = 1, IDCG@3 = IDCG@5 = 1 + 0.6309297535714575 + 0.5 = 2.1309297535714578
#             nDCG@3 = 0.6309297535714575 / 2.1309297535714578 = 0.2960819109658652
#             nDCG@5 = 1.0177825608059992 / 2.1309297535714578 = 0.4776237035032179
#   sample 1: DCG = IDCG = 1 at every k (1 positive, found first): nDCG = 1
#   sample 2: 0 (no positives; counted in the mean)
#   sample 3: DCG@1 = 1, DCG@3 = DCG@5 = 1 + 0.5 = 1.5
#             2 distinct positives: IDCG@1 = 1, IDCG@3 = IDCG@5 = 1 + 0.6309297535714575 = 1.6309297535714575
#             nDCG@3 = nDCG@5 = 1.5 / 1.6309297535714575 = 0.9197207891481876
NDCG = {
    1: [0.0, 1.0, 0.0, 1.0],
    3: [0.2960819109658652, 1.0, 0.0, 0.9197207891481876],
    5: [0.4776237035032179, 1.0, 0.0, 0.9197207891481876],
}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_and_ndcg_by_hand(k):
    assert precision_at_k(PRED_IDS, POSITIVES, k).tolist() == pytest.approx(PRECISION[k], abs=1e-15)
    assert ndcg_at_k(PRED_IDS, POSITIVES, k).tolist() == pytest.approx(NDCG[k], abs=1e-15)
    assert ndcg_at_k(PRED_IDS, POSITIVES, k).dtype == torch.float64


def test_multi_label_sums_and_means_by_hand():
    sums = multi_label_sums(PRED_IDS, POSITIVES)
    assert list(sums) == ["samples", "samples_without_positives", "P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5"]
    assert all(value.dtype == torch.float64 and value.dim() == 0 for value in sums.values())
    result = means(sums)
    assert result["samples"] == 4 and result["samples_without_positives"] == 1
    # P@3 = (1/3 + 1/3 + 0 + 2/3) / 4 = 1/3; nDCG@5 = (0.4776237035032179 + 1 + 0 + 0.9197207891481876) / 4
    assert (
        result["P@1"] == pytest.approx(0.5)
        and result["P@3"] == pytest.approx(1 / 3)
        and result["P@5"] == pytest.approx(0.25)
    )
    assert result["nDCG@5"] == pytest.approx((0.4776237035032179 + 1 + 0.9197207891481876) / 4)


def test_num_positives_counts_distinct_ids():
    assert num_positives(POSITIVES).tolist() == [3, 1, 0, 2]
    assert num_positives(torch.empty((3, 0), dtype=torch.long)).tolist() == [0, 0, 0]


def test_topk_accuracy_by_hand():
    labels = torch.tensor([1, 2, 7, 2])
    # sample 0: label 1 at rank 1 (top-5 only); 1: label 2 at rank 0; 2: label 7 absent; 3: label 2 at rank 4
    assert topk_hits(PRED_IDS, labels, 1).tolist() == [False, True, False, False]
    assert topk_hits(PRED_IDS, labels, 5).tolist() == [True, True, False, True]
    sums = single_label_sums(PRED_IDS, labels)
    assert {name: float(value) for name, value in sums.items()} == {"samples": 4.0, "top1": 1.0, "top5": 3.0}
    assert means(sums) == {"samples": 4, "top1": 0.25, "top5": 0.75}


def test_sums_add_over_parts_like_one_batch():
    whole = multi_label_sums(PRED_IDS, POSITIVES)
    total = None
    for rows in (slice(0, 1), slice(1, 1), slice(1, 4)):  # an empty part as a rank without samples has
        total = add_sums(total, multi_label_sums(PRED_IDS[rows], POSITIVES[rows]))
    assert total.keys() == whole.keys()
    for name in whole:
        assert float(total[name]) == pytest.approx(float(whole[name]), abs=1e-15), name
    with pytest.raises(ValueError, match="keys"):
        add_sums(total, single_label_sums(PRED_IDS, POSITIVES[:, 0]))


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(PRED_IDS, POSITIVES, 6)
    with pytest.raises(ValueError, match="k must be"):
        topk_hits(PRED_IDS, POSITIVES[:, 0], 0)
    with pytest.raises(ValueError, match="positives must be"):
        ndcg_at_k(PRED_IDS, POSITIVES[:3], 1)
    with pytest.raises(ValueError, match="labels must be"):
        topk_hits(PRED_IDS, POSITIVES, 1)
    with pytest.raises(ValueError, match="pred_ids must be"):
        topk_hits(PRED_IDS[0], POSITIVES[:, 0], 1)
    with pytest.raises(ValueError, match="no samples"):
        means(single_label_sums(PRED_IDS[:0], POSITIVES[:0, 0]))


# ---------------------------------------------------------------------------------------
# Property test: the vectorised metrics against a plain loop over samples
# ---------------------------------------------------------------------------------------


def loop_reference(pred_ids: list[int], positives: list[int], k: int) -> tuple[float, float]:
    """P@k and nDCG@k of one sample, straight from the definitions."""
    relevant = {label for label in positives if label >= 0}
    hits = [1.0 if label in relevant else 0.0 for label in pred_ids[:k]]
    dcg = sum(hit / math.log2(rank + 2) for rank, hit in enumerate(hits))
    idcg = sum(1 / math.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return sum(hits) / k, dcg / idcg if relevant else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_a_python_loop_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    num_samples, num_classes, width, max_positives = 200, 12, 7, 6
    pred_ids = torch.stack([torch.randperm(num_classes, generator=gen)[:width] for _ in range(num_samples)])
    positives = torch.randint(0, num_classes, (num_samples, max_positives), generator=gen)  # duplicates happen
    padding = torch.arange(max_positives) >= torch.randint(0, max_positives + 1, (num_samples, 1), generator=gen)
    positives[padding] = -1  # 0 .. max_positives entries per sample, some samples without any
    labels = torch.randint(0, num_classes, (num_samples,), generator=gen)
    assert (~padding).sum(dim=1).eq(0).any() and (~padding).sum(dim=1).eq(max_positives).any()
    for k in range(1, width + 1):
        expected = [loop_reference(p, q, k) for p, q in zip(pred_ids.tolist(), positives.tolist())]
        precision = torch.tensor([p for p, _ in expected], dtype=torch.float64)
        ndcg = torch.tensor([n for _, n in expected], dtype=torch.float64)
        torch.testing.assert_close(precision_at_k(pred_ids, positives, k), precision, rtol=0, atol=1e-12)
        torch.testing.assert_close(ndcg_at_k(pred_ids, positives, k), ndcg, rtol=0, atol=1e-12)
        hits = torch.tensor([label in row[:k] for label, row in zip(labels.tolist(), pred_ids.tolist())])
        assert torch.equal(topk_hits(pred_ids, labels, k), hits)
        sums = multi_label_sums(pred_ids, positives, ks=(k,))
        assert float(sums[f"nDCG@{k}"]) == pytest.approx(float(ndcg.sum()), abs=1e-9)
        assert float(sums["samples_without_positives"]) == sum(1 for row in positives.tolist() if max(row) < 0)


# ---------------------------------------------------------------------------------------
# The extreme-classification text reader
# ---------------------------------------------------------------------------------------

XC_FILE = """\
4 6 10
0,7 0:1.5 4:-0.25
 2:1.0
3
5,1,5 5:2e-3 1:0.5
"""


def write(tmp_path, text: str, name: str = "data.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_header_labels_and_sparse_features(tmp_path):
    data = read_xc_text(write(tmp_path, XC_FILE))
    assert (data.num_samples, data.num_features, data.num_labels) == (4, 6, 10)
    expected = torch.zeros(4, 6)
    expected[0, 0], expected[0, 4] = 1.5, -0.25
    expected[1, 2] = 1.0  # the line starts with the space: no labels
    expected[3, 5], expected[3, 1] = 2e-3, 0.5
    assert data.features.dtype == torch.float32 and torch.equal(data.features, expected)
    # Labels in file order, padded with -1; a label listed twice is kept once.
    assert data.labels.tolist() == [[0, 7], [-1, -1], [3, -1], [5, 1]]
    assert num_positives(data.labels).tolist() == [2, 0, 1, 2]


def test_without_header_the_width_is_given_or_inferred(tmp_path):
    path = write(tmp_path, "\n".join(XC_FILE.splitlines()[1:]) + "\n")
    inferred = read_xc_text(path)
    assert inferred.features.shape == (4, 6) and inferred.num_labels is None  # largest index 5
    wide = read_xc_text(path, num_features=9, num_labels=8)
    assert wide.features.shape == (4, 9) and torch.equal(wide.features[:, :6], inferred.features)
    assert torch.equal(wide.labels, inferred.labels)
    crlf = read_xc_text(write(tmp_path, XC_FILE.replace("\n", "\r\n"), "crlf.txt"))
    assert torch.equal(crlf.features, read_xc_text(write(tmp_path, XC_FILE)).features)


def test_no_labels_anywhere_gives_zero_width_labels(tmp_path):
    data = read_xc_text(write(tmp_path, "2 3 5\n 0:1\n 2:2\n"))
    assert data.labels.shape == (2, 0) and data.features.tolist() == [[1, 0, 0], [0, 0, 2]]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("2 6 10\n0 0:1\n1 x:2\n", 3, "bad feature index 'x'"),
        ("2 6 10\n0 0:1\n1 3:abc\n", 3, "bad feature value in '3:abc'"),
        ("2 6 10\n0 0:1\n1 3:nan\n", 3, "not a finite float32"),
        ("2 6 10\n0 0:1\n1 3:1e39\n", 3, "not a finite float32"),
        ("2 6 10\n0 0:1 oops\n1 3:1\n", 2, "bad token 'oops'"),
        ("2 6 10\n0 6:1\n1 3:1\n", 2, "feature index 6 is out of range: num_features=6"),
        ("2 6 10\n0 1:1 1:2\n1 3:1\n", 2, "feature index 1 appears twice"),
        ("2 6 10\n0,10 0:1\n1 3:1\n", 2, "label id 10 is out of range: num_labels=10"),
        ("2 6 10\n0,-1 0:1\n1 3:1\n", 2, "bad label id '-1'"),
        ("2 6 10\n0,,1 0:1\n1 3:1\n", 2, "bad label id ''"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=f"{path}:{line}: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        read_xc_text(path)


def test_header_disagreements_are_errors(tmp_path):
    path = write(tmp_path, "3 6 10\n0 0:1\n1 3:1\n")
    with pytest.raises(ValueError, match=f"{path}: the header says 3 samples, but 2 lines follow it"):
        read_xc_text(path)
    path = write(tmp_path, XC_FILE)
    with pytest.raises(ValueError, match="the header says num_features=6, but num_features=16 is expected"):
        read_xc_text(path, num_features=16)
    with pytest.raises(ValueError, match="the header says num_labels=10, but num_labels=11 is expected"):
        read_xc_text(path, num_labels=11)
    with pytest.raises(ValueError, match="num_features must be None or a positive int"):
        read_xc_text(path, num_features=0)
