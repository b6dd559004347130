"""The per-row arithmetic around the head's passes, one launch each.

Before the LSE pass the labels become this shard's local labels and masks; after it (and
after the merge, with several ranks) the rows' log-sum-exp becomes the mean loss, the
valid count, the log-sum-exp the backward reads (+inf on ignored rows) and the merge
checks' values. In torch each of those is a string of small ops: about twenty launches a
step, each a few microseconds of GPU time and, in an eager step, several more of the host's
while the GPU waits (docs/kernels.md, "Where the small step's GPU idles, traced"). Here
each side is one program looping over the batch, so a sum comes out in the same order on
every call.

    label_rows   labels -> valid, local label, owned, the kernels' label (-1 where not
                 owned), owned count
    loss_rows    (max, sum of exp) or lse, target logit, valid -> lse, loss, valid count,
                 lse with +inf on ignored rows, the checks' (error, owned, valid) values,
                 and the step's verdict: 1 where the loss or a row's lse is not finite or
                 the checks fail (the update kernels read it and leave the rows as they are)

Each has its torch form beside it (``*_reference``), which the tests hold it to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 1024  # rows a loop step takes: one program walks the batch


@triton.jit(do_not_specialize=["num_rows", "ignore_index", "class_start", "num_local"])
def _label_rows_kernel(
    LABELS,
    VALID,
    LOCAL,
    OWNED,
    LOCAL_LABEL,
    OWNED_COUNT,
    num_rows,
    ignore_index,
    class_start,
    num_local,
    BLOCK: tl.constexpr,
):
    owned_count = tl.zeros([BLOCK], tl.int32)
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        in_batch = rows < num_rows
        label = tl.load(LABELS + rows, mask=in_batch, other=0)
        valid = label != ignore_index
        local = label - class_start
        owned = valid & (local >= 0) & (local < num_local)
        tl.store(VALID + rows, valid, mask=in_batch)
        tl.store(LOCAL + rows, local, mask=in_batch)
        tl.store(OWNED + rows, owned, mask=in_batch)
        tl.store(LOCAL_LABEL + rows, tl.where(owned, local, -1), mask=in_batch)
        owned_count += (owned & in_batch).to(tl.int32)
    tl.store(OWNED_COUNT, tl.sum(owned_count, axis=0).to(tl.float32))


def label_rows(labels: torch.Tensor, ignore_index: int, class_start: int, num_local: int):
    """(valid, local, owned, local_label, owned_count) of int64 ``labels``: valid where the
    label is not ``ignore_index``; local = label - class_start; owned where valid and local
    lies in [0, num_local); local_label = local where owned, else -1; owned_count, float32,
    0-dim."""
    num_rows = labels.shape[0]
    labels = labels.contiguous()
    valid = torch.empty(num_rows, dtype=torch.bool, device=labels.device)
    owned = torch.empty_like(valid)
    local, local_label = torch.empty((2, num_rows), dtype=labels.dtype, device=labels.device)
    owned_count = torch.empty((), dtype=torch.float32, device=labels.device)
    _label_rows_kernel[(1,)](
        labels,
        valid,
        local,
        owned,
        local_label,
        owned_count,
        num_rows,
        int(ignore_index),
        int(class_start),
        int(num_local),
        BLOCK=BLOCK_ROWS,
    )
    return valid, local, owned, local_label, owned_count


def label_rows_reference(labels: torch.Tensor, ignore_index: int, class_start: int, num_local: int):
    """``label_rows`` in torch."""
    valid = labels != ignore_index
    local = labels - class_start
    owned = valid & (local >= 0) & (local < num_local)
    return valid, local, owned, torch.where(owned, local, -1), owned.sum().float()


@triton.jit(do_not_specialize=["num_rows", "error"])
def _loss_rows_kernel(
    ROW_MAX,
    ROW_SUM,
    LSE,
    TARGET,
    VALID,
    OWNED_TOTAL,
    ERROR_IN,
    LOSS,
    NUM_VALID,
    LSE_VALID,
    CHECKS,
    SKIP,
    num_rows,
    error,
    FROM_SUMS: tl.constexpr,
    ERROR_ON_DEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    loss_sum = tl.zeros([BLOCK], tl.float32)
    valid_count = tl.zeros([BLOCK], tl.int32)
    bad_rows = tl.zeros([BLOCK], tl.int32)  # rows whose lse is not finite, ignored ones too
    for start in range(0, num_rows, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        in_batch = rows < num_rows
        if FROM_SUMS:  # one rank: its (max, sum of exp) are the batch's
            lse = tl.load(ROW_MAX + rows, mask=in_batch, other=0.0) + tl.log(
                tl.load(ROW_SUM + rows, mask=in_batch, other=1.0)
            )
            tl.store(LSE + rows, lse, mask=in_batch)
        else:
            lse = tl.load(LSE + rows, mask=in_batch, other=0.0)
        valid = tl.load(VALID + rows, mask=in_batch, other=0) != 0
        target = tl.load(TARGET + rows, mask=in_batch, other=0.0)
        loss_sum += tl.where(valid, lse - target, 0.0)
        valid_count += valid.to(tl.int32)
        bad_rows += (in_batch & ~(tl.abs(lse) < float("inf"))).to(tl.int32)
        tl.store(LSE_VALID + rows, tl.where(valid, lse, float("inf")), mask=in_batch)
    num_valid = tl.sum(valid_count, axis=0)
    loss = tl.sum(loss_sum, axis=0) / tl.maximum(num_valid, 1).to(tl.float32)
    tl.store(LOSS, loss)
    tl.store(NUM_VALID, num_valid.to(tl.int64))
    if ERROR_ON_DEVICE:
        error = tl.load(ERROR_IN).to(tl.float64)
    else:
        error = tl.cast(error, tl.float64)
    owned_total = tl.load(OWNED_TOTAL).to(tl.float64)
    tl.store(CHECKS, error)
    tl.store(CHECKS + 1, owned_total)
    tl.store(CHECKS + 2, num_valid.to(tl.float64))
    # the checks as MergeChecks judges them (an error code, a label no shard owns), a loss
    # that is not finite, and a row whose lse is not: an ignored row's P would be NaN and
    # reach dW all the same (NaN fails each comparison, so it fails the step)
    owned_ok = tl.abs(owned_total - num_valid.to(tl.float64)) <= 0.5
    failed = (error != 0.0) | ~owned_ok | ~(tl.abs(loss) < float("inf")) | (tl.sum(bad_rows, axis=0) > 0)
    tl.store(SKIP, failed.to(tl.int32))


def loss_rows(row_max, row_sum, lse, target_logit, valid, owned_total, error):
    """(lse, mean loss, valid count, lse_valid, checks, skip) from one rank's ``row_max`` and
    ``row_sum`` (``lse`` None) or the merged ``lse`` (the sums None): loss = the mean of lse -
    target over the valid rows (0 with none), the count int64 and 0-dim, lse_valid = lse
    with +inf on ignored rows, checks = float64 (error, owned_total, valid count), the
    ``MergeChecks`` values of this loss, skip = int32 0-dim, 1 where the loss is not finite
    or the checks fail (an error code; owned_total, rounded, not the valid count) or any
    row's lse is not finite (an ignored row's too: its P would carry the NaN into dW) and 0
    elsewhere: the verdict the update kernels read (``SGDUpdate.skip``). ``owned_total`` a
    0-dim device tensor, ``error`` a number or a 0-dim device tensor."""
    from_sums = lse is None
    num_rows = target_logit.shape[0]
    device = target_logit.device
    lse_out = torch.empty(num_rows, dtype=torch.float32, device=device) if from_sums else lse.contiguous()
    lse_valid = torch.empty(num_rows, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    num_valid = torch.empty((), dtype=torch.int64, device=device)
    checks = torch.empty(3, dtype=torch.float64, device=device)
    skip = torch.empty((), dtype=torch.int32, device=device)
    error_on_device = isinstance(error, torch.Tensor)
    _loss_rows_kernel[(1,)](
        row_max.contiguous() if from_sums else lse_out,
        row_sum.contiguous() if from_sums else lse_out,
        lse_out,
        target_logit.contiguous(),
        valid,
        owned_total,
        error if error_on_device else checks,
        loss,
        num_valid,
        lse_valid,
        checks,
        skip,
        num_rows,
        0.0 if error_on_device else float(error),
        FROM_SUMS=from_sums,
        ERROR_ON_DEVICE=error_on_device,
        BLOCK=BLOCK_ROWS,
    )
    return lse_out, loss, num_valid, lse_valid, checks, skip


def loss_rows_reference(row_max, row_sum, lse, target_logit, valid, owned_total, error):
    """``loss_rows`` in torch."""
    if lse is None:
        lse = row_max + torch.log(row_sum)
    num_valid = valid.sum()
    loss = torch.where(valid, lse - target_logit, 0.0).sum() / num_valid.clamp_min(1)
    lse_valid = torch.where(valid, lse, float("inf"))
    error = torch.as_tensor(error, dtype=torch.float64, device=lse.device).reshape(())
    checks = torch.stack([error, owned_total.double(), num_valid.double()])
    failed = (error != 0) | ~((checks[1] - checks[2]).abs() <= 0.5) | ~torch.isfinite(loss) | ~torch.isfinite(lse).all()
    return lse, loss, num_valid, lse_valid, checks, failed.to(torch.int32)
