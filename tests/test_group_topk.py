"""The list-grouped search kernel (kernels/group_topk.py) against its float64 torch reference,
under the Triton interpreter on CPU (fp32) and on the GPU (tests/test_kernels_gpu.py: bf16)."""

from __future__ import annotations

import pytest
import torch

from hydrahead.kernels.group_topk import KEEP, group_topk, group_topk_reference, query_tiles


def _lists(num_rows: int, lengths: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A list table (nlist, widest) of distinct rows padded with -1, and its lengths."""
    rows = torch.randperm(num_rows, generator=gen)[: sum(lengths)]
    table = torch.full((len(lengths), max(lengths)), -1, dtype=torch.int32)
    start = 0
    for lst, length in enumerate(lengths):
        table[lst, :length] = rows[start : start + length].int()
        start += length
    return table, torch.tensor(lengths)


def test_query_tiles_cut_each_group_into_tiles_of_its_own_queries():
    groups, starts, stops = query_tiles([5, 0, 3, 16], 4, "cpu")
    assert groups.tolist() == [0, 0, 2, 3, 3, 3, 3]
    assert starts.tolist() == [0, 4, 5, 8, 12, 16, 20]
    assert stops.tolist() == [4, 5, 8, 12, 16, 20, 24]


@pytest.mark.parametrize("cosine", [True, False])
def test_group_topk_keeps_each_querys_best_rows_of_its_neighbourhood(cosine):
    """Groups over several lists, a list longer than one block of rows, a neighbourhood
    with fewer rows than k (-1 and -inf after them) and one with no list at all; rows of
    unequal norms, so that cosine and inner-product rankings differ."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(120, 64, generator=gen) * torch.rand(120, 1, generator=gen).add(0.2)
    table, lengths = _lists(120, [40, 9, 23, 30], gen)
    hoods = torch.tensor([[0, 1], [1, -1], [2, 3], [-1, -1]])
    counts = [19, 6, 5, 2]
    queries = torch.randn(sum(counts), 64, generator=gen)
    if cosine:
        queries = torch.nn.functional.normalize(queries, dim=1)
    scores, rows = group_topk(queries, weight, table, lengths, hoods, counts, 17, cosine=cosine, block_queries=16)
    want_scores, want_rows = group_topk_reference(queries, weight, table, lengths, hoods, counts, 17, cosine=cosine)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(scores.double(), want_scores, rtol=1e-5, atol=1e-5)
    assert (rows[19:25, 9:] == -1).all() and (rows[30:] == -1).all()  # 9 rows in list 1; no list at all


def test_group_topk_refuses_what_it_cannot_keep():
    weight, queries = torch.randn(10, 64), torch.randn(3, 64)
    table, lengths, hoods = torch.arange(10).reshape(1, 10).int(), torch.tensor([10]), torch.tensor([[0]])
    with pytest.raises(ValueError, match="at most"):
        group_topk(queries, weight, table, lengths, hoods, [3], KEEP + 1, cosine=False)
    with pytest.raises(ValueError, match="counts"):
        group_topk(queries, weight, table, lengths, hoods, [2], 5, cosine=False)
    with pytest.raises(ValueError, match="multiple of"):
        group_topk(queries[:, :48], weight[:, :48], table, lengths, hoods, [3], 5, cosine=False)
