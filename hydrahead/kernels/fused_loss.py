"""The sharded cross-entropy on the fused Triton kernels, as an autograd function.

Same semantics as ``hydrahead.head.sharded_cross_entropy`` (its input checks, its two
collectives, its result), with the per-shard work done by the kernels in ``shard_ce``:

forward:  kernel -> local (max, sum, target, A) -> MAX and SUM all-reduce -> loss, and
          the feature gradient dF (for an incoming gradient of 1) right away
backward: dF times the incoming gradient; the weight kernel either applies the head's
          SGD step in place (``update`` given: no weight gradient is produced) or
          returns dW.
"""

from __future__ import annotations

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
from hydrahead.kernels.shard_ce import SGDUpdate, inverse_row_norms, shard_forward, shard_weight_backward, target_shift_for

FUSED_MARGIN_TYPES = ("none", "cosface")


class _FusedShardedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight_shard, labels, class_start, group, num_classes, scale, margin, margin_type, ignore_index, update, grad_filter):
        local_error = _local_error_code(features, weight_shard, class_start, num_classes)
        num_rows = features.shape[0]
        device = features.device
        cosine = margin_type == "cosface"
        valid = labels != ignore_index
        running_max = torch.full((num_rows,), float("-inf"), device=device)
        running_sum = torch.zeros(num_rows, device=device)
        target_logit = torch.zeros(num_rows, device=device)
        accumulated = None  # set by the kernel; a rank with bad inputs raises before it is needed
        owned_count = torch.zeros((), device=device)
        if local_error == 0:
            weight_shard = weight_shard.detach()
            if cosine:
                feat_unit, feat_norm = normalize_rows(features.detach().float())
                feat_op = feat_unit.to(weight_shard.dtype)
                inv_norm = inverse_row_norms(weight_shard)
            else:
                feat_op = features.detach().to(weight_shard.dtype)
                inv_norm = None
            local = labels - class_start
            owned = valid & (local >= 0) & (local < weight_shard.shape[0])
            local_label = torch.where(owned, local, -1).contiguous()
            shift = target_shift_for(margin_type, scale, margin)
            running_max, running_sum, target_logit, accumulated = shard_forward(
                feat_op.contiguous(), weight_shard, inv_norm, local_label, scale=scale, target_shift=shift, cosine=cosine
            )
            owned_count = owned.sum().float()

        lse, target_logit, owned_total, error = _merge_across_shards(
            running_max, running_sum, target_logit, owned_count, local_error, group
        )
        loss, num_valid = mean_loss_after_merge(lse, target_logit, owned_total, error, labels, valid, ignore_index)

        # dF for an incoming gradient of 1: s/n (sum_c softmax_c w_c - w_target) on valid rows.
        # (in place in the forward's G x D buffer: no further G x D temporaries)
        grad_feat_op = accumulated.mul_(torch.exp(running_max - lse)[:, None])
        rows = torch.nonzero(owned).squeeze(1)
        target_rows = weight_shard[local[rows]].float()
        if cosine:
            target_rows = target_rows * inv_norm[local[rows], None]
        grad_feat_op[rows] -= target_rows
        grad_feat_op.mul_(torch.where(valid, scale / max(num_valid, 1), 0.0)[:, None])
        grad_features = normalize_rows_backward(grad_feat_op, feat_unit, feat_norm) if cosine else grad_feat_op

        ctx.grad_features = grad_features
        ctx.weight_args = (feat_op.contiguous(), weight_shard, inv_norm, local_label, torch.where(valid, lse, float("inf")).contiguous())
        ctx.options = dict(scale=scale, target_shift=shift, cosine=cosine, grad_filter=grad_filter)
        ctx.num_valid, ctx.update, ctx.features_dtype = num_valid, update, features.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad = float(grad_loss)
        grad_features = (ctx.grad_features * grad).to(ctx.features_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.update is not None or ctx.needs_input_grad[1]:
            grad_scale = grad * ctx.options["scale"] / max(ctx.num_valid, 1)
            grad_weight = shard_weight_backward(*ctx.weight_args, grad_scale=grad_scale, update=ctx.update, **ctx.options)
        del ctx.grad_features, ctx.weight_args
        return grad_features, grad_weight, None, None, None, None, None, None, None, None, None, None


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
    receives dW. ``grad_filter > 0`` skips backward tiles whose |softmax - onehot| stays
    below it everywhere (faster on peaked softmaxes, but drops those small updates).
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
