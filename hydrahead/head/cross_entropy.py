"""Exact softmax cross-entropy over classes sharded across the ranks of a process group.

Every rank holds the whole global batch of features (G x D) and a contiguous shard of the
class weights (C_r x D). The loss equals single-device ``F.cross_entropy`` over all C
classes; each rank only ever holds one chunk of logits (G x chunk_size).

Per step the ranks exchange two collectives of G floats:
  1. all-reduce MAX of the per-sample local maxima,
  2. all-reduce SUM of (rescaled sum of exp, target logit) per sample.
The backward needs no collective: with the global log-sum-exp saved, each rank forms
softmax - onehot for its own classes chunk by chunk.

The math (normalisation, margins, online log-sum-exp), the merge across shards (the only
collectives) and the input checks live in ``hydrahead.distributed.sharded_softmax``, which
the fused kernels share; this module holds the chunked torch computation of one shard.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from hydrahead.distributed.sharded_softmax import (
    MARGIN_TYPES,
    MergeChecks,
    check_global_inputs,
    check_label_range,
    check_logit_offset,
    local_error_code,
    mean_loss_after_merge,
    merge_across_shards,
    merge_logsumexp,
    normalize_rows,
    normalize_rows_backward,
    per_valid_label,
    target_margin,
)

__all__ = ["DEFAULT_CHUNK_SIZE", "MARGIN_TYPES", "MicroBatches", "ShardProblem", "sharded_cross_entropy"]

DEFAULT_CHUNK_SIZE = 32768


# ----------------------------------------------------------------------------------------
# Per-shard pieces shared by forward and backward
# ----------------------------------------------------------------------------------------


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with the result in ``out_dtype``; half-precision operands keep fp32 accumulators."""
    if a.dtype == out_dtype:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (RuntimeError, TypeError):
            pass
    return (a @ b).to(out_dtype)


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class ShardProblem:
    """Everything derived once per call: dtypes, operands, where the target logits sit.

    The logit scale is folded into the feature operand (G x D) so that no pass over the
    (G x chunk) logits is spent on it.
    """

    def __init__(
        self,
        features,
        weight_shard,
        labels,
        class_start,
        scale,
        margin,
        margin_type,
        ignore_index,
        chunk_size,
        logit_offset=None,
    ):
        """``labels=None`` builds a problem without targets (plain scoring, as in predict).
        ``logit_offset`` (C_r,): added to every logit of each class, after the margin."""
        self.scale, self.margin, self.margin_type = scale, margin, margin_type
        self.normalize = margin_type != "none"
        # float8 storage is read as bfloat16 (the reference's emulation of fp8 weights).
        stored = torch.bfloat16 if weight_shard.dtype in _FLOAT8 else weight_shard.dtype
        self.mm_dtype = torch.promote_types(features.dtype, stored)
        self.compute_dtype = torch.float64 if self.mm_dtype == torch.float64 else torch.float32
        self.num_local = weight_shard.shape[0]
        self.weight = weight_shard
        self.chunk_size = chunk_size
        self.logit_offset = None if logit_offset is None else logit_offset.to(self.compute_dtype)
        if self.normalize:
            self.feat_unit, self.feat_norm = normalize_rows(features.to(self.compute_dtype))
            self.feat_op = (self.feat_unit * scale).to(self.mm_dtype)
        else:
            self.feat_op = (features.to(self.compute_dtype) * scale).to(self.mm_dtype)
        if labels is None:
            labels = torch.full((features.shape[0],), ignore_index, dtype=torch.long, device=features.device)
        self.valid = labels != ignore_index
        local = labels - class_start
        self.owned = self.valid & (local >= 0) & (local < self.num_local)
        # Owned targets sorted by class, cut into per-chunk runs with a single host sync.
        rows = torch.nonzero(self.owned).squeeze(1)
        local = local[rows]
        order = torch.argsort(local)
        self.target_rows, self.target_cols = rows[order], local[order]
        bounds = torch.arange(0, self.num_local + chunk_size, chunk_size, device=features.device).clamp_max(
            self.num_local
        )
        self.target_bounds = torch.searchsorted(self.target_cols, bounds).tolist()

    def chunks(self):
        """(start, stop, target rows, target columns within the chunk) for each class chunk."""
        for index, start in enumerate(range(0, self.num_local, self.chunk_size)):
            stop = min(start + self.chunk_size, self.num_local)
            lo, hi = self.target_bounds[index], self.target_bounds[index + 1]
            yield start, stop, self.target_rows[lo:hi], self.target_cols[lo:hi] - start

    def chunk_weight(self, start: int, stop: int):
        """The chunk's weight operand, plus (unit rows, norms) when logits are cosines."""
        w = self.weight[start:stop]
        if not self.normalize:
            return w.to(self.mm_dtype), None, None
        unit, norm = normalize_rows(w.to(self.compute_dtype))
        return unit.to(self.mm_dtype), unit, norm

    def logits(self, w_op: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, start: int = 0):
        """Logits (G x c) of the chunk of classes from ``start``, with the target margin and
        the classes' offsets applied; returns (logits, d phi/d cos at targets)."""
        logits = _matmul(self.feat_op, w_op.t(), self.compute_dtype)
        dphi = None
        if self.normalize and rows.numel():
            phi, dphi = target_margin(logits[rows, cols] / self.scale, self.margin_type, self.margin)
            logits[rows, cols] = phi * self.scale
        if self.logit_offset is not None:  # a constant per class: d logit / d (feat_op . w) is unchanged
            logits += self.logit_offset[start : start + logits.shape[1]]
        return logits, dphi


# ----------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------


class _ShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        features,
        weight_shard,
        labels,
        class_start,
        group,
        num_classes,
        scale,
        margin,
        margin_type,
        ignore_index,
        chunk_size,
        checks,
        logit_offset,
    ):
        local_error = local_error_code(features, weight_shard, class_start, num_classes)
        num_rows = features.shape[0]
        compute_dtype = (
            torch.float64 if torch.float64 in (features.dtype, getattr(weight_shard, "dtype", None)) else torch.float32
        )
        running_max = torch.full((num_rows,), -math.inf, dtype=compute_dtype, device=features.device)
        running_sum = torch.zeros_like(running_max)
        target_logit = torch.zeros_like(running_max)
        owned_count = torch.zeros((), dtype=compute_dtype, device=features.device)
        valid = labels != ignore_index

        problem_args = (class_start, scale, margin, margin_type, ignore_index, chunk_size, logit_offset)
        if local_error == 0:
            problem = ShardProblem(features, weight_shard, labels, *problem_args)
            for start, stop, rows, cols in problem.chunks():
                w_op, _, _ = problem.chunk_weight(start, stop)
                logits, _ = problem.logits(w_op, rows, cols, start)
                target_logit[rows] = logits[rows, cols]
                running_max, running_sum = merge_logsumexp(running_max, running_sum, torch.logsumexp(logits, dim=1))
                del logits
            owned_count = problem.owned.sum().to(compute_dtype)

        lse, target_logit, owned_total, error = merge_across_shards(
            running_max, running_sum, target_logit, owned_count, local_error, group
        )
        loss, num_valid = mean_loss_after_merge(
            lse, target_logit, owned_total, error, labels, valid, ignore_index, checks
        )

        ctx.save_for_backward(features, weight_shard, labels, lse)
        ctx.problem_args, ctx.num_valid = problem_args, num_valid
        ctx.local_error = local_error
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        features, weight_shard, labels, lse = ctx.saved_tensors
        num_valid, scale = ctx.num_valid, ctx.problem_args[1]
        need_features, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.local_error:  # a bad shard (with MergeChecks, raised on every rank once they are read): no local math
            return (torch.zeros_like(features) if need_features else None), *(None,) * 12
        problem = ShardProblem(features, weight_shard, labels, *ctx.problem_args)
        compute = problem.compute_dtype

        # d loss / d logit = (softmax - onehot) * grad / num_valid on valid rows. Ignored rows
        # get lse = +inf, so their softmax is exactly 0 without a masking pass; the scalar
        # factor is applied to the small matmul outputs, not to the G x chunk matrix.
        lse = torch.where(problem.valid, lse, math.inf)
        factor = grad_loss.to(compute) / per_valid_label(num_valid)
        grad_feat_op = torch.zeros(features.shape, dtype=compute, device=features.device) if need_features else None
        grad_weight = torch.empty_like(weight_shard) if need_weight else None

        for start, stop, rows, cols in problem.chunks():
            w_op, w_unit, w_norm = problem.chunk_weight(start, stop)
            logits, dphi = problem.logits(w_op, rows, cols, start)
            probs = torch.exp_(logits.sub_(lse[:, None]))
            probs[rows, cols] -= 1.0
            if dphi is not None:  # d logit / d (feat_op . w) is phi'(cos) at the targets, 1 elsewhere
                probs[rows, cols] *= dphi
            probs_op = probs.to(problem.mm_dtype)
            if need_features:
                grad_feat_op += _matmul(probs_op, w_op, compute)
            if need_weight:
                grad_w = _matmul(probs_op.t(), problem.feat_op, compute).mul_(factor)
                if problem.normalize:
                    grad_w = normalize_rows_backward(grad_w, w_unit, w_norm)
                grad_weight[start:stop] = grad_w.to(weight_shard.dtype)
            del logits, probs, probs_op

        grad_features = None
        if need_features:
            grad_feat_op.mul_(factor * scale)  # feat_op = scale * features (or unit features)
            if problem.normalize:
                grad_feat_op = normalize_rows_backward(grad_feat_op, problem.feat_unit, problem.feat_norm)
            grad_features = grad_feat_op.to(features.dtype)
        return grad_features, grad_weight, None, None, None, None, None, None, None, None, None, None, None


def _autocast_off(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


def sharded_cross_entropy(
    features: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    class_start: int,
    *,
    group: dist.ProcessGroup | None = None,
    num_classes: int | None = None,
    scale: float = 1.0,
    margin: float = 0.0,
    margin_type: str = "none",
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checks: MergeChecks | None = None,
    logit_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean softmax cross-entropy over all classes of a class-sharded head.

    Args:
        features: the global batch (G x D), identical on every rank of ``group``.
        weight_shard: this rank's class weights (C_r x D) for classes
            ``[class_start, class_start + C_r)``.
        labels: global class ids (G,), integer, in ``[0, C)`` or ``ignore_index``.
        class_start: first class id of this rank's shard.
        group: process group over which the classes are sharded (``None``: world; without
            an initialised process group, a single shard).
        num_classes: total C. When given, labels are range-checked locally.
        scale, margin, margin_type: ``"none"``: logits ``scale * f @ w``; ``"cosface"``:
            rows of f and w are L2-normalised and the target logit is ``scale * (cos - m)``;
            ``"arcface"``: target ``scale * cos(theta + m)``, or ``scale * (cos - m sin m)``
            where ``theta + m > pi``.
        ignore_index: label value whose rows contribute neither loss nor gradient.
        chunk_size: classes per chunk; peak extra memory is O(G x chunk_size).
        checks: a ``MergeChecks`` that takes the checks below instead of raising them here,
            so the caller can read them with its own values (see ``MergeChecks``).
        logit_offset: (C_r,) a constant added to every logit of each class of this shard,
            after the margin (sampled softmax's correction: ``log`` of how many classes a
            sampled row stands for); no gradient flows to it.

    Returns the same scalar on every rank: the mean over non-ignored samples (0 when every
    sample is ignored). ``weight_shard.grad`` equals the matching rows of the single-device
    gradient; ``features.grad`` is this rank's partial sum, which the feature all-gather's
    backward adds up over ranks. Half-precision inputs keep logits, softmax statistics and
    the feature gradient in fp32; float64 stays float64.

    Cost of the input checks: shapes and dtypes are checked on metadata (free). A rank-local
    problem with ``weight_shard`` or ``class_start`` rides as one extra float on the MAX
    all-reduce, and the count of owned labels as one extra float on the SUM all-reduce, so
    every rank raises the same ``ValueError`` and none hangs; reading those values back costs
    one host-device synchronisation per call, plus one more for the local range check when
    ``num_classes`` is given without ``checks`` (with them, a label outside [0, num_classes)
    fails the deferred merge check as a label that no shard owns).
    """
    check_global_inputs(features, labels, scale, margin, margin_type, chunk_size)
    if logit_offset is not None:
        check_logit_offset(logit_offset, weight_shard)
    labels = labels.long()
    if num_classes is not None and checks is None:  # with checks: a label no shard owns fails them, no host read
        check_label_range(labels, ignore_index, num_classes)
    with _autocast_off(features.device.type):
        return _ShardedCrossEntropy.apply(
            features,
            weight_shard,
            labels,
            int(class_start),
            group,
            num_classes,
            float(scale),
            float(margin),
            margin_type,
            int(ignore_index),
            int(chunk_size),
            checks,
            logit_offset,
        )


class MicroBatches:
    """``sharded_cross_entropy`` of one step taken micro-batch by micro-batch (``comm.overlap``).

    ``chunk(features, rows)`` returns the loss sum of those rows of the global batch and their
    feature gradient, and adds their weight gradient into ``weight_shard.grad``: after the
    last chunk it holds the whole step's gradient, for the head's one update. Each row's
    log-sum-exp is complete within its chunk (it spans classes, not samples); the mean is
    over the step's valid labels, known before the first chunk. ``logit_offset`` as for
    ``sharded_cross_entropy``: the step's, the same for every chunk.
    """

    def __init__(
        self,
        weight_shard,
        labels,
        class_start,
        *,
        group=None,
        num_classes=None,
        scale=1.0,
        margin=0.0,
        margin_type="none",
        ignore_index=-100,
        chunk_size=DEFAULT_CHUNK_SIZE,
        logit_offset=None,
    ):
        if logit_offset is not None:  # refused here, before the step's first chunk
            check_logit_offset(logit_offset, weight_shard)
        self.weight, self.labels, self.class_start = weight_shard, labels.long(), int(class_start)
        self.options = dict(
            logit_offset=logit_offset,
            group=group,
            num_classes=num_classes,
            scale=scale,
            margin=margin,
            margin_type=margin_type,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
        )
        self.ignore_index = ignore_index
        self.num_valid = int((self.labels != ignore_index).sum())

    def chunk(self, features: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = features.detach().requires_grad_()
        labels = self.labels[rows]
        loss = sharded_cross_entropy(leaf, self.weight, labels, self.class_start, **self.options)
        num_valid = int((labels != self.ignore_index).sum())
        if num_valid == 0:
            return loss.detach(), torch.zeros_like(features)
        (loss * (num_valid / self.num_valid)).backward()
        return loss.detach() * num_valid, leaf.grad

    def check(self, checks: MergeChecks | None = None) -> None:
        """Nothing to check or hand on: each chunk's loss already raised what its collectives revealed."""

    def finish(self) -> None:
        """Nothing left to do: the weight gradient is complete in ``.grad``."""
