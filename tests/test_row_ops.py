"""The per-row kernels around the head's passes (``hydrahead.kernels.row_ops``) against their
torch forms, on fresh random batches: odd sizes, batches longer than one loop step, ignored
labels, labels of other shards, no valid row at all; and the step's verdict (the loss not finite,
or its checks failed) that the update kernels read."""

from __future__ import annotations

import pytest
import torch

from hydrahead.kernels import row_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [1, 37, row_ops.BLOCK_ROWS + 5]  # the last takes two loop steps


def _labels(num_rows: int, seed: int, ignore_index: int = -100) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 500, (num_rows,), generator=gen)
    labels[torch.rand(num_rows, generator=gen) < 0.2] = ignore_index
    return labels.to(DEVICE)


@pytest.mark.parametrize("num_rows", SIZES)
@pytest.mark.parametrize("class_start, num_local", [(0, 500), (120, 200), (480, 7), (600, 50)])
def test_label_rows_equal_their_torch_form(num_rows, class_start, num_local):
    labels = _labels(num_rows, seed=num_rows + class_start)
    got = row_ops.label_rows(labels, -100, class_start, num_local)
    want = row_ops.label_rows_reference(labels, -100, class_start, num_local)
    for name, g, w in zip(("valid", "local", "owned", "local_label", "owned_count"), got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), name
    if num_rows > 100 and class_start < 500:  # a shard that owns some of the labels: not all masks empty
        assert float(got[4]) > 0


def test_label_rows_take_a_positive_ignore_index_and_int32_labels():
    labels = _labels(300, seed=3, ignore_index=7).int()
    got = row_ops.label_rows(labels, 7, 5, 100)
    want = row_ops.label_rows_reference(labels, 7, 5, 100)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def _sums(num_rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    row_max = torch.randn(num_rows, generator=gen, dtype=torch.float64) * 4
    row_sum = torch.rand(num_rows, generator=gen, dtype=torch.float64) * 100 + 1
    target = torch.randn(num_rows, generator=gen, dtype=torch.float64) * 3
    valid = torch.rand(num_rows, generator=gen) < 0.8
    return row_max, row_sum, target, valid


@pytest.mark.parametrize("num_rows", SIZES)
@pytest.mark.parametrize("from_sums", [True, False])
@pytest.mark.parametrize("error_on_device", [True, False])
def test_loss_rows_equal_float64_torch(num_rows, from_sums, error_on_device):
    """The kernel in float32 against the torch form in float64: lse and the loss to float32's
    rounding, the count, masks and checks exactly."""
    row_max, row_sum, target, valid = _sums(num_rows, seed=num_rows)
    owned = torch.tensor(float(num_rows // 3))
    error = torch.tensor(2.0) if error_on_device else 1
    lse64 = row_max + torch.log(row_sum)
    want = row_ops.loss_rows_reference(
        *((row_max, row_sum, None) if from_sums else (None, None, lse64)), target, valid, owned.double(), error
    )

    def on_device(x):
        return x.to(DEVICE, torch.float32) if isinstance(x, torch.Tensor) else x

    inputs = (row_max, row_sum, None) if from_sums else (None, None, lse64)
    got = row_ops.loss_rows(
        *(on_device(x) for x in inputs), on_device(target), valid.to(DEVICE), on_device(owned), on_device(error)
    )
    lse, loss, num_valid, lse_valid, checks, skip = (x.cpu() for x in got)
    assert lse.dtype == lse_valid.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), want[1], rtol=1e-5, atol=1e-6)
    assert num_valid.dtype == torch.int64 and int(num_valid) == int(want[2])
    assert torch.equal(torch.isinf(lse_valid), ~valid)
    torch.testing.assert_close(lse_valid[valid].double(), want[3][valid], rtol=1e-6, atol=1e-6)
    assert checks.dtype == torch.float64 and checks.tolist() == want[4].tolist()
    assert skip.dtype == torch.int32 and int(skip) == int(want[5]) == 1  # the error code fails the checks


def test_loss_rows_with_no_valid_row_give_a_zero_loss():
    row_max, row_sum, target, _ = _sums(50, seed=1)
    valid = torch.zeros(50, dtype=torch.bool)
    args = [x.float().to(DEVICE) for x in (row_max, row_sum)]
    _, loss, num_valid, lse_valid, checks, skip = row_ops.loss_rows(
        *args, None, target.float().to(DEVICE), valid.to(DEVICE), torch.zeros((), device=DEVICE), 0
    )
    assert float(loss) == 0.0 and int(num_valid) == 0
    assert bool(torch.isinf(lse_valid).all()) and checks.tolist() == [0.0, 0.0, 0.0]
    assert int(skip) == 0  # nothing to learn from, but nothing wrong: the step lands


@pytest.mark.parametrize("from_sums", [True, False])
@pytest.mark.parametrize(
    "case, want_skip",
    [
        ("sound", 0),
        ("error on the host", 1),
        ("error on the device", 1),
        ("a label no shard owns", 1),
        ("owned off by less than a half", 0),
        ("a NaN row", 1),
        ("an infinite lse", 1),
        ("a NaN row that is ignored", 1),  # its P would be NaN, and dW with it
        ("owned is NaN", 1),
    ],
)
def test_loss_rows_verdict_follows_the_checks_and_the_loss(from_sums, case, want_skip):
    """skip = 1 exactly where MergeChecks would raise or the loss is not finite; the kernel
    and its torch form agree on each case."""
    num_rows = 70
    row_max, row_sum, target, valid = _sums(num_rows, seed=11)
    valid[:6] = True
    num_valid = int(valid.sum())
    owned, error = torch.tensor(float(num_valid)), 0
    if case == "error on the host":
        error = 3
    elif case == "error on the device":
        error = torch.tensor(4.0)
    elif case == "a label no shard owns":
        owned = owned - 1
    elif case == "owned off by less than a half":  # a float32 sum of counts, read as MergeChecks rounds it
        owned = owned + 0.25
    elif case == "a NaN row":
        row_max[1] = float("nan")
    elif case == "an infinite lse":
        row_sum[2] = float("inf")
    elif case == "owned is NaN":  # what the host's round() would refuse
        owned = owned * float("nan")
    elif case == "a NaN row that is ignored":
        row_max[5], valid[5], owned = float("nan"), False, owned - 1
    lse64 = row_max + torch.log(row_sum)
    inputs = (row_max, row_sum, None) if from_sums else (None, None, lse64)
    want = row_ops.loss_rows_reference(*inputs, target, valid, owned.double(), error)

    def on_device(x):
        return x.to(DEVICE, torch.float32) if isinstance(x, torch.Tensor) else x

    got = row_ops.loss_rows(
        *(on_device(x) for x in inputs), on_device(target), valid.to(DEVICE), on_device(owned), on_device(error)
    )
    assert int(got[5]) == int(want[5]) == want_skip, case
