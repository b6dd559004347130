"""The sharded cross-entropy on the fused Triton kernels, as an autograd function.

Same semantics as ``hydrahead.head.sharded_cross_entropy`` (its input checks, its two
collectives, its result), with the per-shard work done by the Triton kernels. The exact step runs one of two ways:

gemm (``exact_gemm``, fp32 and bf16 rows)
    forward:  LSE kernel -> local (max, sum, target) -> MAX and SUM all-reduce -> loss
    backward: class chunk by chunk, a kernel writes P = softmax - onehot (scaled), then
              dF += P W_c on cuBLAS and dW_c = P^T F with the SGD step on the chunk's rows
              (``update`` given: no weight gradient is produced) or dW. fp8 rows: P in
              e5m2 and both products on FP8 tensor cores (torch._scaled_mm).
stationary (``shard_ce``, every dtype)
    forward:  kernel -> local (max, sum, target, A) -> MAX and SUM all-reduce -> loss, and
              the feature gradient dF (for an incoming gradient of 1) right away
    backward: dF times the incoming gradient; the weight kernel either applies the head's
              SGD step in place or returns dW.

With ``grad_filter > 0`` (``hydrahead.kernels.filtered``) the forward computes only the
log-sum-exp, and the backward recomputes the logits once to list the entries with
|softmax - onehot| >= grad_filter, from which dF and the update (or dW) follow.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hydrahead.distributed.collectives import group_world_size
from hydrahead.distributed.sharded_softmax import (
    MergeChecks,
    check_global_inputs,
    check_label_range,
    check_logit_offset,
    local_error_code,
    merge_across_shards,
    normalize_rows,
    normalize_rows_backward,
    per_valid_label,
    raise_merge_errors,
)
from hydrahead.kernels import filtered as filtered_kernels
from hydrahead.kernels.exact_gemm import exact_backward, resolve_exact_kernels
from hydrahead.kernels.graphed import HeadStepGraphs
from hydrahead.kernels.row_ops import label_rows, loss_rows
from hydrahead.kernels.shard_ce import (
    FP8,
    SGDUpdate,
    check_update,
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
    # Every row's target row, zeroed where this shard does not own the label: a mask, not
    # nonzero(owned), whose size would need a host sync.
    if weight_shard.shape[0] == 0:  # no rows, so no owned labels
        return grad_feat_op.mul_(row_scale[:, None])
    target = torch.where(owned, local, 0)
    target_rows = weight_shard[target].float()
    if inv_norm is not None:
        target_rows = target_rows * inv_norm[target, None]
    grad_feat_op.sub_(target_rows.mul_(owned[:, None]))
    return grad_feat_op.mul_(row_scale[:, None])


@dataclass
class _LocalPass:
    """One rank's kernel pass over a block of rows, before the ranks merge their statistics."""

    local_error: int
    valid: torch.Tensor
    running_max: torch.Tensor
    running_sum: torch.Tensor
    target_logit: torch.Tensor
    owned_count: torch.Tensor
    accumulated: torch.Tensor | None = None  # exact mode: A = sum_c exp(z_c - max) w_c
    owned: torch.Tensor | None = None
    local: torch.Tensor | None = None
    kernel_args: tuple = ()
    kernel_options: dict | None = None
    logit_offset: torch.Tensor | None = None  # per class, float32: the LSE pass's and the gemm backward's
    feat_unit: torch.Tensor | None = None
    feat_norm: torch.Tensor | None = None
    skip: torch.Tensor | None = None  # int32, set by the merge: 1 where the step must not land (``loss_rows``)

    def merge(self, group):
        """(lse, target logit, owned labels over all ranks, error code) after the two all-reduces."""
        return merge_across_shards(
            self.running_max, self.running_sum, self.target_logit, self.owned_count, self.local_error, group
        )


def _local_pass(
    features,
    weight_shard,
    labels,
    class_start,
    num_classes,
    scale,
    margin,
    margin_type,
    ignore_index,
    lse_only,
    inv_norm=None,
    logit_offset=None,
):
    """The forward kernel over this shard: local (max, sum of exp, target) per row, and A (the
    stationary exact kernels; ``lse_only``: the filtered path and the gemm backward).
    ``logit_offset``: one constant per class added to its logits (the LSE pass only)."""
    local_error = local_error_code(features, weight_shard, class_start, num_classes)
    if local_error:  # this rank raises after the collectives, with the others: statistics that merge as none
        num_rows, device = features.shape[0], features.device
        running_max = torch.full((num_rows,), float("-inf"), device=device)
        zeros = [torch.zeros(num_rows, device=device), torch.zeros(num_rows, device=device)]
        return _LocalPass(local_error, labels != ignore_index, running_max, *zeros, torch.zeros((), device=device))
    # the labels' masks and local ids in one launch (row_ops)
    valid, local, owned, local_label, owned_count = label_rows(labels, ignore_index, class_start, weight_shard.shape[0])
    out = _LocalPass(local_error, valid, None, None, None, owned_count, local=local, owned=owned)
    cosine = margin_type == "cosface"
    weight_shard = weight_shard.detach()
    if cosine:
        out.feat_unit, out.feat_norm = normalize_rows(features.detach().float())
        feat_op = feature_operand(out.feat_unit, weight_shard.dtype)
        inv_norm = inverse_row_norms(weight_shard) if inv_norm is None else inv_norm
    else:
        feat_op = feature_operand(features.detach(), weight_shard.dtype)
    out.kernel_args = (feat_op, weight_shard, inv_norm, local_label)
    out.kernel_options = dict(scale=scale, target_shift=target_shift_for(margin_type, scale, margin), cosine=cosine)
    if lse_only:  # logits only: the backward recomputes them
        out.logit_offset = logit_offset
        out.running_max, out.running_sum, out.target_logit = filtered_kernels.shard_lse(
            *out.kernel_args, **out.kernel_options, logit_offset=logit_offset
        )
    else:
        out.running_max, out.running_sum, out.target_logit, out.accumulated = shard_forward(
            *out.kernel_args, **out.kernel_options
        )
    return out


def merged_pass(
    features, weight_shard, labels, class_start, group, num_classes, scale, margin, margin_type, ignore_index,
    lse_only, checks, logit_offset=None,
):  # fmt: skip
    """The local pass and the ranks' merge: (local pass, lse, target logit, loss, valid count,
    lse with +inf on ignored rows, where P must be 0). The pass's ``skip`` holds the step's
    verdict (``row_ops.loss_rows``: the loss or a row's lse not finite, or the checks
    failed), the same on every rank."""
    local_pass = _local_pass(
        features, weight_shard, labels, class_start, num_classes, scale, margin, margin_type, ignore_index, lse_only,
        logit_offset=logit_offset,
    )  # fmt: skip
    if group_world_size(group) == 1 and not local_pass.local_error:  # the rank's statistics are the batch's
        row_max, row_sum, lse = local_pass.running_max, local_pass.running_sum, None
        target_logit, owned_total, error = local_pass.target_logit, local_pass.owned_count, 0
    else:
        row_max = row_sum = None
        lse, target_logit, owned_total, error = local_pass.merge(group)
    lse, loss, num_valid, lse_valid, check_values, local_pass.skip = loss_rows(
        row_max, row_sum, lse, target_logit, local_pass.valid, owned_total, error
    )
    if checks is None:  # raised here, with one host read; the count as a number then
        num_valid = raise_merge_errors(*check_values, labels, local_pass.valid, ignore_index)
    else:
        checks.add(*check_values, labels, local_pass.valid, ignore_index)
    return local_pass, lse, target_logit, loss, num_valid, lse_valid


def gradient_scale(grad_loss, scale, num_valid):
    """The logits' gradient scale: the incoming gradient times the logit scale over the valid
    labels (a device tensor: the kernels read it from memory, so no host read)."""
    return grad_loss.float() * scale / per_valid_label(num_valid)


def gemm_backward(local_pass, lse_valid, grad_scale, update, want_features: bool, want_weight: bool):
    """The exact gemm path's (dF of the kernels' operand, dW or None) from the forward's pass."""
    return exact_backward(
        *local_pass.kernel_args,
        lse_valid,
        grad_scale=grad_scale,
        update=update,
        want_features=want_features,
        want_weight=want_weight,
        logit_offset=local_pass.logit_offset,
        target_logit=local_pass.target_logit,
        **local_pass.kernel_options,
    )


def features_gradient(local_pass, grad_feat_op, dtype):
    """dF of the features as given (through the normalisation for cosine logits), in their dtype."""
    if local_pass.feat_unit is not None:
        grad_feat_op = normalize_rows_backward(grad_feat_op, local_pass.feat_unit, local_pass.feat_norm)
    return grad_feat_op.to(dtype)


def _filtered_gradients(local_pass, lse_valid, target_logit, grad_filter, row_scale, grad_scale):
    """dF and the sparse dW (touched classes, their rows) from the entries with |softmax - onehot|
    >= grad_filter; (exact dF, None) when far more entries qualify than a filter is for."""
    feat_op, weight, inv_norm, local_label = local_pass.kernel_args
    num_rows = feat_op.shape[0]
    cosine = local_pass.kernel_options["cosine"]
    cut = (lse_valid + math.log(grad_filter)).contiguous()
    selected, found = filtered_kernels.select_entries(
        feat_op,
        weight,
        inv_norm,
        local_label,
        cut,
        scale=local_pass.kernel_options["scale"],
        cosine=cosine,
        capacity=filtered_kernels.initial_capacity(num_rows),
    )
    if selected is None:
        filtered_kernels.warn_fallback(found, filtered_kernels.max_entries(num_rows), grad_filter)
        _, _, _, accumulated = shard_forward(*local_pass.kernel_args, **local_pass.kernel_options)
        return _exact_feature_grad(
            accumulated,
            local_pass.running_max,
            lse_valid,
            weight,
            inv_norm,
            local_pass.owned,
            local_pass.local,
            row_scale,
        ), None
    rows, cols, logits = selected
    values = torch.exp(logits - lse_valid[rows])
    owned_rows = torch.nonzero(local_pass.owned).squeeze(1)
    t_rows, t_cols, t_values = filtered_kernels.kept_target_entries(
        owned_rows, local_pass.local[owned_rows], target_logit, lse_valid, grad_filter
    )
    entries = (torch.cat([rows, t_rows]), torch.cat([cols, t_cols]), torch.cat([values, t_values]))
    grad_feat_op, touched, touched_grad = filtered_kernels.sparse_gradients(
        feat_op, weight, inv_norm, entries, grad_scale=grad_scale, cosine=cosine, num_rows=num_rows
    )
    return grad_feat_op, (touched, touched_grad)


def _apply_sparse(weight, touched, touched_grad, update: SGDUpdate | None):
    """The filtered weight gradient: the SGD step applied in place (``update``), or dW
    (float32 for fp8 weights, as the exact weight kernel returns it)."""
    if update is not None:
        filtered_kernels.apply_sgd(weight, touched, touched_grad, update)
        return None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32 if weight.dtype == FP8 else weight.dtype)
    grad_weight[touched] = touched_grad.to(grad_weight.dtype)
    return grad_weight


class _FusedShardedCrossEntropy(torch.autograd.Function):
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
        update,
        grad_filter,
        checks,
        exact_kernels,
        logit_offset,
    ):
        filtered = grad_filter > 0
        gemm = not filtered and exact_kernels == "gemm"
        _check_offsets_run_on_gemm(logit_offset, gemm, grad_filter, exact_kernels)
        local_pass, lse, target_logit, loss, num_valid, ctx.lse_valid = merged_pass(
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
            filtered or gemm,
            checks,
            logit_offset,
        )
        ctx.local_pass, ctx.target_logit = local_pass, target_logit
        ctx.grad_feat_op = None
        ctx.features_meta = (features.shape, features.dtype, features.device)
        if (
            not filtered and not gemm and not local_pass.local_error
        ):  # the forward's A gives dF right away (in place: no further G x D temporaries)
            _, weight, inv_norm, _ = local_pass.kernel_args
            row_scale = torch.where(local_pass.valid, scale / per_valid_label(num_valid), 0.0)
            ctx.grad_feat_op = _exact_feature_grad(
                local_pass.accumulated,
                local_pass.running_max,
                lse,
                weight,
                inv_norm,
                local_pass.owned,
                local_pass.local,
                row_scale,
            )
            local_pass.accumulated = None
        ctx.grad_filter, ctx.scale, ctx.gemm = grad_filter, scale, gemm
        ctx.exact_gemm = exact_kernels == "gemm"  # the weight pass of a filter that falls back to exact
        if update is not None and (filtered or gemm):  # their update reads the verdict: no step on a bad loss
            update = dataclasses.replace(update, skip=local_pass.skip)
        ctx.num_valid, ctx.update, ctx.features_dtype = num_valid, update, features.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Kept on the device (the kernels read it from memory): a float() here would make the
        # host wait for the whole forward before it could queue the backward.
        local_pass = ctx.local_pass
        if local_pass.local_error:  # a bad shard, raised on every rank once the checks are read: no local math
            shape, dtype, device = ctx.features_meta
            del ctx.grad_feat_op, ctx.local_pass
            grad_features = torch.zeros(shape, dtype=dtype, device=device) if ctx.needs_input_grad[0] else None
            return grad_features, *(None,) * 14
        grad = grad_loss.float()
        grad_scale = gradient_scale(grad_loss, ctx.scale, ctx.num_valid)
        want_weight = ctx.update is not None or ctx.needs_input_grad[1]
        sparse = None
        grad_weight = None
        if ctx.gemm:
            grad_feat_op, grad_weight = gemm_backward(
                local_pass, ctx.lse_valid, grad_scale, ctx.update, ctx.needs_input_grad[0], want_weight
            )
        elif ctx.grad_filter > 0:
            row_scale = torch.where(local_pass.valid, grad_scale, 0.0)
            grad_feat_op, sparse = _filtered_gradients(
                local_pass, ctx.lse_valid, ctx.target_logit, ctx.grad_filter, row_scale, grad_scale
            )
        else:
            grad_feat_op = ctx.grad_feat_op * grad
        if want_weight and sparse is not None:
            grad_weight = _apply_sparse(local_pass.kernel_args[1], *sparse, ctx.update)
        elif want_weight and not ctx.gemm and ctx.exact_gemm:  # the filter fell back: the exact step on gemm
            _, grad_weight = exact_backward(
                *local_pass.kernel_args,
                ctx.lse_valid,
                grad_scale=grad_scale,
                update=ctx.update,
                want_features=False,
                target_logit=local_pass.target_logit,
                **local_pass.kernel_options,
            )
        elif want_weight and not ctx.gemm:
            update, held_back = ctx.update, False
            if update is not None and update.skip is not None:
                # the filter fell back to the stationary kernels, which cannot read the verdict:
                # read here (the fallback has waited for its entry count already)
                held_back, update = bool(update.skip), dataclasses.replace(update, skip=None)
            if not held_back:
                grad_weight = shard_weight_backward(
                    *local_pass.kernel_args,
                    ctx.lse_valid,
                    grad_scale=grad_scale,
                    update=update,
                    **local_pass.kernel_options,
                )
        grad_features = None
        if ctx.needs_input_grad[0]:
            grad_features = features_gradient(local_pass, grad_feat_op, ctx.features_dtype)
        del ctx.grad_feat_op, ctx.local_pass
        return grad_features, grad_weight, *(None,) * 13


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
    checks: MergeChecks | None = None,
    exact_kernels: str = "auto",
    logit_offset: torch.Tensor | None = None,
    graphs: HeadStepGraphs | None = None,
    backward: bool = False,
) -> torch.Tensor:
    """``sharded_cross_entropy`` on the fused kernels (margin types none and cosface).

    With ``update``, the backward applies the SGD step to ``weight_shard`` (and its momentum
    buffer) in place and produces no weight gradient; without it, ``weight_shard.grad``
    receives dW. The gemm and filtered paths hold that step back on the device when the loss
    or a row's log-sum-exp is not finite or its checks fail (``step_gated``), so a bad
    loss's backward leaves the rows as they were. ``grad_filter > 0`` drops every entry of
    softmax - onehot whose magnitude is below it, in dF and dW alike (much faster at many
    classes, but those small updates are lost). ``checks``: as for
    ``sharded_cross_entropy``; with it the loss makes no host read (the incoming gradient,
    too, stays on the device). ``exact_kernels``: how the exact step runs
    (``hydrahead.kernels.exact_gemm``): gemm (an LSE pass, then P chunks and library GEMMs),
    stationary (two kernels that hold blocks of rows), or auto (gemm; fp8 rows below a
    global batch of ``FP8_GEMM_MIN_ROWS`` take stationary). ``logit_offset`` (C_r,): a
    constant added to every logit of each class, after the margin, as for
    ``sharded_cross_entropy`` (the exact gemm kernels only). ``graphs``: a
    ``HeadStepGraphs`` that replays the step from CUDA graphs where it qualifies
    (``hydrahead.kernels.graphed``; the same results, without the host's launches), eagerly
    elsewhere. ``backward``: also run the loss's backward for an incoming gradient of 1 (dF
    added to ``features.grad``, the step applied) and return the loss detached; with
    ``graphs`` one CUDA graph then holds both, with no host work between them
    (``HeadStepGraphs.step``).
    Logits never reach global memory whole: the stationary kernels need O(G x D) extra
    memory, the gemm path a G x chunk block of P besides (256 MiB at most).
    """
    check_global_inputs(features, labels, scale, margin, margin_type, 1)
    if margin_type not in FUSED_MARGIN_TYPES:
        raise ValueError(
            f"margin_type={margin_type!r} runs on head.impl=reference; the fused kernels take {FUSED_MARGIN_TYPES}"
        )
    if not (grad_filter >= 0):
        raise ValueError(f"grad_filter must be >= 0, got {grad_filter}")
    if update is not None and update.skip is not None:
        raise ValueError("SGDUpdate.skip is the loss's own verdict, set in its forward: pass it as None")
    if backward and not (torch.is_grad_enabled() and features.requires_grad):
        raise ValueError("backward=True runs the loss's backward: the features must need a gradient, in grad mode")
    exact_kernels = resolve_exact_kernels(
        exact_kernels, weight_shard.dtype, weight_shard.shape[1], weight_shard.device.type, features.shape[0]
    )
    if exact_kernels == "stationary":  # an update they cannot take is refused now, not in the backward
        check_update(weight_shard, update)
    labels = labels.long()
    if num_classes is not None and checks is None:  # with checks: a label no shard owns fails them, no host read
        check_label_range(labels, ignore_index, num_classes)
    logit_offset = _offset_operand(logit_offset, weight_shard)

    def eager(step_update):
        return _FusedShardedCrossEntropy.apply(
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
            step_update,
            float(grad_filter),
            checks,
            exact_kernels,
            logit_offset,
        )

    with torch.autocast(device_type=features.device.type, enabled=False):
        if graphs is not None and (
            graphs.refusal(features, weight_shard, group, update, grad_filter, exact_kernels, checks, logit_offset)
            is None
        ):
            replay = graphs.step if backward else graphs.loss
            return replay(
                features, weight_shard, labels, group, class_start, num_classes, scale, margin, margin_type,
                ignore_index, update, checks, eager,
            )  # fmt: skip
        loss = eager(update)
        if backward:
            loss.backward()
            return loss.detach()
        return loss


def step_gated(weight_shard: torch.Tensor, num_rows: int, grad_filter: float, exact_kernels: str) -> bool:
    """Whether ``triton_sharded_cross_entropy``'s in-place step on these rows is held back on
    the device when its loss is not finite or its checks fail (the gemm and filtered paths;
    the stationary exact kernels take no device flag)."""
    if grad_filter > 0:
        return True
    resolved = resolve_exact_kernels(
        exact_kernels, weight_shard.dtype, weight_shard.shape[1], weight_shard.device.type, num_rows
    )
    return resolved == "gemm"


def _check_offsets_run_on_gemm(logit_offset, gemm: bool, grad_filter: float, exact_kernels: str) -> None:
    if logit_offset is not None and not gemm:
        raise ValueError(
            "logit offsets (head.fill_correction) run on the exact gemm kernels only: set head.grad_filter=0 "
            f"and head.exact_kernels=gemm (got grad_filter={grad_filter}, exact kernels {exact_kernels!r})"
        )


def _offset_operand(logit_offset: torch.Tensor | None, weight_shard: torch.Tensor) -> torch.Tensor | None:
    """The kernels' form of per-class logit offsets: checked, float32, contiguous, beside the rows."""
    if logit_offset is None:
        return None
    check_logit_offset(logit_offset, weight_shard)
    return logit_offset.detach().to(device=weight_shard.device, dtype=torch.float32).contiguous()


class FusedMicroBatches:
    """The fused loss of one step taken micro-batch by micro-batch (``comm.overlap``).

    ``chunk(features, rows)`` runs the forward over some rows of the global batch (their
    log-sum-exp is complete after the chunk's two all-reduces, since it spans classes, not
    samples) and returns their loss sum and feature gradient at once, so that gradient can
    travel while the next chunk computes. ``finish()`` then takes the head's one update over
    every row of the step: the exact weight kernel over all rows with their saved
    log-sum-exp, or (``grad_filter``) the kept entries of all chunks. Loss, dF and the update
    equal the single-call loss's up to summation order. ``logit_offset``: the step's, as for
    ``triton_sharded_cross_entropy`` (the exact gemm kernels only).
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
        update: SGDUpdate | None = None,
        grad_filter=0.0,
        exact_kernels="auto",
        logit_offset=None,
    ):
        if margin_type not in FUSED_MARGIN_TYPES:
            raise ValueError(
                f"margin_type={margin_type!r} runs on head.impl=reference; the fused kernels take {FUSED_MARGIN_TYPES}"
            )
        if not (grad_filter >= 0):
            raise ValueError(f"grad_filter must be >= 0, got {grad_filter}")
        self.labels = labels.long()
        if num_classes is not None:
            check_label_range(self.labels, ignore_index, num_classes)
        self.weight, self.class_start, self.group, self.num_classes = weight_shard, int(class_start), group, num_classes
        self.scale, self.margin, self.margin_type, self.ignore_index = (
            float(scale),
            float(margin),
            margin_type,
            int(ignore_index),
        )
        self.update, self.grad_filter = update, float(grad_filter)
        # The gemm backward's chunks run the LSE pass, then P and dF (no weight side); finish()
        # recomputes P for every row once, for the update.
        resolved = resolve_exact_kernels(
            exact_kernels, weight_shard.dtype, weight_shard.shape[1], weight_shard.device.type, labels.shape[0]
        )
        self.gemm = grad_filter == 0 and resolved == "gemm"
        self.exact_gemm = resolved == "gemm"  # finish()'s weight pass, also when a filter falls back to exact
        if resolved == "stationary":  # an update they cannot take is refused now, not in finish()
            check_update(weight_shard, update)
        _check_offsets_run_on_gemm(logit_offset, self.gemm, grad_filter, resolved)
        self.logit_offset = _offset_operand(logit_offset, weight_shard)
        # The mean is over the whole step's valid labels, known before any chunk runs (on the
        # device: the kernels read the gradient scale from memory).
        self.num_valid = (self.labels != ignore_index).sum()
        self.grad_scale = self.scale / per_valid_label(self.num_valid)
        self.inv_norm = inverse_row_norms(weight_shard.detach()) if margin_type == "cosface" else None
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, features, lse_valid)
        self._sparse: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._exact_weight = grad_filter == 0  # a chunk that overflows the filter turns the step's weight pass exact
        self._owned_total = torch.zeros((), device=weight_shard.device)
        self._error = torch.zeros((), device=weight_shard.device)
        self._bad_shard = False  # this rank's shard failed the local checks: no local math, only the collectives

    def chunk(self, features: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.labels[rows]
        check_global_inputs(features, labels, self.scale, self.margin, self.margin_type, 1)
        with torch.autocast(device_type=features.device.type, enabled=False):
            local_pass = _local_pass(
                features,
                self.weight,
                labels,
                self.class_start,
                self.num_classes,
                self.scale,
                self.margin,
                self.margin_type,
                self.ignore_index,
                self.grad_filter > 0 or self.gemm,
                self.inv_norm,
                self.logit_offset,
            )
            # No host read per chunk: the checks the collectives carry are raised once, in check().
            lse, target_logit, owned_total, error = local_pass.merge(self.group)
            self._owned_total = self._owned_total + owned_total
            self._error = torch.maximum(
                self._error, torch.as_tensor(error, dtype=torch.float32, device=self._error.device).reshape(())
            )
            loss_sum = torch.where(local_pass.valid, lse - target_logit, 0.0).sum()
            lse_valid = torch.where(local_pass.valid, lse, float("inf")).contiguous()
            row_scale = torch.where(local_pass.valid, self.grad_scale, 0.0)
            if local_pass.local_error:
                self._bad_shard = True
                return loss_sum, torch.zeros_like(features)
            if self.grad_filter > 0:
                grad_feat_op, sparse = _filtered_gradients(
                    local_pass, lse_valid, target_logit, self.grad_filter, row_scale, self.grad_scale
                )
                if sparse is None:
                    self._exact_weight = True
                else:
                    self._sparse.append(sparse)
            elif self.gemm:
                grad_feat_op, _ = gemm_backward(local_pass, lse_valid, self.grad_scale, None, True, False)
            else:
                _, weight, inv_norm, _ = local_pass.kernel_args
                grad_feat_op = _exact_feature_grad(
                    local_pass.accumulated,
                    local_pass.running_max,
                    lse,
                    weight,
                    inv_norm,
                    local_pass.owned,
                    local_pass.local,
                    row_scale,
                )
        self._rows.append((rows, features.detach(), lse_valid))
        return loss_sum, features_gradient(local_pass, grad_feat_op, features.dtype)

    def check(self, checks: MergeChecks | None = None) -> None:
        """Raise what the chunks' collectives revealed (a bad shard, labels no shard owns), or
        hand it to ``checks`` for their owner's read."""
        valid = self.labels != self.ignore_index
        if checks is not None:
            checks.add(self._error, self._owned_total, self.num_valid, self.labels, valid, self.ignore_index)
            return
        raise_merge_errors(self._error, self._owned_total, self.num_valid, self.labels, valid, self.ignore_index)

    @torch.no_grad()
    def finish(self) -> torch.Tensor | None:
        """The step's one weight update (or dW, float32 for fp8 weights, without ``update``)."""
        if self._bad_shard:  # raised by check() on every rank; nothing to update here
            return None
        weight = self.weight.detach()
        if not self._exact_weight:
            touched = torch.cat([t for t, _ in self._sparse])
            grads = torch.cat([g for _, g in self._sparse])
            touched, slot = torch.unique(touched, sorted=True, return_inverse=True)
            summed = torch.zeros(touched.numel(), weight.shape[1], dtype=torch.float32, device=weight.device)
            summed.index_add_(0, slot, grads)
            return _apply_sparse(weight, touched, summed, self.update)
        rows = torch.cat([r for r, _, _ in self._rows])
        features = torch.cat([f for _, f, _ in self._rows])
        lse_valid = torch.cat([lse for _, _, lse in self._rows]).contiguous()
        labels = self.labels[rows]
        valid = labels != self.ignore_index
        local = labels - self.class_start
        local_label = torch.where(valid & (local >= 0) & (local < weight.shape[0]), local, -1).contiguous()
        cosine = self.margin_type == "cosface"
        feat_op = feature_operand(normalize_rows(features.float())[0] if cosine else features, weight.dtype)
        options = dict(
            grad_scale=self.grad_scale,
            update=self.update,
            scale=self.scale,
            target_shift=target_shift_for(self.margin_type, self.scale, self.margin),
            cosine=cosine,
        )
        if self.exact_gemm:
            _, grad_weight = exact_backward(
                feat_op,
                weight,
                self.inv_norm,
                local_label,
                lse_valid,
                want_features=False,
                logit_offset=self.logit_offset,
                **options,
            )
            return grad_weight
        return shard_weight_backward(feat_op, weight, self.inv_norm, local_label, lse_valid, **options)


def preflight(
    weight_dtype: torch.dtype,
    dim: int,
    device: torch.device,
    *,
    cosine: bool,
    momentum_dtype: torch.dtype | None,
    compensation_dtype: torch.dtype | None,
    rounding: str = "nearest",
    grad_filter: float = 0.0,
    exact_kernels: str = "auto",
    logit_offsets: bool = False,
) -> None:
    """Compile and run once, on a few rows, every kernel that a head step with these
    settings launches and whose tiles depend on them (not ``row_ops``' two, which take any
    width), so that a width or dtype the GPU cannot hold fails before training
    (``TilesDoNotFit``) instead of in its first step; the tiles found are kept for the run.
    No collective: the kernels are called directly, as one shard. ``logit_offsets``: the
    gemm path's variants that add per-class offsets too (head.fill_correction)."""
    gen = torch.Generator(device=device).manual_seed(0)
    num_rows, num_classes = 17, 37  # odd, and tl.dot's 16 x 16 at the least
    features = torch.randn(num_rows, dim, device=device, generator=gen)
    weight = (torch.randn(num_classes, dim, device=device, generator=gen) * 0.1).to(weight_dtype)
    labels = torch.randint(0, num_classes, (num_rows,), device=device, generator=gen)
    if cosine:
        features, _ = normalize_rows(features)
    feat_op = feature_operand(features, weight_dtype)
    inv_norm = inverse_row_norms(weight) if cosine else None
    options = dict(scale=4.0, target_shift=0.4 if cosine else 0.0, cosine=cosine)
    lands = torch.zeros((), dtype=torch.int32, device=device)  # the loss's verdict, as the gated kernels read it
    # Both ways of naming the rows: consecutive (the whole shard) and listed (active rows).
    for class_ids in (0, torch.arange(num_classes, device=device)):
        update = SGDUpdate(
            lr=0.1,
            momentum=0.9 if momentum_dtype is not None else 0.0,
            weight_decay=1e-4,
            momentum_buffer=torch.zeros_like(weight, dtype=momentum_dtype) if momentum_dtype is not None else None,
            rounding=rounding,
            class_ids=class_ids,
            compensation=torch.zeros_like(weight, dtype=compensation_dtype) if compensation_dtype is not None else None,
        )
        if grad_filter > 0:
            row_max, row_sum, _ = filtered_kernels.shard_lse(feat_op, weight, inv_norm, labels, **options)
            lse = (row_max + torch.log(row_sum)).contiguous()
            cut = (lse + math.log(grad_filter)).contiguous()
            filtered_kernels.select_entries(
                feat_op, weight, inv_norm, labels, cut, scale=options["scale"], cosine=cosine,
                capacity=filtered_kernels.initial_capacity(num_rows),
            )  # fmt: skip
            touched = torch.arange(3, device=device)
            for gate in (None, lands):  # micro-batches' update, and the loss's gated one
                gated = dataclasses.replace(update, skip=gate)
                filtered_kernels.apply_sgd(weight, touched, torch.zeros(3, dim, device=device), gated)
        # The stationary kernels run in every mode: the filtered path falls back on them.
        row_max, row_sum, _, _ = shard_forward(feat_op, weight, inv_norm, labels, **options)
        lse = (row_max + torch.log(row_sum)).contiguous()
        shard_weight_backward(feat_op, weight, inv_norm, labels, lse, grad_scale=0.1, update=update, **options)
        # The gemm path too wherever a large batch would take it (fp8 rows: from FP8_GEMM_MIN_ROWS).
        if grad_filter == 0 and resolve_exact_kernels(exact_kernels, weight_dtype, dim, device.type) == "gemm":
            for offset in (None, torch.zeros(num_classes, device=device)) if logit_offsets else (None,):
                stats = filtered_kernels.shard_lse(feat_op, weight, inv_norm, labels, **options, logit_offset=offset)
                lse = (stats[0] + torch.log(stats[1])).contiguous()
                for gate in (None, lands):
                    exact_backward(
                        feat_op,
                        weight,
                        inv_norm,
                        labels,
                        lse,
                        grad_scale=0.1,
                        update=dataclasses.replace(update, skip=gate),
                        logit_offset=offset,
                        **options,
                    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a fault in a kernel surfaces here, not in the first step
