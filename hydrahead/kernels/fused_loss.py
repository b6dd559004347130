"""The sharded cross-entropy on the fused Triton kernels, as an autograd function.

Same semantics as ``hydrahead.head.sharded_cross_entropy`` (its input checks, its two
collectives, its result), with the per-shard work done by the kernels in ``shard_ce``:

forward:  kernel -> local (max, sum, target, A) -> MAX and SUM all-reduce -> loss, and
          the feature gradient dF (for an incoming gradient of 1) right away
backward: dF times the incoming gradient; the weight kernel either applies the head's
          SGD step in place (``update`` given: no weight gradient is produced) or
          returns dW.

With ``grad_filter > 0`` (``hydrahead.kernels.filtered``) the forward computes only the
log-sum-exp, and the backward recomputes the logits once to list the entries with
|softmax - onehot| >= grad_filter, from which dF and the update (or dW) follow.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from hydrahead.head.cross_entropy import (
    _check_global_inputs,
    _check_label_range,
    _local_error_code,
    _merge_across_shards,
    mean_loss_after_merge,
    normalize_rows,
    normalize_rows_backward,
)
from hydrahead.kernels import filtered as filtered_kernels
from hydrahead.kernels.shard_ce import (
    SGDUpdate,
    feature_operand,
    inverse_row_norms,
    shard_forward,
    shard_weight_backward,
    target_shift_for,
)

FUSED_MARGIN_TYPES = ("none", "cosface")


def _exact_feature_grad(accumulated, running_max, lse, weight_shard, inv_norm, owned, local, row_scale):
    """dF for an incoming gradient of 1: row_scale (sum_c softmax_c w_c - w_target), in place in A."""
    grad_feat_op = accumulated.mul_(torch.exp(running_max - lse)[:, None])
    rows = torch.nonzero(owned).squeeze(1)
    target_rows = weight_shard[local[rows]].float()
    if inv_norm is not None:
        target_rows = target_rows * inv_norm[local[rows], None]
    grad_feat_op[rows] -= target_rows
    return grad_feat_op.mul_(row_scale[:, None])


class _FusedShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight_shard, labels, class_start, group, num_classes, scale, margin, margin_type, ignore_index, update, grad_filter):
        local_error = _local_error_code(features, weight_shard, class_start, num_classes)
        num_rows = features.shape[0]
        device = features.device
        cosine = margin_type == "cosface"
        filtered = grad_filter > 0
        valid = labels != ignore_index
        running_max = torch.full((num_rows,), float("-inf"), device=device)
        running_sum = torch.zeros(num_rows, device=device)
        target_logit = torch.zeros(num_rows, device=device)
        accumulated = None  # set by the kernel; a rank with bad inputs raises before it is needed
        owned_count = torch.zeros((), device=device)
        feat_unit = feat_norm = inv_norm = None
        if local_error == 0:
            weight_shard = weight_shard.detach()
            if cosine:
                feat_unit, feat_norm = normalize_rows(features.detach().float())
                feat_op = feature_operand(feat_unit, weight_shard.dtype)
                inv_norm = inverse_row_norms(weight_shard)
            else:
                feat_op = feature_operand(features.detach(), weight_shard.dtype)
            local = labels - class_start
            owned = valid & (local >= 0) & (local < weight_shard.shape[0])
            local_label = torch.where(owned, local, -1).contiguous()
            shift = target_shift_for(margin_type, scale, margin)
            kernel_args = (feat_op, weight_shard, inv_norm, local_label)
            kernel_options = dict(scale=scale, target_shift=shift, cosine=cosine)
            if filtered:  # logits only: the backward's list of kept entries gives dF and dW
                running_max, running_sum, target_logit = filtered_kernels.shard_lse(*kernel_args, **kernel_options)
            else:
                running_max, running_sum, target_logit, accumulated = shard_forward(*kernel_args, **kernel_options)
            owned_count = owned.sum().float()

        lse, target_logit, owned_total, error = _merge_across_shards(
            running_max, running_sum, target_logit, owned_count, local_error, group
        )
        loss, num_valid = mean_loss_after_merge(lse, target_logit, owned_total, error, labels, valid, ignore_index)

        row_scale = torch.where(valid, scale / max(num_valid, 1), 0.0)
        ctx.kernel_args, ctx.kernel_options = kernel_args, kernel_options
        ctx.lse_valid = torch.where(valid, lse, float("inf")).contiguous()  # +inf: ignored rows get p = 0
        ctx.feat_unit, ctx.feat_norm = feat_unit, feat_norm
        ctx.grad_feat_op = None
        if filtered:
            ctx.exact_inputs = (running_max, lse, owned, local, row_scale)
            ctx.owned_rows = torch.nonzero(owned).squeeze(1)
            ctx.owned_cols, ctx.target_logit = local[ctx.owned_rows], target_logit
        else:  # the forward's A gives dF right away (in place: no further G x D temporaries)
            ctx.grad_feat_op = _exact_feature_grad(accumulated, running_max, lse, weight_shard, inv_norm, owned, local, row_scale)
        ctx.grad_filter, ctx.scale = grad_filter, scale
        ctx.num_valid, ctx.update, ctx.features_dtype = num_valid, update, features.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = float(grad_loss)
        grad_scale = grad * ctx.scale / max(ctx.num_valid, 1)
        want_weight = ctx.update is not None or ctx.needs_input_grad[1]
        if ctx.grad_filter > 0:
            grad_feat_op, grad_weight = _filtered_backward(ctx, grad, grad_scale, want_weight)
        else:
            grad_feat_op, grad_weight = ctx.grad_feat_op * grad, None
            if want_weight:
                grad_weight = _exact_weight_backward(ctx, grad_scale)
        grad_features = None
        if ctx.needs_input_grad[0]:
            if ctx.feat_unit is not None:
                grad_feat_op = normalize_rows_backward(grad_feat_op, ctx.feat_unit, ctx.feat_norm)
            grad_features = grad_feat_op.to(ctx.features_dtype)
        del ctx.grad_feat_op, ctx.kernel_args, ctx.feat_unit
        return grad_features, grad_weight, None, None, None, None, None, None, None, None, None, None


def _exact_weight_backward(ctx, grad_scale):
    return shard_weight_backward(*ctx.kernel_args, ctx.lse_valid, grad_scale=grad_scale, update=ctx.update, **ctx.kernel_options)


def _filtered_backward(ctx, grad, grad_scale, want_weight):
    """dF and the update (or dW) from the entries with |softmax - onehot| >= grad_filter."""
    feat_op, weight, inv_norm, local_label = ctx.kernel_args
    num_rows = feat_op.shape[0]
    cut = (ctx.lse_valid + math.log(ctx.grad_filter)).contiguous()
    selected, found = filtered_kernels.select_entries(
        feat_op, weight, inv_norm, local_label, cut, scale=ctx.scale, cosine=ctx.kernel_options["cosine"],
        capacity=filtered_kernels.initial_capacity(num_rows),
    )
    if selected is None:  # far more entries than a filter is for: this step runs exactly
        filtered_kernels.warn_fallback(found, filtered_kernels.max_entries(num_rows), ctx.grad_filter)
        running_max, lse, owned, local, row_scale = ctx.exact_inputs
        _, _, _, accumulated = shard_forward(*ctx.kernel_args, **ctx.kernel_options)
        grad_feat_op = _exact_feature_grad(accumulated, running_max, lse, weight, inv_norm, owned, local, row_scale * grad)
        return grad_feat_op, _exact_weight_backward(ctx, grad_scale) if want_weight else None
    rows, cols, logits = selected
    values = torch.exp(logits - ctx.lse_valid[rows])
    t_rows, t_cols, t_values = filtered_kernels.kept_target_entries(ctx.owned_rows, ctx.owned_cols, ctx.target_logit, ctx.lse_valid, ctx.grad_filter)
    entries = (torch.cat([rows, t_rows]), torch.cat([cols, t_cols]), torch.cat([values, t_values]))
    grad_feat_op, touched, touched_grad = filtered_kernels.sparse_gradients(
        feat_op, weight, inv_norm, entries, grad_scale=grad_scale, cosine=ctx.kernel_options["cosine"], num_rows=num_rows
    )
    grad_weight = None
    if ctx.update is not None:
        filtered_kernels.apply_sgd(weight, touched, touched_grad, ctx.update)
    elif want_weight:
        grad_weight = torch.zeros_like(weight)
        grad_weight[touched] = touched_grad.to(weight.dtype)
    return grad_feat_op, grad_weight


def triton_sharded_cross_entropy(
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
    update: SGDUpdate | None = None,
    grad_filter: float = 0.0,
) -> torch.Tensor:
    """``sharded_cross_entropy`` on the fused kernels (margin types none and cosface).

    With ``update``, the backward applies the SGD step to ``weight_shard`` (and its momentum
    buffer) in place and produces no weight gradient; without it, ``weight_shard.grad``
    receives dW. ``grad_filter > 0`` drops every entry of softmax - onehot whose magnitude
    is below it, in dF and dW alike (much faster at many classes, but those small updates
    are lost).
    Logits never reach global memory; extra memory is O(G x D), not O(G x C_r).
    """
    _check_global_inputs(features, labels, scale, margin, margin_type, 1)
    if margin_type not in FUSED_MARGIN_TYPES:
        raise ValueError(f"margin_type={margin_type!r} runs on head.impl=reference; the fused kernels take {FUSED_MARGIN_TYPES}")
    if not (grad_filter >= 0):
        raise ValueError(f"grad_filter must be >= 0, got {grad_filter}")
    labels = labels.long()
    if num_classes is not None:
        _check_label_range(labels, ignore_index, num_classes)
    with torch.autocast(device_type=features.device.type, enabled=False):
        return _FusedShardedCrossEntropy.apply(
            features, weight_shard, labels, int(class_start), group, num_classes, float(scale), float(margin),
            margin_type, int(ignore_index), update, float(grad_filter),
        )
